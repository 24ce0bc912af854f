"""The public image: what :func:`qjournal.open` returns.

A façade over the layers below: the core image (:mod:`qjournal.core.image`: open,
validate, lock, transactions) with guest reads (:mod:`qjournal.read`), guest writes
(:mod:`qjournal.write`) and the image operations (:mod:`qjournal.ops`). It holds no
logic of its own; nothing in the layers below imports it.

>>> import qjournal, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "doc.qcow2")
>>> with qjournal.create(path, 1 << 20) as img:
...     img.write(512, b"hello")
...     img.read(512, 5), img.size
(b'hello', 1048576)
"""
from __future__ import annotations

import os
import weakref
from typing import Any

from .core.image import Image as CoreImage
from .core.image import ImageInfo
from .ops.bitmaps import Bitmaps
from .ops.check import CheckResult, check
from .ops import snapshot
from .ops.resize import resize
from .read import guest
from .read.mapping import MapEntry, entries
from .journal.journal import SaltSource
from .storage.medium import Medium
from .write import data
from .write.disk import GuestDisk
from .format.header import INCOMPAT_DIRTY
from .format.snapshots import Snapshot

__all__ = ["Image", "ImageInfo"]


class Image(CoreImage):
    """An open qcow2 image (use :func:`qjournal.open` or :func:`qjournal.create`).

    Guest data: :meth:`read`, :meth:`write`, :meth:`write_zeroes`, :meth:`discard`,
    :meth:`disk`; metadata: :attr:`bitmaps`, :meth:`resize`, :meth:`check`,
    :meth:`map`, :meth:`info`; atomic units: ``with img.transaction():``.
    """

    def __init__(self, path: str | os.PathLike[str], mode: str = "r", *, medium: Medium | None = None,
                 journal_medium: Medium | None = None, take_locks: bool = True, salvage: bool = False,
                 salts: SaltSource | None = None, defer_repair: bool = False) -> None:
        """``defer_repair``: lazy refcounts may have left the image dirty; a writable open
        then rebuilds its refcounts (one transaction that also clears the bit), as QEMU
        does at its writable open. With ``defer_repair`` the rebuild waits for the first
        transaction instead, so that a caller who checks its request after opening and
        refuses it leaves the file as it found it. Such a caller must not plan from
        refcounts or free clusters before its first transaction (``amend`` and ``check``
        do: they open without it).
        """
        super().__init__(path, mode, medium=medium, journal_medium=journal_medium, take_locks=take_locks,
                         salvage=salvage, salts=salts)
        self._disks: weakref.WeakSet[GuestDisk] = weakref.WeakSet()
        if self.writable and not salvage and self.header.incompatible_features & INCOMPAT_DIRTY:
            self.before_first_transaction = lambda: check(self, "all")
            if not defer_repair:
                try:
                    self.settle()
                except BaseException:
                    self.close()
                    raise

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("r+" if self.writable else "r")
        return f"<qjournal.Image {self.path!r} {state} size={self.header.size}>"

    @property
    def size(self) -> int:
        """The virtual disk size in bytes."""
        return self.header.size

    # -- guest data -----------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """The guest disk's bytes at ``offset`` (any alignment; backing chain included)."""
        self.ensure_open()
        return guest.read(self, offset, length)

    def disk(self) -> GuestDisk:
        """The guest disk as a seekable ``io.RawIOBase`` (see :class:`qjournal.write.disk.GuestDisk`).

        Writes through it are batched like a write-back disk cache: they commit at
        ``flush()``, at its close and at the image's close.
        """
        self.ensure_open()
        d = GuestDisk(self)
        self._disks.add(d)
        return d

    def write(self, offset: int, data_: bytes | bytearray | memoryview) -> None:
        """Write guest data (any alignment). Enabled bitmaps get their bits first.

        Durable when it returns, unless a transaction is open (``with
        img.transaction():``, or a batch of :meth:`disk` writes): then it joins it, and
        is durable when that commits.
        """
        self.ensure_open()
        data.write(self, offset, data_)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros (whole clusters become zero clusters)."""
        self.ensure_open()
        data.write_zeroes(self, offset, length)

    def discard(self, offset: int, length: int) -> None:
        """Discard a range: it reads as zeros afterwards, and whole clusters are freed."""
        self.write_zeroes(offset, length)

    # -- metadata operations --------------------------------------------------
    @property
    def bitmaps(self) -> Bitmaps:
        """The persistent dirty bitmaps, a mapping by name (see :class:`qjournal.ops.bitmaps.Bitmaps`)."""
        self.ensure_open()
        return Bitmaps(self)

    def resize(self, new_size: int, shrink: bool = False) -> None:
        """Change the virtual size as ``qemu-img resize`` does (see :mod:`qjournal.ops.resize`)."""
        self.ensure_open()
        resize(self, new_size, shrink)

    def create_snapshot(self, name: str) -> Snapshot:
        """Take an internal snapshot, as ``qemu-img snapshot -c`` (see :mod:`qjournal.ops.snapshot`)."""
        self.ensure_open()
        return snapshot.create(self, name)

    def apply_snapshot(self, name: str) -> Snapshot:
        """Revert the disk to the internal snapshot ``name`` (id or name), as ``qemu-img snapshot -a``."""
        self.ensure_open()
        return snapshot.apply(self, name)

    def delete_snapshot(self, name: str) -> None:
        """Delete the internal snapshot called ``name``, as ``qemu-img snapshot -d``."""
        self.ensure_open()
        snapshot.delete(self, name)

    def check(self, repair: str | None = None) -> CheckResult:
        """Check the image as ``qemu-img check`` does; ``repair`` is None, ``"leaks"`` or ``"all"``."""
        self.ensure_open()
        return check(self, repair)

    def map(self, offset: int = 0, length: int | None = None) -> list[MapEntry]:
        """The allocation map, as ``qemu-img map`` gives it (one record per extent)."""
        self.ensure_open()
        return entries(self, offset, length)

    def info(self) -> ImageInfo:
        """What ``qemu-img info`` reports."""
        self.ensure_open()
        return super().info()

    # -- lifetime -------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        for d in list(getattr(self, "_disks", ())):
            d.flush()  # a batch of disk writes left open commits, as a disk cache flushes at shutdown
        guest.release(self)
        super().close()

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

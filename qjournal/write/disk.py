"""The guest disk as a Python file: ``io.RawIOBase``, readable, seekable, and writable
when the image is open read-write.

    with qjournal.open("disk.qcow2") as img:
        with GuestDisk(img) as disk, open("disk.raw", "wb") as out:
            shutil.copyfileobj(disk, out, 1 << 20)

Reads go through :mod:`qjournal.guest` (backing chain, zero and compressed clusters,
data files); writes through :meth:`Image.write` (enabled bitmaps updated first). The
disk has the image's virtual size: a write past it, or a truncate to another size, is
refused. Closing the disk leaves the image open.

Writes are cached as a write-back disk cache is: they share one transaction, which
commits (one journal sync for all of them) at :meth:`GuestDisk.flush`, at close, and
every :data:`BATCH_BYTES` written. A crash before the commit loses the writes since
the last one and nothing else; the image is never half-mapped. Overwrites of clusters
the image owns go in place, as in QEMU (a crash may leave part of them), unless the
disk is written inside a user's ``with img.transaction():``: its writes then join that
transaction and are all-or-nothing with it. Reads see the writes at once. A write that fails commits what came before it (the failed write may be
partly there, as on a disk that reports a write error) and raises.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
from typing import TYPE_CHECKING, Any

from ..read import guest
from .data import in_place_transaction, write

if TYPE_CHECKING:
    from ..core.image import Image


BATCH_BYTES = 256 << 20  # written bytes after which a batch of writes commits
DEFERRED_BYTES = 64 << 20  # in-place bytes held for the commit (under enabled bitmaps) after which it commits


class GuestDisk(io.RawIOBase):
    """A seekable file over the guest disk of ``img`` (writable if ``img`` is)."""

    def __init__(self, img: "Image") -> None:
        super().__init__()
        self.img = img
        self._reader = guest.reader(img)
        self._pos = 0
        self._batch: contextlib.AbstractContextManager[Any] | None = None
        self._batched = 0

    @property
    def size(self) -> int:
        """The virtual disk size in bytes."""
        return self._reader.size

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on a closed guest disk")

    def readable(self) -> bool:
        self._check_open()
        return True

    def seekable(self) -> bool:
        self._check_open()
        return True

    def writable(self) -> bool:
        self._check_open()
        return self.img.writable

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move to ``offset`` (from the start, the current position or the end); past the end is allowed."""
        self._check_open()
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def _span(self, n: int) -> int:
        """Bytes a read of ``n`` (negative: all) at the current position returns."""
        left = max(0, self.size - self._pos)
        return left if n < 0 else min(n, left)

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` from the current position; returns the bytes read (0 at the end)."""
        self._check_open()
        view = memoryview(buffer).cast("B")
        n = self._span(len(view))
        if n:
            self._reader.readinto(self._pos, view[:n])
            self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes (all to the end when negative); one copy for a run of data."""
        self._check_open()
        n = self._span(-1 if size is None else size)
        if not n:
            return b""
        data = self._reader.read(self._pos, n)
        self._pos += n
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def write(self, b: Any) -> int:
        self._check_open()
        if not self.img.writable:
            raise io.UnsupportedOperation("the image is open read-only")
        data = memoryview(b).cast("B")
        if self._pos + len(data) > self.size:
            raise OSError(errno.ENOSPC, f"write of {len(data)} bytes at {self._pos:#x} runs past the end of "
                                        f"the {self.size}-byte guest disk")
        if self._batch is None:
            self._batch = in_place_transaction(self.img, "guest disk writes")
            self._batch.__enter__()
            self._batched = 0
        try:
            write(self.img, self._pos, data)
        except BaseException:
            self.flush()
            raise
        self._pos += len(data)
        self._batched += len(data)
        tx = self.img.staged
        if self._batched >= BATCH_BYTES or (tx is not None and tx.guest is not None
                                            and tx.guest.deferred_bytes >= DEFERRED_BYTES):
            self.flush()
        return len(data)

    def flush(self) -> None:
        """Commit the writes made since the last flush: durable when this returns."""
        batch, self._batch = self._batch, None
        if batch is not None:
            batch.__exit__(None, None, None)

    def truncate(self, size: int | None = None) -> int:
        self._check_open()
        size = self._pos if size is None else size
        if size != self.size:
            raise OSError(errno.EINVAL, f"the guest disk has a fixed size of {self.size} bytes; "
                                        f"it cannot be truncated to {size}")
        return size

    def fileno(self) -> int:
        raise io.UnsupportedOperation("the guest disk is not an operating system file")

"""The guest disk as a Python file: ``io.RawIOBase``, readable and seekable.

    with qjournal.open("disk.qcow2") as img:
        with GuestDisk(img) as disk, open("disk.raw", "wb") as out:
            shutil.copyfileobj(disk, out, 1 << 20)

Reads go through :mod:`qjournal.guest` (backing chain, zero and compressed clusters,
data files). The disk has the image's virtual size and cannot be written or resized
yet: ``write`` and ``truncate`` raise ``io.UnsupportedOperation``. Closing the disk
leaves the image open.
"""
from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, Any

from . import guest

if TYPE_CHECKING:
    from .image import Image


class GuestDisk(io.RawIOBase):
    """A read-only, seekable file over the guest disk of ``img``."""

    def __init__(self, img: "Image") -> None:
        super().__init__()
        self.img = img
        self._reader = guest.reader(img)
        self._pos = 0

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
        return False

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
        raise io.UnsupportedOperation("the guest disk is read-only (guest writes go through Image.write)")

    def truncate(self, size: int | None = None) -> int:
        raise io.UnsupportedOperation("the guest disk cannot be resized through its file view "
                                      "(use qjournal resize)")

    def fileno(self) -> int:
        raise io.UnsupportedOperation("the guest disk is not an operating system file")

"""A read-only medium that shows committed journal after-images over the image.

A read-only open of an image whose journal holds a committed, unapplied transaction
reads through this, so it sees the committed state and writes nothing.
"""
from __future__ import annotations

from typing import Iterable

from ..format.lazy import np
from .medium import Medium, Range


class OverlayMedium:
    def __init__(self, base: Medium, writes: list[tuple[int, bytes]]) -> None:
        self.base = base
        self.writes = writes
        self._size = max([base.size] + [off + len(d) for off, d in writes])

    @property
    def size(self) -> int:
        return self._size

    def read(self, off: int, n: int) -> bytes:
        if off < 0 or off + n > self._size:
            raise ValueError(f"range {off:#x}+{n:#x} outside the medium of {self._size:#x} bytes")
        avail = max(0, min(n, self.base.size - off))
        buf = bytearray(self.base.read(off, avail) if avail else b"") + bytearray(n - avail)
        for woff, data in self.writes:
            lo, hi = max(off, woff), min(off + n, woff + len(data))
            if lo < hi:
                buf[lo - off:hi - off] = data[lo - woff:hi - woff]
        return bytes(buf)

    def array(self, off: int, count: int, dtype: str) -> np.ndarray:
        return np.frombuffer(self.read(off, count * np.dtype(dtype).itemsize), dtype=dtype).copy()

    def write(self, off: int, data: bytes) -> None:
        raise PermissionError("the image is open read-only")

    def flush(self, ranges: Iterable[Range] | None = None) -> None:
        pass

    def resize(self, n: int) -> None:
        raise PermissionError("the image is open read-only")

    def mark(self, name: str) -> None:
        pass

    def event(self, name: str) -> None:
        pass

    def close(self) -> None:
        self.base.close()

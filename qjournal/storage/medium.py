"""The byte store under an image.

Every byte qjournal changes in an image passes through :meth:`Medium.write`; nothing
else assigns into the map. The crash simulator wraps or replaces a medium to record
those writes, so a write that bypasses it is a bug it can catch.

``flush(ranges)`` is a write barrier: when it returns, every earlier write inside the
ranges is durable. Writes between two barriers may reach the disk in any order, one
page at a time, and a page may reach it before any barrier at all (MAP_SHARED writeback;
and a write of :data:`WRITEBACK_MIN` bytes or more asks for its writeback at once, so
that the disk works while we go on: sooner than a barrier, never instead of one).

A write, flush or resize the operating system refuses (EIO, ENOSPC, EFBIG, ...) raises
:class:`MediumError`, a :class:`~qjournal.errors.QcowError` that is also an ``OSError``:
one line naming the file, the offset and the system's reason.

``event(name)`` announces what the next writes are (a journal step, the new clusters of
a transaction, a journal record) before they are issued; ``mark(name)`` records that a
step is done, after its barrier. Both do nothing here: a fault-injecting medium
(:mod:`qjournal.storage.faults`) uses events to fail the writes of one of them, a
recording medium (crashsim) keeps the marks.
"""
from __future__ import annotations

import mmap
import os
from typing import Any, Callable, Iterable, Protocol

from ..format.lazy import np
from ..errors import QcowError

PAGE = mmap.PAGESIZE
MSYNC_MAX_RANGES = 16  # a flush of more ranges than this is one fsync
Range = tuple[int, int]  # (offset, length)


class System:
    """The calls a file medium makes to change a file and make it durable, in one place.

    This is the seam crashsim's real-medium mode records (``crashsim run --medium
    real``): it wraps these calls, not the medium, so that the medium's own flush code
    (which ranges it msyncs, when it fsyncs) is what gets tested.
    """

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, off: int) -> None:
        pwrite_all(fd, data, off)

    def msync(self, fd: int, mapping: mmap.mmap, off: int, n: int) -> None:
        mapping.flush(off, n)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def ftruncate(self, fd: int, n: int) -> None:
        os.ftruncate(fd, n)

    def fallocate(self, fd: int, off: int, n: int) -> None:
        os.posix_fallocate(fd, off, n)

    def start_writeback(self, fd: int, off: int, n: int) -> None:
        """Have the kernel start writing ``[off, off + n)`` to the disk now, without
        waiting (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``). A hint, not a
        barrier: nothing is promised durable (crashsim records nothing), but the disk
        works while we go on, and the flush that follows waits for less. Does nothing
        where the call is missing or fails."""
        call = _sync_file_range()
        if call is not None:
            call(fd, off, n, SYNC_FILE_RANGE_WRITE)


SYSTEM = System()
WRITEBACK_MIN = 1 << 20
"""A write of at least this many bytes starts its writeback at once (:meth:`System.start_writeback`):
a 256 MiB commit spent 40 % of its time in the final fsync when the disk only started then."""
SYNC_FILE_RANGE_WRITE = 2
_SFR: list[Callable[[int, int, int, int], int] | None] = []


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` through ctypes (Python's os lacks it), or None; looked up once."""
    if not _SFR:
        call = None
        try:
            import ctypes
            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            fn.restype = ctypes.c_int
            call = fn
        except (OSError, AttributeError):
            pass
        _SFR.append(call)
    return _SFR[0]


class Medium(Protocol):
    @property
    def size(self) -> int: ...
    def read(self, off: int, n: int) -> bytes: ...
    def array(self, off: int, count: int, dtype: str) -> np.ndarray: ...
    def write(self, off: int, data: bytes) -> None: ...
    def flush(self, ranges: Iterable[Range] | None = None) -> None: ...
    def resize(self, n: int) -> None: ...
    def mark(self, name: str) -> None: ...
    def event(self, name: str) -> None: ...
    def close(self) -> None: ...


class MediumError(QcowError, OSError):
    """The operating system refused a write, flush or resize of a file (EIO, ENOSPC, ...).

    ``errno`` and ``strerror`` are the system's; ``path`` and ``offset`` say where.

    >>> e = MediumError("a.qcow2", "write of 0x200 bytes", 0x10000, 28, "No space left on device")
    >>> str(e), e.errno, isinstance(e, OSError)
    ('a.qcow2: write of 0x200 bytes at offset 0x10000 failed: No space left on device', 28, True)
    """

    def __init__(self, path: str, what: str, offset: int | None, errno: int | None,
                 strerror: str | None) -> None:
        where = f" at offset {offset:#x}" if offset is not None else ""
        reason = strerror or (os.strerror(errno) if errno else "unknown error")
        QcowError.__init__(self, f"{path}: {what}{where} failed: {reason}", structure=path, offset=offset,
                           rule=reason, path=path)
        self.errno = errno
        self.strerror = reason

    def __str__(self) -> str:
        return str(self.args[0])

    @classmethod
    def of(cls, path: str, what: str, offset: int | None, e: OSError) -> "MediumError":
        """The error for ``e``, an OSError a system call raised."""
        return cls(path, what, offset, e.errno, e.strerror)


def page_span(off: int, n: int) -> Range:
    """The page-aligned range that covers ``[off, off + n)``."""
    start = off - off % PAGE
    end = off + n
    end += -end % PAGE
    return start, end - start


FAULT_AROUND = 64 << 10     # what one read of the map may make resident (the kernel's fault-around)
RESIDENT_MAX = 32 << 20     # the map's pages are dropped from the process after reads of about this much


class MmapMedium:
    """A file mapped MAP_SHARED for reading; every write is a pwrite. Growth is a pwrite
    past the end (or a reserved ftruncate); the map is made again when a read first
    reaches past what it covers, and the next flush is an fsync, so that the new size
    is durable too."""

    def __init__(self, path: str | os.PathLike[str], writable: bool, system: System = SYSTEM) -> None:
        self.path = os.fspath(path)
        self.writable = writable
        self.system = system
        self.fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)
        self._size = os.fstat(self.fd).st_size
        self._map: mmap.mmap | None = None
        self._resident = 0
        self._mapped = 0  # bytes the map covers; the file may have grown past it (pwrite)
        self._size_dirty = False
        self._remap()

    def _remap(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._mapped = 0
        if self._size:
            access = mmap.ACCESS_WRITE if self.writable else mmap.ACCESS_READ
            self._map = mmap.mmap(self.fd, self._size, access=access)
            self._mapped = self._size

    def _mapping(self, end: int) -> mmap.mmap:
        """The map, made again first when ``end`` lies past what it covers."""
        if end > self._mapped:
            self._remap()
        assert self._map is not None
        return self._map

    @property
    def size(self) -> int:
        return self._size

    def _check(self, off: int, n: int) -> None:
        if off < 0 or n < 0 or off + n > self._size:
            raise ValueError(f"range {off:#x}+{n:#x} outside the medium of {self._size:#x} bytes")

    def read(self, off: int, n: int) -> bytes:
        self._check(off, n)
        if n == 0:
            return b""
        out = self._mapping(off + n)[off:off + n]
        self._touched(n)
        return out

    def array(self, off: int, count: int, dtype: str) -> np.ndarray:
        """A copy of ``count`` items of ``dtype`` at ``off``; no view of the map escapes."""
        dt = np.dtype(dtype)
        self._check(off, count * dt.itemsize)
        if count == 0:
            return np.zeros(0, dtype=dt)
        out = np.frombuffer(self._mapping(off + count * dt.itemsize), dtype=dt, count=count, offset=off).copy()
        self._touched(count * dt.itemsize)
        return out

    def rows(self, offsets: np.ndarray, size: int) -> np.ndarray:
        """``size`` bytes at each of ``offsets`` (multiples of ``size``), as the rows of a
        ``(len(offsets), size)`` uint8 array: a copy, gathered by numpy from the map a
        bounded number of rows at a time (see :func:`read_rows`)."""
        out = np.empty((len(offsets), size), np.uint8)
        if not len(offsets):
            return out
        end = int(offsets.max()) + size
        self._check(int(offsets.min()), end - int(offsets.min()))
        whole = np.frombuffer(self._mapping(end), np.uint8, count=end).reshape(-1, size)
        per_row = max(size, FAULT_AROUND)
        step = max(1, RESIDENT_MAX // per_row)
        idx = offsets // size
        for a in range(0, len(idx), step):
            np.take(whole, idx[a:a + step], axis=0, out=out[a:a + step])
            self._touched(len(idx[a:a + step]) * per_row)
        del whole                      # no view of the map outlives the call (it may be remapped)
        return out

    def _touched(self, n: int) -> None:
        """Keep the map's resident pages bounded. A read faults in its pages and, through
        the kernel's fault-around, up to 64 KiB of cached pages beside them: a check of 2M
        clusters of 512 bytes, reading each L2 table, left the whole file resident
        (1.3 GiB). Every read is copied out and the map is never stored into (every write
        is a pwrite), so its pages are clean: after about RESIDENT_MAX bytes, dropping
        them all from this process (the page cache keeps them) loses nothing."""
        self._resident += max(n, FAULT_AROUND)
        if self._resident >= RESIDENT_MAX and self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED, 0, self._mapped - self._mapped % mmap.PAGESIZE)
            self._resident = 0

    def write(self, off: int, data: bytes) -> None:
        if not self.writable:
            raise PermissionError(f"{self.path} is open read-only")
        n = len(data)
        if not n:
            return
        end = off + n
        # Every write is a pwrite, never a store into the map: a store into a page the
        # file system has no block for yet (a hole, or a grown region) raises SIGBUS
        # when the disk is full, and kills the process; pwrite returns ENOSPC (or
        # EFBIG), which becomes an error. The page cache is shared with the map, so map
        # readers see these bytes at once, and msync of a range writes them back however
        # they were dirtied.
        _call(self.path, f"write of {n:#x} bytes", off, self.system.pwrite, self.fd, data, off)
        if n >= WRITEBACK_MIN:
            self.system.start_writeback(self.fd, off, n)
        if end > self._size:
            self._size = end
            self._size_dirty = True

    def flush(self, ranges: Iterable[Range] | None = None) -> None:
        if not self.writable or not self._size:
            return
        spans = None if ranges is None else [(o, min(n, self._size - o)) for o, n in
                                             merge_ranges(page_span(o, n) for o, n in ranges) if o < self._size]
        if self._size_dirty or spans is None or len(spans) > MSYNC_MAX_RANGES \
                or any(o + n > self._mapped for o, n in spans):
            # Growth (the new size must be durable too), or too many ranges: one fsync
            # covers every dirty page of the file, however it was written.
            _call(self.path, "fsync", None, self.system.fsync, self.fd)
            self._size_dirty = False
            return
        for start, length in spans:
            if length > 0:
                _call(self.path, f"msync of {length:#x} bytes", start, self.system.msync, self.fd,
                      self._mapping(start + length), start, length)

    def resize(self, n: int) -> None:
        if n == self._size:
            return
        if n > self._size:
            # Reserve the blocks now: a full disk is an error here, before anything
            # relies on the grown region.
            _call(self.path, f"reserving {n - self._size:#x} bytes", self._size, self.system.fallocate, self.fd,
                  self._size, n - self._size)
        _call(self.path, f"resize to {n:#x} bytes", None, self.system.ftruncate, self.fd, n)
        self._size = n
        self._size_dirty = True
        if n < self._mapped:
            self._remap()

    def mark(self, name: str) -> None:
        """A named point in the write sequence, after it; only a recording medium keeps it."""

    def event(self, name: str) -> None:
        """What the next writes are, announced before them; only a fault-injecting medium uses it."""

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        os.close(self.fd)


class MemoryMedium:
    """An in-memory medium (for tests and the crash simulator)."""

    def __init__(self, data: bytes = b"") -> None:
        self.buf = bytearray(data)

    @property
    def size(self) -> int:
        return len(self.buf)

    def read(self, off: int, n: int) -> bytes:
        if off < 0 or off + n > len(self.buf):
            raise ValueError(f"range {off:#x}+{n:#x} outside the medium of {len(self.buf):#x} bytes")
        return bytes(self.buf[off:off + n])

    def array(self, off: int, count: int, dtype: str) -> np.ndarray:
        return np.frombuffer(self.read(off, count * np.dtype(dtype).itemsize), dtype=dtype).copy()

    def write(self, off: int, data: bytes) -> None:
        if off + len(data) > len(self.buf):
            self.resize(off + len(data))
        self.buf[off:off + len(data)] = bytes(data)

    def flush(self, ranges: Iterable[Range] | None = None) -> None:
        pass

    def resize(self, n: int) -> None:
        if n < len(self.buf):
            del self.buf[n:]
        else:
            self.buf.extend(bytes(n - len(self.buf)))

    def mark(self, name: str) -> None:
        pass

    def event(self, name: str) -> None:
        pass

    def close(self) -> None:
        pass


def read_rows(m: Medium, offsets: np.ndarray, size: int) -> np.ndarray:
    """``size`` bytes at each of ``offsets``, as the rows of a ``(len(offsets), size)``
    uint8 array (a copy): the tables a scan of many of them needs, read at once. From an
    :class:`MmapMedium`, with cluster-aligned offsets, a numpy gather (32,768 L2 tables of
    512 bytes: one call instead of 32,768); from any other medium, one read per row."""
    offsets = np.asarray(offsets, dtype=np.int64)
    if isinstance(m, MmapMedium) and size and not (offsets % size).any():
        return m.rows(offsets, size)
    out = np.empty((len(offsets), size), np.uint8)
    for i, off in enumerate(offsets.tolist()):
        out[i] = np.frombuffer(m.read(off, size), np.uint8)
    return out


def _call(path: str, what: str, off: int | None, fn: Callable[..., None], *args: Any) -> None:
    """``fn(*args)``, a system call of a medium; its OSError becomes a one-line MediumError."""
    try:
        fn(*args)
    except OSError as e:
        raise MediumError.of(path, what, off, e) from None


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, off: int) -> None:
    """Write all of ``data`` at ``off`` (one pwrite may write less: at most 2 GiB on Linux)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], off + done)


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, coalesced ``(offset, length)`` ranges (touching ones are merged too).

    >>> merge_ranges([(10, 5), (0, 4), (4, 2), (12, 1)])
    [(0, 6), (10, 5)]
    """
    out: list[list[int]] = []
    for off, n in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], off + n - out[-1][0])
        else:
            out.append([off, n])
    return [(o, n) for o, n in out]


class FileMedium:
    """A plain file written with pwrite and made durable with fdatasync (the journal)."""

    def __init__(self, path: str | os.PathLike[str], writable: bool, create: bool = False,
                 system: System = SYSTEM) -> None:
        self.path = os.fspath(path)
        self.writable = writable
        self.system = system
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT
        self.fd = os.open(self.path, flags, 0o644)
        self._size = os.fstat(self.fd).st_size
        self._size_dirty = False

    @property
    def size(self) -> int:
        return self._size

    def read(self, off: int, n: int) -> bytes:
        if off < 0 or off + n > self._size:
            raise ValueError(f"range {off:#x}+{n:#x} outside {self.path} of {self._size:#x} bytes")
        return os.pread(self.fd, n, off)

    def array(self, off: int, count: int, dtype: str) -> np.ndarray:
        return np.frombuffer(self.read(off, count * np.dtype(dtype).itemsize), dtype=dtype).copy()

    def write(self, off: int, data: bytes) -> None:
        if not self.writable:
            raise PermissionError(f"{self.path} is open read-only")
        _call(self.path, f"write of {len(data):#x} bytes", off, self.system.pwrite, self.fd, data, off)
        if len(data) >= WRITEBACK_MIN:
            self.system.start_writeback(self.fd, off, len(data))
        if off + len(data) > self._size:
            self._size = off + len(data)
            self._size_dirty = True

    def flush(self, ranges: Iterable[Range] | None = None) -> None:
        if not self.writable:
            return
        if self._size_dirty:
            _call(self.path, "fsync", None, self.system.fsync, self.fd)
            self._size_dirty = False
        else:
            _call(self.path, "fdatasync", None, self.system.fdatasync, self.fd)

    def resize(self, n: int) -> None:
        _call(self.path, f"resize to {n:#x} bytes", None, self.system.ftruncate, self.fd, n)
        self._size = n
        self._size_dirty = True

    def mark(self, name: str) -> None:
        pass

    def event(self, name: str) -> None:
        pass

    def close(self) -> None:
        os.close(self.fd)


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Make the directory entry of ``path`` durable."""
    fd = os.open(os.path.dirname(os.path.abspath(os.fspath(path))) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

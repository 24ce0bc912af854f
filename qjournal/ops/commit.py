"""Write an overlay's data down into a backing file, as ``qemu-img commit`` does.

What ``qemu-img commit [-b BASE] [-d] TOP`` does (qemu-img.c ``img_commit``, the commit
job of block/mirror.c, block/qcow2.c ``qcow2_make_empty``), and how qjournal does it:

1. **Find the base**: TOP's backing file, or the image of TOP's chain named by ``-b``
   (matched by its real path). ``-b`` implies ``-d``, as in qemu-img. A TOP without a
   backing file, or a BASE not in its chain, is refused before anything is written.
2. **Grow the base** to TOP's size if it is smaller (qcow2: a journaled resize; raw:
   the file is extended).
3. **Copy down** every range allocated in TOP or in an image between TOP and BASE:
   data is read through TOP's guest reader and written to BASE, a zero cluster becomes
   a zero write. A qcow2 base is written through its own journaled transactions, one
   per :data:`BATCH` bytes: enabled persistent bitmaps in BASE get the written ranges,
   as QEMU's do. A raw base is written in place and synced at the end.
4. **Empty TOP** (not with ``-d``): every L1 entry of TOP is dropped and what only it
   referenced is freed, in one transaction (L1 entries cleared, then the refcounts
   go down), so that every guest range reads from the backing file, as after
   ``qemu-img commit`` (which truncates the file; qjournal leaves its clusters free).

A crash between the steps loses nothing: until TOP is emptied, TOP still holds every
range it had, and the base's ranges under them are not visible through TOP.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator

from ..format.lazy import np
from ..core.image import Image
from ..core.ordering import Phase
from ..errors import UnsupportedError, UsageError
from ..format.header import MAGIC
from ..format.tables import L1_ENTRY_SIZE, L1E_OFFSET_MASK, OFLAG_COPIED, l2_entries
from ..read.guest import UNALLOCATED, ZERO, GuestReader, reader, resolve
from ..write import data

BATCH = 64 << 20
"""Bytes copied into a qcow2 base per journaled transaction."""
PIECE = 4 << 20
"""Bytes read from TOP at a time."""

Range = tuple[int, int, bool]
"""``(guest offset, length, reads as zeros)``."""


def chain(top: Image) -> list[tuple[str, str]]:
    """The backing chain below ``top``, nearest first: ``(path, format)``, format ``qcow2``
    or ``raw`` (probed by the magic when the image does not name it). Refuses a loop."""
    out: list[tuple[str, str]] = []
    seen = {os.path.realpath(top.path)}
    img: Image | None = top
    opened: list[Image] = []
    try:
        while img is not None and img.backing_name is not None:
            path = resolve(img.path, img.backing_name.decode("utf-8", "surrogateescape"))
            fmt = img.backing_format or _probe(path)
            real = os.path.realpath(path)
            if real in seen:
                raise UsageError(f"{top.path}: the backing chain loops back to {path!r}")
            seen.add(real)
            out.append((path, fmt))
            if fmt != "qcow2":
                break
            img = Image(path, "r", take_locks=False)
            opened.append(img)
    finally:
        for im in opened:
            im.close()
    return out


def _probe(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return "qcow2" if f.read(len(MAGIC)) == MAGIC else "raw"
    except OSError as e:
        raise UsageError(f"cannot open backing file {path!r}: {e.strerror}") from None


def find_base(top: Image, base: str | None) -> tuple[str, str]:
    """The image ``qemu-img commit [-b BASE] TOP`` writes into: ``(path, format)``."""
    below = chain(top)
    if not below:
        raise UsageError(f"{top.path}: image does not have a backing file")
    if base is None:
        return below[0]
    want = os.path.realpath(base)
    for path, fmt in below:
        if os.path.realpath(path) == want:
            return path, fmt
    raise UsageError(f"did not find {base!r} in the backing chain of {top.path!r}")


def allocated_above(r: GuestReader, base_path: str, start: int, end: int) -> Iterator[Range]:
    """The ranges of ``[start, end)`` allocated in ``r``'s image or in an image of its chain
    above ``base_path`` (``bdrv_is_allocated_above``), with whether they read as zeros."""
    want = os.path.realpath(base_path)
    for g, n, kind, _ in r.runs(start, end):
        if kind != UNALLOCATED:
            yield g, n, kind == ZERO
            continue
        img = r.img
        if img.backing_name is None:
            continue
        below = resolve(img.path, img.backing_name.decode("utf-8", "surrogateescape"))
        if os.path.realpath(below) == want:
            continue
        backing = r.backing
        if not isinstance(backing, GuestReader):
            raise UnsupportedError(f"{below}: an image between the top and the base must be qcow2")
        stop = min(g + n, backing.size)
        if stop > g:
            yield from allocated_above(backing, base_path, g, stop)


class Target:
    """Where the data goes: a qcow2 image (open ``r+``) or a raw file."""

    def __init__(self, image: Image | None = None, raw_path: str | None = None) -> None:
        self.image = image
        self.fd = -1
        if raw_path is not None:
            self.fd = os.open(raw_path, os.O_RDWR)

    @property
    def size(self) -> int:
        if self.image is not None:
            return int(self.image.header.size)
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def commit(top: Image, base: Target, base_path: str, drop: bool = False,
           progress: Callable[[int, int], None] | None = None,
           grow: Callable[[int], None] | None = None) -> int:
    """Copy what ``top`` holds above ``base_path`` into ``base`` (steps 2 and 3), then
    empty ``top`` unless ``drop`` (step 4). ``grow(size)`` resizes a qcow2 base (the
    façade's resize); ``progress(done, total)`` follows the copy. Returns the bytes copied.
    """
    if not drop:
        if not top.writable:
            raise UsageError(f"{top.path}: open the top image writable to empty it, or pass drop")
        if top.header.has_data_file:
            raise UnsupportedError(f"{top.path}: emptying an image with an external data file is not "
                                   "supported (use -d)")
    size = int(top.header.size)
    r = reader(top)
    ranges = list(allocated_above(r, base_path, 0, size))
    total = sum(n for _, n, _ in ranges)
    if base.size < size:
        if base.image is not None:
            if grow is None:
                raise UsageError(f"{base_path}: the base is smaller than {top.path} and cannot grow here")
            grow(size)
        else:
            os.ftruncate(base.fd, size)
    done = 0
    if base.image is not None:
        done = _copy_qcow2(r, base.image, ranges, total, progress)
    else:
        done = _copy_raw(r, base.fd, ranges, total, progress)
    if not drop:
        empty(top)
    return done


def _copy_qcow2(r: GuestReader, base: Image, ranges: list[Range], total: int,
                progress: Callable[[int, int], None] | None) -> int:
    done = 0
    i = 0
    while i < len(ranges):
        batch = 0
        # One journaled transaction per batch: the bitmaps' bits, the new clusters'
        # refcounts, L2 and L1 entries of the batch become durable together.
        with base.transaction("commit: data from the overlay"):
            while i < len(ranges) and batch < BATCH:
                g, n, zero = ranges[i]
                if zero:
                    data.write_zeroes(base, g, n)
                else:
                    for off in range(g, g + n, PIECE):
                        m = min(PIECE, g + n - off)
                        data.write(base, off, r.read(off, m))
                batch += n
                done += n
                i += 1
        if progress is not None:
            progress(done, total)
    return done


def _copy_raw(r: GuestReader, fd: int, ranges: list[Range], total: int,
              progress: Callable[[int, int], None] | None) -> int:
    done = 0
    buf = bytearray(PIECE)
    for g, n, zero in ranges:
        for off in range(g, g + n, PIECE):
            m = min(PIECE, g + n - off)
            view = memoryview(buf)[:m]
            if zero:
                view[:] = bytes(m)
            else:
                r.readinto(off, view)
            os.pwrite(fd, view, off)
        done += n
        if progress is not None:
            progress(done, total)
    os.fsync(fd)
    return done


def empty(img: Image) -> None:
    """Make every guest range of ``img`` unallocated (it reads from the backing file), in one
    transaction: the L1 entries are cleared (step l1-updated), then the L2 tables and the
    data only they referenced are freed (clusters-freed); a crash in between leaks them.
    An L2 table a snapshot shares loses one reference and keeps its data."""
    h = img.header
    cs, ext = h.cluster_size, h.extended_l2
    per_l2 = l2_entries(cs, ext)
    words = 2 if ext else 1
    l1 = img.l1_table()
    used = np.nonzero(l1 & np.uint64(L1E_OFFSET_MASK))[0].tolist()
    if not used:
        return
    with img.transaction("commit: empty the overlay") as tx:
        writes = []
        for l1i in used:
            l1e = int(l1[l1i])
            toff = l1e & L1E_OFFSET_MASK
            if l1e & OFLAG_COPIED:
                raw = img.medium.array(toff, per_l2 * words, ">u8").astype(np.uint64)
                for entry in raw[::words][np.nonzero(raw[::words])[0]].tolist():
                    tx.alloc.free_entry(entry)
            tx.alloc.free(toff, 1)
            writes.append((h.l1_table_offset + L1_ENTRY_SIZE * l1i, bytes(L1_ENTRY_SIZE)))
        tx.stage(Phase.L1_UPDATED, writes)

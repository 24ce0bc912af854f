"""The map of a guest disk, entry for entry what ``qemu-img map`` (QEMU 7.2) prints.

Each entry is a maximal run of guest bytes that agree on five things, as qemu-img's
``get_block_status`` works them out layer by layer down the backing chain:

- ``depth``: the layer that decides the bytes (0 the image itself, 1 its backing file, ...);
- ``present``: that layer allocates them (data or zeros) rather than deferring below;
- ``zero``: they read as zeros; ``data``: they read from a file, not as implicit zeros;
- ``offset`` (only when known): where they lie in that layer's file (the data file, when
  the image has one). Compressed and encrypted clusters have none.

Rules of QEMU's block layer (block/io.c ``bdrv_co_block_status``) that shape the output:

- An unallocated range with no backing file, or at or past the end of the backing
  file, is ``zero`` but not ``present``, at the depth of the layer that has it.
  A backing file's length is its size rounded up to a whole sector (512 bytes).
- A raw file (a raw backing file) reports holes (``SEEK_HOLE``, and everything past
  its end) as ``zero`` and the rest as ``data``, with offsets equal to guest offsets.
- When a qcow2 layer looks *metadata-preallocated* (more clusters have a refcount
  than the file has blocks: ``qcow2_detect_metadata_preallocation``), its data
  clusters are also looked up in their file, and the parts in holes or past the end
  of the file are reported ``zero`` as well as ``data``.

Adjacent entries merge when all five agree and the offsets are contiguous in the
same file, exactly as qemu-img's ``entry_mergeable`` decides.
"""
from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

from ..format.lazy import np
from ..core.allocator import Allocator
from ..errors import FormatError
from ..format import refcount as rc
from ..format.geometry import SECTOR, STAT_BLOCK
from .guest import COMPRESSED, DATA, ZERO, GuestReader, Layer, RawFile, reader

if TYPE_CHECKING:
    from ..core.image import Image


class MapEntry(NamedTuple):
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None  # None when qemu-img prints no offset
    filename: str | None  # the file ``offset`` refers to (qemu-img's human output prints it)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"start": self.start, "length": self.length, "depth": self.depth,
                             "present": self.present, "zero": self.zero, "data": self.data}
        if self.offset is not None:
            d["offset"] = self.offset
        return d


def map_image(img: "Image", start: int = 0, length: int | None = None) -> list[dict[str, Any]]:
    """``qemu-img map --output=json`` of ``img`` as a list of dicts, same keys, same entries.

    ``start`` and ``length`` are qemu-img's ``--start-offset`` and ``--max-length``.
    Cost: one pass over the L2 tables of the range (and of the backing chain where the
    image is unallocated), plus two ``lseek`` per data extent of a raw layer.
    """
    return [e.to_json() for e in entries(img, start, length)]


def entries(img: "Image", start: int = 0, length: int | None = None) -> list[MapEntry]:
    """The map of ``img`` as :class:`MapEntry` tuples (see :func:`map_image`)."""
    size = img.header.size
    end = size if length is None else min(size, start + length)
    out: list[MapEntry] = []
    with _Walk() as walk:
        cur: MapEntry | None = None
        for e in walk.layer(reader(img), start, end, 0):
            if cur is not None and _mergeable(cur, e):
                cur = cur._replace(length=cur.length + e.length)
                continue
            if cur is not None:
                out.append(cur)
            cur = e
    # qemu-img prints one empty entry for an empty range
    out.append(cur if cur is not None else MapEntry(start, 0, 0, False, False, False, None, None))
    return out


def _mergeable(a: MapEntry, b: MapEntry) -> bool:
    if (a.depth, a.present, a.zero, a.data, a.filename) != (b.depth, b.present, b.zero, b.data, b.filename):
        return False
    if (a.offset is None) != (b.offset is None):
        return False
    return a.offset is None or b.offset == a.offset + a.length


class _Walk:
    """One map: the file descriptors and preallocation verdicts it needs, closed at the end."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._prealloc: dict[str, bool] = {}

    def __enter__(self) -> "_Walk":
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)

    def _fd(self, path: str) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def layer(self, layer: Layer, start: int, end: int, depth: int) -> Iterator[MapEntry]:
        if isinstance(layer, GuestReader):
            yield from self.qcow2(layer, start, end, depth)
        else:
            assert isinstance(layer, RawFile)
            for pos, n, is_data in extents(layer.fd, layer.file_size, start, end):
                yield MapEntry(pos, n, depth, True, not is_data, is_data, pos, layer.path)

    def qcow2(self, r: GuestReader, start: int, end: int, depth: int) -> Iterator[MapEntry]:
        crypt = r.encrypted
        data_file = r.data_file
        host_path = data_file.path if data_file is not None else r.path
        for g, n, kind, host in r.runs(start, end):
            off = host if host >= 0 and kind != COMPRESSED and not crypt else None
            if kind == ZERO and host == 0 and not r.extended:
                # QEMU: a zero entry with offset 0 is a plain zero cluster, even in a data
                # file (the zero flag is tested first); the rest of the run keeps its offsets.
                head = min(n, r.cs - g % r.cs)
                yield MapEntry(g, head, depth, True, True, False, None, None)
                g, n, off = g + head, n - head, head
                if not n:
                    continue
            name = host_path if off is not None else None
            if kind == DATA:
                if off is not None and self._preallocated(r):
                    fd = data_file.fd if data_file is not None else self._fd(r.path)
                    size = data_file.file_size if data_file is not None else os.fstat(fd).st_size
                    for pos, m, is_data in extents(fd, size, off, off + n):
                        yield MapEntry(g + pos - off, m, depth, True, not is_data, True, pos, name)
                else:
                    yield MapEntry(g, n, depth, True, False, True, off, name)
            elif kind == COMPRESSED:
                yield MapEntry(g, n, depth, True, False, True, None, None)
            elif kind == ZERO:
                yield MapEntry(g, n, depth, True, True, False, off, name)
            else:
                backing = r.backing
                mid = g if backing is None else min(g + n, max(g, backing.size))
                if backing is not None and mid > g:
                    yield from self.layer(backing, g, mid, depth + 1)
                if mid < g + n:
                    rest = off + (mid - g) if off is not None else None
                    yield MapEntry(mid, g + n - mid, depth, False, True, False, rest, name)

    def _preallocated(self, r: GuestReader) -> bool:
        if r.path not in self._prealloc:
            self._prealloc[r.path] = metadata_preallocated(r.img)
        return self._prealloc[r.path]


def metadata_preallocated(img: "Image") -> bool:
    """QEMU's ``qcow2_detect_metadata_preallocation``: do more clusters of the file have a
    refcount than ``max(blocks * 10 / 9, blocks + 2)``, blocks being the clusters' worth
    of space the file really occupies? (False when the refcounts cannot be read.)
    """
    h = img.header
    cs = h.cluster_size
    st = os.stat(img.path)
    real_clusters = st.st_blocks * STAT_BLOCK // cs
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end_cluster = -(-(-(-st.st_size // SECTOR) * SECTOR) // cs)
    medium = img.reader
    try:
        alloc = Allocator(medium, h.cluster_bits, h.refcount_order, h.refcount_table_offset,
                          h.refcount_table_clusters)
    except FormatError:
        return False
    count = 0
    for bi, off in enumerate(alloc.reftable.tolist()):
        first = bi * alloc.epb
        if first >= end_cluster or count >= threshold:
            break
        if off:
            counts = rc.unpack_entries(medium.read(off, cs), h.refcount_order, 0,
                                       min(alloc.epb, end_cluster - first))
            count += int(np.count_nonzero(counts))
    return count >= threshold


def extents(fd: int, file_size: int, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """``(offset, length, is_data)`` covering ``[start, end)`` of a file, as QEMU's file
    driver reports them: ``SEEK_DATA``/``SEEK_HOLE`` extents, everything from the end of
    the file on a hole, and data wherever the file system cannot tell."""
    pos = start
    while pos < end:
        if pos >= file_size:
            yield pos, end - pos, False
            return
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            yield pos, end - pos, e.errno != errno.ENXIO  # ENXIO: a trailing hole
            return
        if data > pos:
            nxt = min(data, end)
            yield pos, nxt - pos, False
            pos = nxt
            continue
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError:
            hole = end
        if hole <= pos:
            hole = end
        nxt = min(hole, end)
        yield pos, nxt - pos, True
        pos = nxt


def format_json(entries: list[MapEntry]) -> str:
    """The text ``qemu-img map --output=json`` prints (one entry a line)."""
    lines = []
    for e in entries:
        s = (f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, '
             f'"present": {_b(e.present)}, "zero": {_b(e.zero)}, "data": {_b(e.data)}')
        if e.offset is not None:
            s += f', "offset": {e.offset}'
        lines.append(s + "}")
    return "[" + ",\n".join(lines) + "]\n"


def _b(v: bool) -> str:
    return "true" if v else "false"


def _hex(v: int) -> str:
    """C's ``%#-16x``: no 0x prefix for zero."""
    return f"{v:#x}" if v else "0"


def format_human(entries: list[MapEntry]) -> Iterator[str]:
    """The lines ``qemu-img map`` prints, the header first. Data without an offset
    (compressed, encrypted) cannot be shown: raises ``ValueError`` when reaching it,
    after the lines before it."""
    yield f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"
    for e in entries:
        if e.data and e.offset is None:
            raise ValueError("File contains external, encrypted or compressed clusters.")
        if e.data and not e.zero:
            yield f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset or 0):<16}{e.filename or ''}"

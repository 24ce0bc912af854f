"""Guest reads: the bytes the guest sees at any offset of the virtual disk, as QEMU reads them.

How a guest byte is found (docs/interop/qcow2.txt, "Cluster mapping" and "Extended L2
Entries"; block/qcow2-cluster.c ``qcow2_get_host_offset`` for QEMU's behaviour):

====================  ==================================================================
L1 entry 0, or past   unallocated: the backing chain, or zeros without one
the L1 table
L2 entry (standard)   bit 62 set: compressed (zlib raw deflate or zstd, one cluster);
                      bit 0 set (v3 only): reads as zeros, whatever the offset says;
                      offset (bits 9..55) set, or offset 0 with bit 63 in an image with
                      an external data file: data at that host offset;
                      otherwise unallocated
L2 entry (extended)   the same, but bit 0 is unused and a second u64 says, for each of
                      32 subclusters, "allocated" (bit n) or "reads as zeros" (bit 32+n)
====================  ==================================================================

Unallocated ranges read from the backing file (a qcow2 image, opened read-only with
QEMU's read lock, or a raw file); past the backing file's end they read as zeros.
Host offsets index the external data file when the image has one. A data cluster may
end past the end of its file (QEMU does not write the tail of a fresh cluster): that
tail reads as zeros, as QEMU reads it.

An entry that QEMU would refuse to read (an unaligned host offset, a subcluster both
allocated and zero, a compressed cluster that does not decompress to one cluster) or
that breaks the spec (reserved bits, a zero flag in a v2 image, data past the end of
the file) raises :class:`~qjournal.errors.FormatError` naming the table, the entry's
offset and the rule; only the entries a read touches are checked, so the rest of a
damaged disk stays readable.

Cost: one pass of numpy over the L2 entries a request touches (decoded tables are
kept in an LRU of 32 MiB), one ``pread`` per run of host-contiguous data straight
into the caller's buffer (shared between threads from 4 MiB on), one decompression
per compressed cluster. Guest data is never read through the memory map, so a
sequential read of a large disk does not grow the process's resident set.

A :class:`GuestReader` is not meant for use from several threads at once.
"""
from __future__ import annotations

import os
import weakref
import zlib
from collections import OrderedDict
from typing import Any, Iterable, Iterator, Protocol

from ..format.lazy import futures, np
from ..errors import FormatError, UnsupportedError, UsageError
from ..format.geometry import SECTOR
from ..format.header import AUTOCLEAR_DATA_FILE_RAW, COMPRESSION_ZSTD, MAGIC
from ..format.tables import (COMPRESSED_DESCRIPTOR_MASK, EXTL2_ENTRY_SIZE, HOST_OFFSET_LIMIT, L1E_OFFSET_MASK,
                            L1E_RESERVED_MASK, L2_ENTRY_SIZE, L2E_OFFSET_MASK, L2E_RESERVED_MASK, OFLAG_COMPRESSED,
                            OFLAG_COPIED, OFLAG_ZERO, SUBCLUSTERS, compressed_geometry, compressed_span, l2_entries)
from ..core.image import Image
from ..storage.medium import MmapMedium


# What a run of guest bytes is (the ``kind`` of a :class:`Run`).
UNALLOCATED = 0  # the backing chain, or zeros
ZERO = 1  # reads as zeros
DATA = 2  # host data at ``host``
COMPRESSED = 3  # ``host`` is the compressed cluster descriptor (L2 entry bits 0..61)

Run = tuple[int, int, int, int]
"""``(guest offset, length, kind, host)``. ``host`` is -1 when the entry has no host
offset; an unallocated or zero run may have one (a preallocated cluster)."""

PARALLEL_MIN = 4 << 20  # a read of at least this much data (smaller shares cost more than they gain) ...
PARALLEL_THREADS = min(4, os.cpu_count() or 1)  # ... is shared between this many threads, the caller's included
L2_CACHE_BYTES = 32 << 20
RUN_UNITS = 1 << 16  # units (subclusters or clusters) classified at a time: ~3 MiB of numpy temporaries


# Rules an L2 entry can break, by code (the lowest code that applies is reported).
_RULES = {
    1: "reserved bits {reserved:#x} are set",
    2: "host cluster offset {offset:#x} is unaligned (not a multiple of the cluster size)",
    3: "compressed cluster in an image with an external data file",
    4: "compressed cluster offset {coffset:#x} has bits above bit 55 set",
    5: "zero flag (bit 0) set in a version 2 image",
    6: "subcluster bitmap {bitmap:#018x} marks a subcluster both allocated and zero",
    7: "subcluster bitmap {bitmap:#018x} marks subclusters allocated in an unallocated cluster",
    8: "subcluster bitmap {bitmap:#018x} of a compressed cluster is not 0",
    9: "with data_file_raw the host offset {offset:#x} must equal the guest offset {guest:#x}",
}


class Layer(Protocol):
    """What a backing file offers its overlay: a size and reads."""

    path: str

    @property
    def size(self) -> int: ...
    def readinto(self, offset: int, buf: memoryview) -> None: ...
    def close(self) -> None: ...


Job = tuple[int, int, memoryview]
"""A read to make: ``(file descriptor, offset, destination)``."""


def pread_exact(fd: int, off: int, view: memoryview) -> None:
    """Fill ``view`` from ``fd`` at ``off``; what lies past the end of the file reads as zeros."""
    done, n = 0, len(view)
    while done < n:
        got = os.preadv(fd, [view[done:]], off + done)
        if got == 0:
            np.frombuffer(view, dtype=np.uint8)[done:] = 0
            return
        done += got


_pool: tuple[int, futures.ThreadPoolExecutor] | None = None


def _executor() -> futures.ThreadPoolExecutor:
    """The reader threads of this process (made anew in a forked child, which has none)."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), futures.ThreadPoolExecutor(PARALLEL_THREADS - 1, thread_name_prefix="qjournal-read"))
    return _pool[1]


def run_preads(jobs: list[Job]) -> None:
    """Run the reads; together at least ``PARALLEL_MIN`` bytes, they are cut into one
    equal share per thread and read at once (``preadv`` releases the GIL, so the copies
    from the page cache proceed on several cores, as QEMU's do)."""
    total = sum(len(v) for _, _, v in jobs)
    if total < PARALLEL_MIN or PARALLEL_THREADS < 2:
        _run(jobs)
        return
    share = -(-total // PARALLEL_THREADS)
    shares: list[list[Job]] = [[]]
    room = share
    for fd, off, view in jobs:
        pos = 0
        while pos < len(view):
            take = min(room, len(view) - pos)
            shares[-1].append((fd, off + pos, view[pos:pos + take]))
            pos += take
            room -= take
            if not room:
                shares.append([])
                room = share
    pool = _executor()
    futures = [pool.submit(_run, s) for s in shares[1:] if s]
    _run(shares[0])
    for f in futures:
        f.result()


def _run(jobs: list[Job]) -> None:
    for job in jobs:
        pread_exact(*job)


class RawFile:
    """A plain file read with ``pread``: a raw backing file or an external data file.

    Bytes past its end read as zeros (QEMU pads short reads of a file with zeros).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise UsageError(f"{path!r}: cannot open: {e.strerror}", path=path) from None
        self.file_size = os.lseek(self.fd, 0, os.SEEK_END)  # a block device's too

    @property
    def size(self) -> int:
        """The length QEMU gives it: the file's, rounded up to a whole sector."""
        return -(-self.file_size // SECTOR) * SECTOR

    def readinto(self, offset: int, buf: memoryview) -> None:
        run_preads([(self.fd, offset, buf)])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def resolve(image_path: str, name: str) -> str:
    """A file named in an image, as QEMU finds it: absolute, or relative to the image's folder."""
    if ":" in name.split("/")[0]:
        raise UnsupportedError(f"{image_path}: {name!r} names a protocol (json:, nbd:, ...), "
                               "which qjournal does not open")
    return name if os.path.isabs(name) else os.path.join(os.path.dirname(image_path), name)


class _L2:
    """One decoded L2 table: entries, subcluster bitmaps (extended L2) and broken rules."""

    __slots__ = ("offset", "entries", "bitmaps", "bad")

    def __init__(self, offset: int, entries: np.ndarray, bitmaps: np.ndarray | None, bad: np.ndarray) -> None:
        self.offset = offset
        self.entries = entries
        self.bitmaps = bitmaps
        self.bad = bad  # uint8 rule code per entry, 0 where the entry is sound


class GuestReader:
    """Reads the guest disk of one open image (and, through it, its backing chain).

    Derived state (the L1 table, decoded L2 tables, the backing chain and data file)
    is dropped whenever the image reloads its header, i.e. after every transaction.
    Use :func:`reader` to share one per image.
    """

    def __init__(self, img: "Image", chain: tuple[str, ...] = ()) -> None:
        # Weak, so that a reader kept for an image (see :func:`reader`) does not keep it alive.
        self._img = weakref.ref(img)
        self.path = img.path
        self._chain = chain + (os.path.realpath(img.path),)
        self._header: Any = None
        self._backing: Layer | None = None
        self._backing_open = False
        self._data: RawFile | None = None
        self._owned_images: list["Image"] = []
        self._reset()

    # -- state ----------------------------------------------------------------
    @property
    def img(self) -> "Image":
        img = self._img()
        if img is None:
            raise UsageError(f"{self.path}: the image was closed")
        return img

    def _reset(self) -> None:
        img = self.img
        h = img.header
        self._header = h
        self.cs = cs = h.cluster_size
        self.cluster_bits = h.cluster_bits
        self.extended = h.extended_l2
        self.upc = SUBCLUSTERS if self.extended else 1
        self.unit = cs // self.upc
        self.per_table = l2_entries(cs, self.extended)
        self.table_span = self.per_table * cs
        self.version = h.version
        self.has_data_file = h.has_data_file
        self.data_file_raw = bool(h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW) and h.has_data_file
        self.encrypted = bool(h.crypt_method)
        self._l1: np.ndarray | None = None
        self._l2s: OrderedDict[int, _L2] = OrderedDict()  # by L1 index, least recently used first
        self._l2_max = max(16, L2_CACHE_BYTES // cs)
        self._cluster: tuple[int, bytes] | None = None
        self._zstd: Any = None
        self._close_files()

    def _refresh(self) -> None:
        if self._header is not self.img.header:
            self._reset()

    @property
    def size(self) -> int:
        """The virtual disk size in bytes."""
        return int(self.img.header.size)

    def close(self) -> None:
        """Close the backing chain and data file this reader opened (not the image)."""
        self._close_files()

    def _close_files(self) -> None:
        if self._backing is not None:
            self._backing.close()
        self._backing, self._backing_open = None, False
        for im in self._owned_images:
            im.close()
        self._owned_images = []
        if self._data is not None:
            self._data.close()
            self._data = None

    # -- files under the image ----------------------------------------------------
    @property
    def backing(self) -> Layer | None:
        """The backing file as a :class:`Layer`, opened on first use; None without one.
        Follows the header: after a transaction that changed the backing file, the new one."""
        self._refresh()
        if not self._backing_open:
            self._backing = self._open_backing()
            self._backing_open = True
        return self._backing

    def _open_backing(self) -> Layer | None:
        img = self.img
        if img.backing_name is None:
            return None
        name = img.backing_name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        path = resolve(img.path, name)
        fmt = img.backing_format
        if fmt is None:
            try:
                with open(path, "rb") as f:
                    fmt = "qcow2" if f.read(4) == MAGIC else "raw"
            except OSError as e:
                raise UsageError(f"{img.path}: cannot open backing file {path}: {e.strerror}") from None
        if fmt == "raw":
            return RawFile(path)
        if fmt != "qcow2":
            raise UnsupportedError(f"{img.path}: backing file {path} has format {fmt!r}; qjournal reads "
                                   "qcow2 and raw backing files only")
        if os.path.realpath(path) in self._chain:
            raise FormatError("backing file name", img.header.backing_file_offset,
                              f"the backing chain loops back to {path}")
        try:
            bimg = Image(path, "r")
        except UsageError as e:
            raise UsageError(f"{img.path}: cannot open backing file: {e}") from None
        self._owned_images.append(bimg)
        return GuestReader(bimg, self._chain)

    @property
    def data_file(self) -> RawFile | None:
        """The external data file, opened on first use; None when the image has none."""
        self._refresh()
        if self._data is None and self.has_data_file:
            assert self.img.data_file is not None
            self._data = RawFile(resolve(self.img.path, self.img.data_file))
        return self._data

    def _host_read(self, g: int, off: int, view: memoryview) -> Job | None:
        """Data clusters: ``view`` (guest offset ``g``) from the host file at ``off``, zeros past its end.

        Returns the read as a pread job when the host file has a descriptor (the caller
        runs the jobs, perhaps in parallel); otherwise copies through the medium.
        """
        n = len(view)
        data = self.data_file
        medium = self.img.reader
        size = data.file_size if data is not None else medium.size
        last = (off + n - 1) & ~(self.cs - 1)
        if last >= size:
            # A cluster wholly past the end of the file was never written: corrupt.
            raise self._entry_error(g + last - off, f"data cluster at {last:#x} lies past the end of "
                                    f"{data.path if data is not None else self.path} ({size:#x} bytes)")
        if data is not None:
            return data.fd, off, view
        if isinstance(medium, MmapMedium):
            # pread, not the map: one copy, and no resident pages left behind.
            return medium.fd, off, view
        avail = min(n, size - off)
        view[:avail] = medium.read(off, avail)
        if avail < n:
            np.frombuffer(view, dtype=np.uint8)[avail:] = 0
        return None

    # -- tables -----------------------------------------------------------------
    def _staged(self) -> Any:
        """The guest mapping an open transaction of the image has staged, if any."""
        tx = self.img.staged
        return tx.guest if tx is not None else None

    def _l1_table(self) -> np.ndarray:
        gm = self._staged()
        if gm is not None:
            l1: np.ndarray = gm.l1
            return l1
        if self._l1 is None:
            self._l1 = self.img.l1_table()
        return self._l1

    def _l2(self, index: int) -> _L2 | None:
        """The L2 table of L1 entry ``index``; None when it is unallocated."""
        gm = self._staged()
        if gm is not None and index in gm.tables:
            w = gm.tables[index].words
            entries, bitmaps = (w[0::2].copy(), w[1::2].copy()) if self.extended else (w, None)
            return _L2(gm.tables[index].offset, entries, bitmaps, self._rules(index, entries, bitmaps))
        l1 = self._l1_table()
        if index >= len(l1):
            return None
        e = int(l1[index])
        where = self.img.header.l1_table_offset + 8 * index
        if e & L1E_RESERVED_MASK:
            raise FormatError("L1 table", where, f"entry {index}: reserved bits {e & L1E_RESERVED_MASK:#x} are set")
        off = e & L1E_OFFSET_MASK
        if not off:
            return None
        cached = self._l2s.get(index)
        if cached is not None:
            self._l2s.move_to_end(index)
            return cached
        cs = self.cs
        if off % cs:
            raise FormatError("L1 table", where, f"entry {index}: L2 table offset {off:#x} is unaligned "
                              "(not a multiple of the cluster size)")
        medium = self.img.reader
        if off + cs > medium.size:
            raise FormatError("L1 table", where, f"entry {index}: L2 table at {off:#x} runs past the end of "
                              f"the file ({medium.size:#x})")
        if isinstance(medium, MmapMedium):
            # pread, as for data: reading tables through the map would leave their pages
            # (and the kernel's fault-around neighbours) resident.
            raw = np.frombuffer(os.pread(medium.fd, cs, off), dtype=">u8").astype(np.uint64)
        else:
            raw = medium.array(off, cs // L2_ENTRY_SIZE, ">u8").astype(np.uint64)
        if self.extended:
            entries, bitmaps = raw[0::2].copy(), raw[1::2].copy()
        else:
            entries, bitmaps = raw, None
        table = _L2(off, entries, bitmaps, self._rules(index, entries, bitmaps))
        self._l2s[index] = table
        if len(self._l2s) > self._l2_max:
            self._l2s.popitem(last=False)
        return table

    def _rules(self, index: int, e: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        """The first rule (a key of ``_RULES``) each entry breaks, 0 where none."""
        comp = (e & np.uint64(OFLAG_COMPRESSED)) != 0
        std = ~comp
        off = e & np.uint64(L2E_OFFSET_MASK)
        alloc = std & self._allocated(e, off)
        masks: list[tuple[int, np.ndarray]] = [
            (1, std & ((e & np.uint64(L2E_RESERVED_MASK)) != 0)),
            (2, alloc & ((off & np.uint64(self.cs - 1)) != 0)),
        ]
        if self.has_data_file:
            masks.append((3, comp))
        coff_mask = compressed_geometry(self.cluster_bits)[0]
        if coff_mask >= HOST_OFFSET_LIMIT:
            masks.append((4, comp & ((e & np.uint64(coff_mask & ~(HOST_OFFSET_LIMIT - 1))) != 0)))
        if self.version < 3 and not self.extended:
            masks.append((5, std & ((e & np.uint64(OFLAG_ZERO)) != 0)))
        if b is not None:
            both = (b & (b >> np.uint64(32)) & np.uint64(0xFFFFFFFF)) != 0
            masks += [(6, alloc & both), (7, std & ~alloc & ((b & np.uint64(0xFFFFFFFF)) != 0)), (8, comp & (b != 0))]
        if self.data_file_raw:
            guest = (np.arange(len(e), dtype=np.uint64) + np.uint64(index * self.per_table)) * np.uint64(self.cs)
            masks.append((9, alloc & (off != guest)))
        codes = np.zeros(len(e), dtype=np.uint8)
        for code, mask in reversed(masks):
            codes[mask] = code
        return codes

    def _allocated(self, e: np.ndarray, off: np.ndarray) -> np.ndarray:
        """Entries with a host cluster (offset 0 counts with bit 63 when there is a data file)."""
        alloc = off != 0
        if self.has_data_file:
            alloc |= (e & np.uint64(OFLAG_COPIED)) != 0
        return alloc

    def _fail(self, table: _L2, index: int, i: int) -> FormatError:
        e = int(table.entries[i])
        b = int(table.bitmaps[i]) if table.bitmaps is not None else 0
        guest = (index * self.per_table + i) * self.cs
        rule = _RULES[int(table.bad[i])].format(
            reserved=e & L2E_RESERVED_MASK, offset=e & L2E_OFFSET_MASK,
            coffset=e & compressed_geometry(self.cluster_bits)[0], bitmap=b, guest=guest)
        return self._entry_error(guest, rule)

    def _entry_error(self, guest: int, rule: str) -> FormatError:
        """A FormatError at the L2 entry that maps guest offset ``guest``."""
        index, i = divmod(guest // self.cs, self.per_table)
        table = self._l2(index)
        assert table is not None
        size = EXTL2_ENTRY_SIZE if self.extended else L2_ENTRY_SIZE
        return FormatError("L2 table", table.offset + size * i,
                           f"entry {i} (guest offset {guest - guest % self.cs:#x}): {rule}")

    # -- classification ---------------------------------------------------------
    def runs(self, start: int, end: int) -> Iterator[Run]:
        """The guest range ``[start, end)`` as maximal runs of one kind and contiguous host offsets.

        Cost: O(entries touched) in numpy, plus O(runs) in Python. Memory: entries are
        classified ``RUN_UNITS`` units (subclusters or clusters) at a time, never a whole
        table at once (an extended L2 table of 256 KiB clusters holds 512 Ki subclusters:
        a map of it peaked at 19 MiB, fuzz case 41000).
        """
        self._refresh()
        pending: list[int] | None = None
        span = self.table_span
        step = max(1, RUN_UNITS // self.upc) * self.cs
        pos = start
        while pos < end:
            t = pos // span
            tend = min(end, (t + 1) * span, pos - pos % step + step)
            for g, n, kind, host in self._table_runs(t, pos, tend):
                if pending is not None and pending[2] == kind and pending[0] + pending[1] == g and (
                        (host < 0 and pending[3] < 0) or
                        (host >= 0 and kind != COMPRESSED and pending[3] + pending[1] == host)):
                    pending[1] += n
                    continue
                if pending is not None:
                    yield pending[0], pending[1], pending[2], pending[3]
                pending = [g, n, kind, host]
            pos = tend
        if pending is not None:
            yield pending[0], pending[1], pending[2], pending[3]

    def _table_runs(self, t: int, start: int, end: int) -> list[Run]:
        table = self._l2(t)
        if table is None:
            return [(start, end - start, UNALLOCATED, -1)]
        base = t * self.table_span
        unit, upc = self.unit, self.upc
        u0 = (start - base) // unit
        u1 = -(-(end - base) // unit)
        c0, c1 = u0 // upc, -(-u1 // upc)
        bad = np.flatnonzero(table.bad[c0:c1])
        if len(bad):
            raise self._fail(table, t, c0 + int(bad[0]))
        if table.bitmaps is None:
            # The common case first: standard clusters of plain data, contiguous on the host.
            e = table.entries[c0:c1]
            off = e & np.uint64(L2E_OFFSET_MASK)
            if int(off[0]) and not (e & np.uint64(OFLAG_COMPRESSED | OFLAG_ZERO)).any() and (
                    len(off) == 1 or bool((np.diff(off) == np.uint64(self.cs)).all())):
                return [(start, end - start, DATA, int(off[0]) + start - (base + c0 * self.cs))]
        kind, host = self._classify(table, c0, c1)
        first = u0 - c0 * upc
        kind = kind[first:first + u1 - u0]
        host = host[first:first + u1 - u0]
        n = len(kind)
        if n > 1:
            step = np.where((host[:-1] >= 0) & (kind[:-1] != COMPRESSED), unit, 0)
            brk = (kind[1:] != kind[:-1]) | (host[1:] != host[:-1] + step)
            # A compressed run never crosses a cluster boundary (two entries may share a descriptor).
            brk |= (kind[1:] == COMPRESSED) & ((np.arange(u0 + 1, u1) % upc) == 0)
            cuts = (np.flatnonzero(brk) + 1).tolist()
        else:
            cuts = []
        out: list[Run] = []
        firsts = [0] + cuts
        kinds, hosts = kind[firsts].tolist(), host[firsts].tolist()   # only each run's first unit
        for lo, hi, k, h in zip(firsts, cuts + [n], kinds, hosts):
            g = max(start, base + (u0 + lo) * unit)
            g_end = min(end, base + (u0 + hi) * unit)
            if h >= 0 and k != COMPRESSED:
                h += g - (base + (u0 + lo) * unit)
            out.append((g, g_end - g, k, h))
        return out

    def _classify(self, table: _L2, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        """(kind uint8, host int64) per unit (subcluster or cluster) of entries ``c0..c1``."""
        e = table.entries[c0:c1]
        comp = (e & np.uint64(OFLAG_COMPRESSED)) != 0
        off = e & np.uint64(L2E_OFFSET_MASK)
        alloc = ~comp & self._allocated(e, off)
        desc = (e & np.uint64(COMPRESSED_DESCRIPTOR_MASK)).astype(np.int64)
        offs = off.astype(np.int64)
        if table.bitmaps is None:
            zero = ~comp & ((e & np.uint64(OFLAG_ZERO)) != 0)
            kind = np.where(comp, COMPRESSED, np.where(zero, ZERO, np.where(alloc, DATA, UNALLOCATED)))
            host = np.where(comp, desc, np.where(alloc, offs, -1))
            return kind.astype(np.uint8), host.astype(np.int64)
        b = table.bitmaps[c0:c1]
        sub_bits = np.arange(SUBCLUSTERS, dtype=np.uint64)
        a_bits = ((b[:, None] >> sub_bits) & np.uint64(1)) != 0
        z_bits = ((b[:, None] >> (sub_bits + np.uint64(32))) & np.uint64(1)) != 0
        sub = np.arange(SUBCLUSTERS, dtype=np.int64) * self.unit
        kind = np.where(comp[:, None], COMPRESSED, np.where(z_bits, ZERO, np.where(a_bits, DATA, UNALLOCATED)))
        host = np.where(comp[:, None], desc[:, None], np.where(alloc[:, None], offs[:, None] + sub, -1))
        return kind.astype(np.uint8).ravel(), host.astype(np.int64).ravel()

    # -- reading ----------------------------------------------------------------
    def _check_request(self, offset: int, length: int) -> None:
        self._refresh()
        size = self.size
        if offset < 0 or length < 0 or offset + length > size:
            raise UsageError(f"{self.path}: read of {length} bytes at offset {offset} lies outside the "
                             f"{size}-byte disk")
        if self.encrypted:
            raise UnsupportedError(f"{self.path}: the image is encrypted; qjournal cannot decrypt guest data")

    def read(self, offset: int, length: int) -> bytes:
        """``length`` guest bytes at ``offset`` (any alignment, across clusters and tables)."""
        self._check_request(offset, length)
        runs = list(self.runs(offset, offset + length))
        gm = self._staged()
        if len(runs) == 1 and runs[0][2] == DATA and not self.has_data_file and not (gm and gm.deferred):
            # One run of data in the image: a single pread makes the result.
            medium = self.img.reader
            if isinstance(medium, MmapMedium) and runs[0][3] + length <= medium.size:
                return os.pread(medium.fd, length, runs[0][3])
        buf = bytearray(length)
        self._fill(offset, memoryview(buf), runs)
        if gm is not None:
            gm.patch(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` (writable, bytes) with the guest bytes at ``offset``."""
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        length = len(view)
        self._check_request(offset, length)
        self._fill(offset, view, self.runs(offset, offset + length))
        gm = self._staged()
        if gm is not None:
            gm.patch(offset, view)

    def _fill(self, offset: int, view: memoryview, runs: Iterable[Run]) -> None:
        out: np.ndarray | None = None
        jobs: list[Job] = []
        for g, n, kind, host in runs:
            dst = view[g - offset:g - offset + n]
            if kind == DATA:
                job = self._host_read(g, host, dst)
                if job is not None:
                    jobs.append(job)
            elif kind == COMPRESSED:
                o = g % self.cs
                dst[:] = self._decompress(host, g - o)[o:o + n]
            elif kind == UNALLOCATED and self.backing is not None:
                self._read_backing(g, dst)
            else:
                if out is None:
                    out = np.frombuffer(view, dtype=np.uint8)
                out[g - offset:g - offset + n] = 0
        run_preads(jobs)

    def _read_backing(self, g: int, dst: memoryview) -> None:
        backing = self.backing
        assert backing is not None
        n = len(dst)
        avail = max(0, min(n, backing.size - g))
        if avail:
            backing.readinto(g, dst[:avail])
        if avail < n:
            np.frombuffer(dst, dtype=np.uint8)[avail:] = 0

    def _decompress(self, desc: int, g: int) -> bytes:
        """The cluster (guest offset ``g``) a compressed descriptor holds; the last one is kept.

        As QEMU: the stream must give at least a cluster (zlib may hold more, which is
        ignored), and a zstd frame exactly one.
        """
        if self._cluster is not None and self._cluster[0] == desc:
            return self._cluster[1]
        cs = self.cs
        coff, csize = compressed_span(desc, self.cluster_bits)
        medium = self.img.reader
        if coff >= medium.size:
            raise self._entry_error(g, f"compressed data at {coff:#x} lies past the end of {self.path} "
                                    f"({medium.size:#x} bytes)")
        src = medium.read(coff, min(csize, medium.size - coff))
        where = f"of guest offset {g:#x} ({csize} bytes)"
        try:
            if self.img.header.compression_type == COMPRESSION_ZSTD:
                out = self._unzstd(src, coff, where)
            else:
                out = zlib.decompressobj(-12).decompress(src, cs)
        except zlib.error as e:
            raise FormatError("compressed cluster", coff, f"{where}: zlib: {e}") from None
        if len(out) != cs:
            raise FormatError("compressed cluster", coff, f"{where}: decompresses to {len(out)} bytes, not one "
                              f"cluster ({cs})")
        self._cluster = (desc, out)
        return out

    def _unzstd(self, src: bytes, coff: int, where: str) -> bytes:
        import zstandard
        if self._zstd is None:
            self._zstd = zstandard.ZstdDecompressor()
        cs = self.cs
        try:
            declared = zstandard.frame_content_size(src)
            if declared > cs:
                raise FormatError("compressed cluster", coff, f"{where}: the zstd frame declares {declared} "
                                  f"bytes, more than one cluster ({cs})")
            out: bytes = self._zstd.decompress(src, max_output_size=cs)
        except zstandard.ZstdError as e:
            raise FormatError("compressed cluster", coff, f"{where}: zstd: {e}") from None
        return out


_READERS: "weakref.WeakKeyDictionary[Image, GuestReader]" = weakref.WeakKeyDictionary()


def reader(img: "Image") -> GuestReader:
    """The :class:`GuestReader` of ``img``, made on first use and kept while ``img`` lives.

    What it opened (backing chain, data file) is closed by :func:`release`, or when
    ``img`` is garbage collected.
    """
    r = _READERS.get(img)
    if r is None:
        r = _READERS[img] = GuestReader(img)
        weakref.finalize(img, r.close)
    return r


def release(img: "Image") -> None:
    """Close the backing chain and data file opened for ``img`` (call when closing it)."""
    r = _READERS.pop(img, None)
    if r is not None:
        r.close()


def read(img: "Image", offset: int, length: int) -> bytes:
    """``length`` bytes of the guest disk of ``img`` at ``offset``, as QEMU reads them.

    Any alignment; unallocated ranges come from the backing chain. Raises
    :class:`UsageError` for a range outside the disk, :class:`UnsupportedError` for an
    encrypted image and :class:`FormatError` for a damaged entry on the way.
    """
    return reader(img).read(offset, length)

"""A streaming writer that fills a fresh qcow2 image in guest order, for ``convert``.

The image is one that :func:`qjournal.ops.create.create_image` just made (header,
refcount table and block, an empty L1 table) under a name no reader knows yet. The
writer appends past its end, in this order, and never rewrites what it appended:

1. data clusters, host-contiguous in guest order (compressed clusters packed byte after
   byte, as QEMU's ``qcow2_alloc_bytes`` packs them: one may run into the next host
   cluster, and every host cluster a compressed cluster's sectors touch gets one
   reference more, as ``qemu-img check`` counts them);
2. each L2 table as soon as the guest moves past its range (only tables with an entry);
3. at :meth:`StreamWriter.finish`: the L1 table in place, then a new refcount table and
   blocks after everything else, covering themselves; then one header write switching
   ``refcount_table_offset``/``refcount_table_clusters`` to them. The refcount table
   and block that ``create`` made are left unreferenced with refcount 0: free space,
   not leaks.

Nothing here is journaled: the file is not in use by anyone until the caller renames
it into place after :meth:`finish` and an fsync (see :mod:`qjournal.ops.convert`).

Bulk data goes through a :class:`DataSink`: whole 4 KiB pages from page-aligned
buffers are written with ``O_DIRECT`` (straight to the device: no page cache to fill
with a copy of the disk, which costs more than the write on a machine whose memory is
handed back and forth by its host, and no dirty pages left for the final fsync),
everything else with a plain ``pwrite``. The caller's fsync before the rename still
makes both durable (the device's cache and the file's extents).

Memory: one L2 table, the L1 table, and one refcount per host cluster (2 bytes each,
32 MiB per TiB of allocated 64 KiB clusters).
"""
from __future__ import annotations

import errno
import os
from collections import deque

from ..format.lazy import futures, np
from ..errors import UsageError
from ..format.geometry import SECTOR
from ..format.header import FIELD_OFFSET, Header, pack_field
from ..format.refcount import RT_ENTRY_SIZE, entries_per_block, max_refcount, pack_block
from ..format.tables import (L1_ENTRY_SIZE, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, SUBCLUSTERS,
                            compressed_geometry, l2_entries)
from ..storage.medium import pwrite_all

_ALL_SUBCLUSTERS = (1 << SUBCLUSTERS) - 1
_RC_CAP = 0xFFFF   # the in-memory counts are u16; a wider refcount never needs more here
DIRECT_ALIGN = 4096   # O_DIRECT: buffer address, file offset and length all multiples of this


def buffer_address(data: memoryview | bytes | bytearray) -> int:
    """The address of the first byte of ``data`` (to test a buffer's alignment)."""
    return int(np.frombuffer(data, dtype=np.uint8).ctypes.data) if len(data) else 0


class DataSink:
    """Bulk writes into one file: ``O_DIRECT`` for whole aligned pages, ``pwrite`` for the rest.

    ``path`` is opened a second time with ``O_DIRECT``; where the file system refuses
    it (tmpfs), or refuses a direct write with ``EINVAL``, every write is a plain one.
    Both descriptors name the same file, so one fsync of ``fd`` makes both durable.

    With ``background``, writes run in order on one thread of their own while the
    caller reads the next window: :meth:`write` returns at once, and the caller must
    leave the buffer alone until :meth:`wait` for a :meth:`mark` taken after the
    write has returned. The first error is raised by the next :meth:`wait`.
    """

    def __init__(self, fd: int, path: str | None = None, background: bool = False) -> None:
        self.fd = fd
        self.direct = -1
        flag = getattr(os, "O_DIRECT", 0)
        if path is not None and flag:
            try:
                self.direct = os.open(path, os.O_WRONLY | flag)
            except OSError:
                self.direct = -1
        self.pool = futures.ThreadPoolExecutor(1, thread_name_prefix="qjournal-write") if background else None
        self.pending: deque[tuple[int, futures.Future[None]]] = deque()
        self.queued = 0

    def write(self, data: memoryview | bytes | bytearray, off: int) -> None:
        """Write all of ``data`` at ``off`` (in the background: queue it)."""
        if self.pool is None:
            self._write(data, off)
        else:
            self.queued += 1
            self.pending.append((self.queued, self.pool.submit(self._write, data, off)))

    def mark(self) -> int:
        """A token for every write queued so far."""
        return self.queued

    def wait(self, mark: int | None = None) -> None:
        """Block until the writes up to ``mark`` (default: all of them) are done."""
        while self.pending and (mark is None or self.pending[0][0] <= mark):
            self.pending.popleft()[1].result()

    def _write(self, data: memoryview | bytes | bytearray, off: int) -> None:
        if (self.direct >= 0 and not off % DIRECT_ALIGN and not len(data) % DIRECT_ALIGN
                and not buffer_address(data) % DIRECT_ALIGN):
            try:
                pwrite_all(self.direct, data, off)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                os.close(self.direct)   # the file system takes no direct writes after all: plain ones from now on
                self.direct = -1
        pwrite_all(self.fd, data, off)

    def close(self) -> None:
        """Finish or drop the queued writes, close the direct descriptor (not ``fd``, which the caller owns)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        self.pending.clear()
        if self.direct >= 0:
            os.close(self.direct)
            self.direct = -1


class StreamWriter:
    """Append data clusters to a freshly created image in guest order; :meth:`finish` maps them.

    Calls must come in increasing guest order (``put_data``, ``put_compressed``,
    ``put_zero``); guest clusters never given stay unallocated.
    """

    def __init__(self, fd: int, sink: DataSink | None = None) -> None:
        self.fd = fd
        self.sink = sink if sink is not None else DataSink(fd)
        self.header = Header.parse(os.pread(fd, 4096, 0), os.fstat(fd).st_size)
        h = self.header
        self.cs = h.cluster_size
        self.cluster_bits = h.cluster_bits
        self.extended = h.extended_l2
        self.per_table = l2_entries(self.cs, self.extended)
        self.l1 = np.zeros(h.l1_size, dtype=np.uint64)
        self.rc_max = min(max_refcount(h.refcount_order), _RC_CAP)
        self.rc = np.zeros(1024, dtype=np.uint16)
        self.rc[0] = 1                                   # the header
        l1_first = h.l1_table_offset // self.cs
        l1_clusters = -(-h.l1_size * L1_ENTRY_SIZE // self.cs)
        self._count(l1_first, l1_first + l1_clusters)
        end = os.fstat(fd).st_size
        self.pos = -(-end // self.cs) * self.cs          # next free byte of the file (append point)
        self.table_index = -1
        self.table = np.zeros(self.per_table * (2 if self.extended else 1), dtype=np.uint64)
        self.table_used = False
        self.offset_mask, self.csize_shift, _ = compressed_geometry(self.cluster_bits)
        self.compressed_clusters = 0

    # -- refcounts ----------------------------------------------------------------
    def _ensure(self, stop: int) -> None:
        if stop > len(self.rc):
            grown = np.zeros(max(stop, 2 * len(self.rc)), dtype=np.uint16)
            grown[:len(self.rc)] = self.rc
            self.rc = grown

    def _count(self, first: int, stop: int) -> None:
        """One reference more for host clusters ``first .. stop - 1``."""
        self._ensure(stop)
        self.rc[first:stop] += 1

    def _span(self, start: int, n: int) -> tuple[int, int, int]:
        """(first host cluster, end sector, last host cluster) of ``n`` compressed bytes at
        ``start``, counted as ``qemu-img check`` counts them: whole 512-byte sectors."""
        end_sector = -(-(start + n) // SECTOR)
        return start // self.cs, end_sector, (end_sector * SECTOR - 1) // self.cs

    # -- L2 tables --------------------------------------------------------------
    def _entry_slot(self, guest: int) -> int:
        index, i = divmod(guest // self.cs, self.per_table)
        if index != self.table_index:
            self._flush_table()
            self.table_index = index
        return i * 2 if self.extended else i

    def _flush_table(self) -> None:
        """Write the current L2 table after the data (step 2) and point its L1 entry at it."""
        if self.table_index >= 0 and self.table_used:
            self._align_cluster()
            offset = self.pos
            pwrite_all(self.fd, self.table.astype(">u8").tobytes(), offset)
            self._count(offset // self.cs, offset // self.cs + 1)
            self.pos += self.cs
            self.l1[self.table_index] = np.uint64(offset | OFLAG_COPIED)
        self.table[:] = 0
        self.table_used = False

    def _align_cluster(self) -> None:
        self.pos = -(-self.pos // self.cs) * self.cs

    # -- data -------------------------------------------------------------------
    def put_data(self, guest: int, data: memoryview | bytes,
                 subclusters: list[int] | np.ndarray | None = None) -> None:
        """Whole clusters of data for guest offset ``guest`` (cluster-aligned), appended at once.

        With extended L2, ``subclusters`` gives each cluster's "allocated" bits (the
        others stay unallocated: zeros, with no backing file); default all of them.
        Cost: one write, and numpy over the run's L2 entries (no Python loop per cluster).
        """
        n = len(data) // self.cs
        self._align_cluster()
        host = self.pos
        self.sink.write(data, host)
        self.pos += n * self.cs
        self._count(host // self.cs, host // self.cs + n)
        entries = np.arange(n, dtype=np.uint64) * np.uint64(self.cs) + np.uint64(host | OFLAG_COPIED)
        bits = np.full(n, _ALL_SUBCLUSTERS, dtype=np.uint64) if subclusters is None \
            else np.asarray(subclusters, dtype=np.uint64)
        first = guest // self.cs
        k = 0
        while k < n:   # one slice per L2 table the run touches
            i = self._entry_slot((first + k) * self.cs) // (2 if self.extended else 1)
            m = min(n - k, self.per_table - i)
            if self.extended:
                self.table[2 * i:2 * (i + m):2] = entries[k:k + m]
                self.table[2 * i + 1:2 * (i + m):2] = bits[k:k + m]
            else:
                self.table[i:i + m] = entries[k:k + m]
            self.table_used = True
            k += m

    def put_zero(self, guest: int) -> None:
        """Guest cluster ``guest`` reads as zeros (over a backing file that does not: v3 only)."""
        if self.header.version < 3:
            raise UsageError("convert: a v2 (compat=0.10) image has no zero clusters; the caller writes zeros")
        if self.extended:
            self._map(guest, 0, _ALL_SUBCLUSTERS << SUBCLUSTERS)
        else:
            self._map(guest, OFLAG_ZERO, 0)

    def put_compressed(self, guest: int, blob: bytes) -> None:
        """A compressed cluster (``blob`` shorter than a cluster), packed after the last one."""
        start = self.pos
        first, end_sector, last = self._span(start, len(blob))
        self._ensure(last + 1)
        if (self.rc[first:last + 1] >= self.rc_max).any():
            # A host cluster would count more references than its refcount holds:
            # start the blob on a fresh cluster.
            self._align_cluster()
            start = self.pos
            first, end_sector, last = self._span(start, len(blob))
        pwrite_all(self.fd, blob, start)
        self._count(first, last + 1)
        extra = end_sector - 1 - start // SECTOR   # additional 512-byte sectors
        self.pos = start + len(blob)
        self._map(guest, OFLAG_COMPRESSED | (extra << self.csize_shift) | start, 0)
        self.compressed_clusters += 1

    def _map(self, guest: int, entry: int, bitmap: int) -> None:
        slot = self._entry_slot(guest)
        self.table[slot] = np.uint64(entry)
        if self.extended:
            self.table[slot + 1] = np.uint64(bitmap)
        self.table_used = True

    # -- the end ----------------------------------------------------------------
    def finish(self) -> int:
        """Write the last L2 table, the L1 table, the refcount structures and the header
        switch (step 3); return the file's length. The caller fsyncs."""
        self.sink.wait()   # the data before the tables that map it (all of it before the caller's fsync)
        self._flush_table()
        self._align_cluster()
        h = self.header
        if h.l1_size:
            pwrite_all(self.fd, self.l1.astype(">u8").tobytes(), h.l1_table_offset)
        cs = self.cs
        epb = entries_per_block(cs, h.refcount_order)
        used = self.pos // cs
        blocks = tables = 0
        while True:   # the refcount blocks and table count themselves
            total = used + blocks + tables
            need_blocks = -(-total // epb)
            need_tables = -(-need_blocks * RT_ENTRY_SIZE // cs)
            if (need_blocks, need_tables) == (blocks, tables):
                break
            blocks, tables = need_blocks, need_tables
        first_block = used
        table_offset = (used + blocks) * cs
        self._count(used, used + blocks + tables)
        counts = np.zeros(blocks * epb, dtype=np.uint64)
        n = min(len(self.rc), len(counts))
        counts[:n] = self.rc[:n]
        for b in range(blocks):
            pwrite_all(self.fd, pack_block(counts[b * epb:(b + 1) * epb], h.refcount_order),
                       (first_block + b) * cs)
        reftable = np.zeros(tables * cs // RT_ENTRY_SIZE, dtype=">u8")
        reftable[:blocks] = (np.arange(first_block, first_block + blocks, dtype=np.uint64) * np.uint64(cs))
        pwrite_all(self.fd, reftable.tobytes(), table_offset)
        length = table_offset + tables * cs
        os.ftruncate(self.fd, length)
        # The header switch: one write of the two adjacent fields (offset, then clusters).
        pwrite_all(self.fd, pack_field("refcount_table_offset", table_offset)
                   + pack_field("refcount_table_clusters", tables), FIELD_OFFSET["refcount_table_offset"])
        return length

__all__ = ["DIRECT_ALIGN", "DataSink", "StreamWriter", "buffer_address"]

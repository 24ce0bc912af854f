"""The guest mapping as an open transaction will leave it: staged L1 and L2 tables.

Guest writes inside one transaction (one :meth:`Image.write`, or many inside
``with img.transaction():``, or a :class:`~qjournal.disk.GuestDisk` batch) change the
mapping here, in memory; nothing that maps guest data changes on disk before the
commit. What each write does to the file at once is only this: data into host
clusters no entry maps yet (``fresh`` clusters this transaction allocated, or the
unallocated subclusters of a cluster it owns), which no reader can see, and data in
place when no enabled bitmap has to record it first.

At commit, :meth:`GuestMap.finalize` turns the staged state into the steps of the
ordering rule (``bitmap-bits-set`` → ``l2-updated`` → ``l1-updated``), new L2 tables
into pre-commit writes, and makes the fresh data durable first. Data written in place
over clusters the image already maps waits, when an enabled bitmap must first record
it, until after the commit (:meth:`GuestMap.after_commit`): the bits are on disk
before the data, never the reverse.

Reads inside the transaction (:mod:`qjournal.guest`) see the staged tables and the
data that waits, so a write followed by a read returns what was written.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import FormatError
from ..format.bitmaps import TE_OFFSET_MASK
from ..format.tables import (L1_ENTRY_SIZE, L1E_OFFSET_MASK, L2_ENTRY_SIZE, L2E_OFFSET_MASK, OFLAG_COMPRESSED,
                            OFLAG_COPIED, OFLAG_ZERO, SUBCLUSTERS)
from ..storage.medium import FileMedium, Medium, merge_ranges

if TYPE_CHECKING:
    from ..core.image import Image, TxState

Range = tuple[int, int]
Write = tuple[int, bytes]


class StagedTable:
    """One L2 table: its words (entries, and bitmaps for extended L2) as they will be."""

    __slots__ = ("offset", "words", "new", "changed", "orig")

    def __init__(self, offset: int, words: np.ndarray, new: bool) -> None:
        self.offset = offset
        self.words = words  # uint64, cluster_size // L2_ENTRY_SIZE of them
        self.new = new  # in a cluster this transaction allocated (written whole before the commit)
        self.changed: set[int] = set()  # entry indexes changed in an existing table
        self.orig = None if new else words.copy()  # the words on disk, which readers see until the commit


class GuestMap:
    """The staged guest mapping of one transaction (see the module docstring)."""

    def __init__(self, img: "Image", tx: "TxState") -> None:
        self.img = img
        self.tx = tx
        h = img.header
        self.cs = h.cluster_size
        self.extended = h.extended_l2
        self.ew = 2 if self.extended else 1  # words per entry
        self.per_l2 = self.cs // (8 * self.ew)
        self.l1 = img.l1_table()
        self.l1_changed: set[int] = set()
        self.tables: dict[int, StagedTable] = {}
        self.fresh: set[int] = set()  # host clusters (index) this transaction allocated for data
        self.dirty: list[Range] = []  # guest ranges changed: their bitmap bits get set
        self.data_ranges: list[Range] = []  # host ranges written before the commit
        self.deferred: list[tuple[int, int, bytes]] = []  # (host, guest, data) written after the commit
        self.deferred_bytes = 0
        self._deferred_at: set[int] = set()  # guest clusters some waiting data touches
        self.has_data_file = h.has_data_file
        self.target: Medium = img.medium
        self._data_file: Any = None
        if img.data_file is not None:
            from ..read.guest import reader
            self._data_file = reader(img).data_file
            assert self._data_file is not None
            self.target = FileMedium(self._data_file.path, True)
        self._metadata: tuple[np.ndarray, np.ndarray, list[str]] | None = None  # see _metadata_index
        # In-place data must wait for the commit when an enabled bitmap records writes.
        self.ordered = any(e.auto and not e.in_use and e.table_size for e in tx.entries)

    # -- the staged tables -------------------------------------------------------
    def table(self, l1i: int) -> StagedTable | None:
        """The table of L1 entry ``l1i`` as staged (read from the image on first use)."""
        t = self.tables.get(l1i)
        if t is not None:
            return t
        if l1i >= len(self.l1):
            return None
        off = int(self.l1[l1i]) & L1E_OFFSET_MASK
        if not off:
            return None
        reader = self.img.reader
        if off % self.cs or off + self.cs > reader.size:
            raise FormatError("L1 table", self.img.header.l1_table_offset + L1_ENTRY_SIZE * l1i,
                              f"entry {l1i}: L2 table offset {off:#x} is unaligned or past the end of the file")
        t = StagedTable(off, reader.array(off, self.cs // L2_ENTRY_SIZE, ">u8").astype(np.uint64), False)
        self.tables[l1i] = t
        return t

    def owned(self, l1i: int) -> bool:
        """The table of ``l1i`` belongs to the active L1 alone (COPIED, or new here)."""
        t = self.tables.get(l1i)
        return bool(t is not None and t.new) or bool(int(self.l1[l1i]) & OFLAG_COPIED)

    def writable(self, l1i: int) -> StagedTable:
        """The table of ``l1i``, made new when there is none or a snapshot shares it."""
        t = self.table(l1i)
        if t is not None and (t.new or self.owned(l1i)):
            return t
        alloc = self.tx.alloc
        if t is None:
            words = np.zeros(self.cs // L2_ENTRY_SIZE, dtype=np.uint64)
        else:
            # A snapshot shares the old table: copy it. A data cluster's refcount counts
            # the L1 tables that reach it, so the clusters the copy maps keep their
            # counts; only the old table loses the active L1's reference.
            alloc.free(t.offset, 1)
            words = t.words.copy()
            entries = words[0::self.ew]
            entries[(entries & np.uint64(OFLAG_COPIED)) != 0] &= ~np.uint64(OFLAG_COPIED)
        off = alloc.alloc(1)
        t = StagedTable(off, words, True)
        self.tables[l1i] = t
        self.l1[l1i] = np.uint64(off | OFLAG_COPIED)
        self.l1_changed.add(l1i)
        return t

    def entry(self, gc: int) -> tuple[int, int]:
        """(entry, subcluster bitmap) of guest cluster ``gc`` as staged."""
        l1i, i = divmod(gc, self.per_l2)
        t = self.table(l1i)
        if t is None:
            return 0, 0
        w = t.words
        return int(w[i * self.ew]), int(w[i * self.ew + 1]) if self.extended else 0

    def set_entry(self, gc: int, entry: int, bitmap: int = 0) -> None:
        l1i, i = divmod(gc, self.per_l2)
        t = self.writable(l1i)
        t.words[i * self.ew] = np.uint64(entry)
        if self.extended:
            t.words[i * self.ew + 1] = np.uint64(bitmap)
        if not t.new:
            t.changed.add(i)

    def mapped_on_disk(self, gc: int, host: int) -> int:
        """Which units of guest cluster ``gc`` the image on disk maps to host bytes at ``host``.

        A bit per subcluster with extended L2, else bit 0 for the whole cluster (data
        that reads as zeros is not mapped). Bytes no unit maps may be written before
        the commit; the others are written in place, after the bitmap bits.
        """
        if host // self.cs in self.fresh:
            return 0
        l1i, i = divmod(gc, self.per_l2)
        t = self.tables.get(l1i)
        if t is None or t.orig is None:
            return 0  # no table, or a new one: the active L1 on disk maps nothing of it at ``host``
        e = int(t.orig[i * self.ew])
        if not self.host_allocated(e) or (e & L2E_OFFSET_MASK) != (host & L2E_OFFSET_MASK):
            return 0
        if self.extended:
            return int(t.orig[i * self.ew + 1]) & ((1 << SUBCLUSTERS) - 1)
        return 0 if e & OFLAG_ZERO else 1

    def _metadata_index(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Sorted cluster numbers that hold metadata, the label index of each, the labels."""
        if self._metadata is None:
            img, cs = self.img, self.cs
            parts: list[tuple[np.ndarray, str]] = []
            for off, length, name in img.metadata_ranges():
                parts.append((np.arange(off // cs, (off + max(length, 1) - 1) // cs + 1, dtype=np.int64), name))
            for s in img.snapshots:
                end = s.l1_table_offset + max(s.l1_size * L1_ENTRY_SIZE, 1) - 1
                parts.append((np.arange(s.l1_table_offset // cs, end // cs + 1, dtype=np.int64),
                              f"L1 table of snapshot {s.name!r}"))
            for e in img.entries:
                table = img.bitmap_table(e) & np.uint64(TE_OFFSET_MASK)
                parts.append(((table[table != 0] // np.uint64(cs)).astype(np.int64), f"bitmap data of {e.name!r}"))
            rt = self.tx.alloc.reftable
            parts.append(((rt[rt != 0] // np.uint64(cs)).astype(np.int64), "refcount block"))
            for l1 in [img.l1_table()] + [img.medium.array(s.l1_table_offset, s.l1_size, ">u8").astype(np.uint64)
                                          for s in img.snapshots]:
                l2s = l1 & np.uint64(L1E_OFFSET_MASK)
                parts.append(((l2s[l2s != 0] // np.uint64(cs)).astype(np.int64), "L2 table"))
            clusters = np.concatenate([c for c, _ in parts])
            names = np.concatenate([np.full(len(c), i) for i, (c, _) in enumerate(parts)])
            order = np.argsort(clusters, kind="stable")
            self._metadata = (clusters[order], names[order], [n for _, n in parts])
        return self._metadata

    def check_hosts(self, gcs: np.ndarray, hosts: np.ndarray) -> None:
        """Refuse guest data over metadata (a damaged entry would have us write or free it).

        QEMU's overlap check: a cluster an L2 entry maps (``hosts``, for guest clusters
        ``gcs``) must not hold the header, a table, a refcount block or bitmap data. A
        request checks every cluster it may write in place or release before it writes
        anything.
        """
        if self.has_data_file or not len(hosts):
            return
        meta, names, labels = self._metadata_index()
        c = (np.asarray(hosts, dtype=np.uint64) // np.uint64(self.cs)).astype(np.int64)
        idx = np.minimum(np.searchsorted(meta, c), max(len(meta) - 1, 0))
        hit = np.nonzero(meta[idx] == c)[0] if len(meta) else np.zeros(0, dtype=np.int64)
        if len(hit):
            k = int(hit[0])
            gc, host = int(gcs[k]), int(c[k]) * self.cs
            l1i, i = divmod(gc, self.per_l2)
            t = self.tables.get(l1i)
            where = t.offset + 8 * self.ew * i if t is not None else None
            raise FormatError("L2 table", where, f"entry {i} (guest offset {gc * self.cs:#x}) maps data to "
                              f"cluster {host:#x}, which holds metadata ({labels[int(names[idx[k]])]}); refusing "
                              "to write (qjournal check -r all repairs the image)")

    def host_allocated(self, entry: int) -> bool:
        """The entry has a host cluster (offset 0 counts, with COPIED, in a data-file image)."""
        if entry & OFLAG_COMPRESSED:
            return False
        return bool(entry & L2E_OFFSET_MASK) or (self.has_data_file and bool(entry & OFLAG_COPIED))

    # -- data --------------------------------------------------------------------
    def write_direct(self, host: int, data: Any) -> None:
        """Data written now, durable before the commit: into host bytes the image on disk
        does not map (see :meth:`mapped_on_disk`), or in place when nothing orders it."""
        self._write(host, data)
        self.data_ranges.append((host, len(data)))

    def _write(self, host: int, data: Any) -> None:
        self.target.write(host, data)
        if self._data_file is not None:
            # The reader of the data file must see its new length.
            self._data_file.file_size = max(self._data_file.file_size, host + len(data))

    def write_in_place(self, host: int, guest: int, data: Any) -> None:
        """Data over host bytes an entry maps now: after the bits, hence perhaps after the commit."""
        if self.ordered or self.deferred:
            # Later writes to the same place must land after this one: once anything
            # waits, everything in place waits.
            self.deferred.append((host, guest, bytes(data)))
            self.deferred_bytes += len(data)
            self._deferred_at.update(range(guest // self.cs, (guest + len(data) - 1) // self.cs + 1))
        else:
            self.write_direct(host, data)

    def forget(self, lo: int, hi: int) -> None:
        """Drop waiting in-place data for guest bytes ``[lo, hi)``: they no longer map there."""
        if not self._touches(lo, hi):
            return
        kept: list[tuple[int, int, bytes]] = []
        for host, g, data in self.deferred:
            end = g + len(data)
            if end <= lo or g >= hi:
                kept.append((host, g, data))
                continue
            if g < lo:
                kept.append((host, g, data[:lo - g]))
            if end > hi:
                kept.append((host + hi - g, hi, data[hi - g:]))
        self.deferred = kept
        self.deferred_bytes = sum(len(d) for _, _, d in kept)

    def _touches(self, lo: int, hi: int) -> bool:
        """Some waiting data may lie in guest bytes ``[lo, hi)`` (checked cluster by cluster)."""
        if not self._deferred_at or hi <= lo:
            return False
        first, last = lo // self.cs, (hi - 1) // self.cs
        if last - first + 1 > len(self._deferred_at):
            return any(first <= c <= last for c in self._deferred_at)
        return any(c in self._deferred_at for c in range(first, last + 1))

    def patch(self, offset: int, buf: memoryview) -> None:
        """Lay the waiting in-place data over ``buf`` (guest bytes at ``offset``)."""
        end = offset + len(buf)
        if not self._touches(offset, end):
            return
        for _, g, data in self.deferred:
            lo, hi = max(g, offset), min(g + len(data), end)
            if lo < hi:
                buf[lo - offset:hi - offset] = data[lo - g:hi - g]

    # -- commit ------------------------------------------------------------------
    def finalize(self) -> None:
        """Stage the mapping's steps into the transaction; make the direct data durable.

        Called by the image before it builds the steps. The data written so far goes
        to disk first (ordered mode: a crash after this and before the commit leaves
        unreferenced clusters, invisible to every reader).
        """
        img, tx = self.img, self.tx
        from .data import bits_steps
        bits = bits_steps(img, merge_ranges(self.dirty)) if self.dirty else []
        l2_writes: list[Write] = []
        for l1i, t in sorted(self.tables.items()):
            if t.new:
                img.precommit_write(t.offset, t.words.astype(">u8").tobytes())
                continue
            for a, b in _runs(sorted(t.changed)):
                w = t.words[a * self.ew:b * self.ew]
                l2_writes.append((t.offset + 8 * self.ew * a, w.astype(">u8").tobytes()))
        l1_off = img.header.l1_table_offset
        l1_writes = [(l1_off + 8 * a, self.l1[a:b].astype(">u8").tobytes()) for a, b in _runs(sorted(self.l1_changed))]
        for name, writes in (("bitmap-bits-set", bits), ("l2-updated", l2_writes), ("l1-updated", l1_writes)):
            if writes:
                tx.extra_steps.setdefault(name, []).extend(writes)
        if self.data_ranges:
            self.target.flush(self.data_ranges)
            self.data_ranges = []

    def after_commit(self) -> None:
        """The in-place data that waited for the bits, then a barrier."""
        if self.deferred:
            for host, _, data in self.deferred:
                self._write(host, data)
            self.target.flush([(host, len(data)) for host, _, data in self.deferred])
            self.deferred, self.deferred_bytes = [], 0
            self._deferred_at.clear()

    def close(self) -> None:
        if self.target is not self.img.medium:
            self.target.close()


def _runs(indexes: list[int]) -> list[Range]:
    """Sorted indexes as half-open runs ``(first, end)``."""
    out: list[list[int]] = []
    for i in indexes:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return [(a, b) for a, b in out]

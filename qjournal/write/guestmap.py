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

from ..format.lazy import np
from ..format import refcount as rc
from ..errors import FormatError
from ..format.tables import (L1_ENTRY_SIZE, L1E_OFFSET_MASK, L2_ENTRY_SIZE, L2E_OFFSET_MASK, OFLAG_COMPRESSED,
                            OFLAG_COPIED, OFLAG_ZERO, SUBCLUSTERS, compressed_span)
from ..core.ordering import Phase
from ..read.guest import reader
from ..storage.medium import FileMedium, Medium, merge_ranges
from .bits import bits_steps

if TYPE_CHECKING:
    from ..core.image import Image
    from ..core.transaction import Transaction

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

    def __init__(self, img: "Image", tx: "Transaction") -> None:
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
        if self.has_data_file:
            self._data_file = reader(img).data_file
            assert self._data_file is not None
            self.target = FileMedium(self._data_file.path, True)
        # In-place data must wait for the commit when an enabled bitmap records writes,
        # and in an atomic transaction (only a data file's clusters are written in place
        # there: an exception before the commit must leave them untouched).
        self.ordered = any(e.auto and not e.in_use and e.table_size for e in tx.entries) or (
            tx.atomic_data and self.has_data_file)

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

    def entry_words(self, first: int, stop: int) -> np.ndarray:
        """The staged entries (first words, uint64) of guest clusters ``[first, stop)``,
        0 where no table maps them: :meth:`entry` for a run, one numpy copy per table."""
        out = np.zeros(stop - first, dtype=np.uint64)
        per, ew = self.per_l2, self.ew
        for l1i in range(first // per, (stop - 1) // per + 1):
            t = self.table(l1i)
            if t is not None:
                a, b = max(first, l1i * per), min(stop, (l1i + 1) * per)
                out[a - first:b - first] = t.words[(a - l1i * per) * ew:(b - l1i * per) * ew:ew]
        return out

    def map_run(self, first: int, n: int, host: int, bitmap: int = 0) -> None:
        """Map guest clusters ``first .. first + n - 1`` to the consecutive host clusters from
        ``host``, with COPIED (and ``bitmap`` with extended L2): :meth:`set_entry` for a run."""
        per, ew, cs = self.per_l2, self.ew, self.cs
        stop = first + n
        for l1i in range(first // per, (stop - 1) // per + 1):
            t = self.writable(l1i)
            a, b = max(first, l1i * per), min(stop, (l1i + 1) * per)
            i0, i1 = a - l1i * per, b - l1i * per
            hosts = np.arange(host + (a - first) * cs, host + (b - first) * cs, cs, dtype=np.uint64)
            t.words[i0 * ew:i1 * ew:ew] = hosts | np.uint64(OFLAG_COPIED)
            if self.extended:
                t.words[i0 * ew + 1:i1 * ew:ew] = np.uint64(bitmap)
            if not t.new:
                t.changed.update(range(i0, i1))

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

    def check_hosts(self, gcs: np.ndarray, hosts: np.ndarray) -> None:
        """Refuse guest data over metadata (a damaged entry would have us write or free it).

        QEMU's overlap check: a cluster an L2 entry maps (``hosts``, for guest clusters
        ``gcs``) must not hold the header, a table, a refcount block or bitmap data. A
        request checks every cluster it may write in place or release before it writes
        anything.
        """
        if self.has_data_file or not len(hosts):
            return
        hosts = np.asarray(hosts, dtype=np.uint64)

        def refuse(k: int, host: int, why: str) -> None:
            gc = int(gcs[k])
            l1i, i = divmod(gc, self.per_l2)
            t = self.tables.get(l1i)
            where = t.offset + 8 * self.ew * i if t is not None else None
            raise FormatError("L2 table", where, f"entry {i} (guest offset {gc * self.cs:#x}) maps data to "
                              f"cluster {host:#x}, {why}; refusing to write (qjournal check -r all repairs "
                              "the image)")

        # A cluster wholly past the end of the file was never written (the reader's rule too).
        past = np.flatnonzero(hosts >= np.uint64(self.img.medium.size))
        if len(past):
            k = int(past[0])
            refuse(k, int(hosts[k]), f"past the end of the file ({self.img.medium.size:#x} bytes)")
        c = (hosts // np.uint64(self.cs)).astype(np.int64)
        found = self.img.overlap_map().find(c)
        if found is not None:
            k, cluster, label = found
            refuse(k, cluster * self.cs, f"which holds metadata ({label})")

    def check_releases(self, clusters: np.ndarray) -> None:
        """Refuse a request that would drop references the refcounts do not hold.

        ``clusters`` are those the request may release, once per reference (a shared L2
        table it copies, what the entries it copies on write map). Each must count at
        least that many references, as staged: else the commit's free step refuses,
        after the request's data went to disk (fuzz case 83108: a snapshot's shared L2
        table with refcount 0). Cost: one decode per run of consecutive clusters.
        """
        if not len(clusters):
            return
        alloc, epb = self.tx.alloc, self.tx.alloc.epb
        cl, need = np.unique(clusters, return_counts=True)
        cuts = (np.flatnonzero((np.diff(cl) != 1) | (np.diff(cl // epb) != 0)) + 1).tolist()
        for a, b in zip([0, *cuts], [*cuts, len(cl)]):
            c0 = int(cl[a])
            bi, lo = divmod(c0, epb)
            have = np.minimum(alloc.counts(bi, lo, lo + b - a), np.uint64(rc.COUNT_CEILING)).astype(np.int64)
            if alloc.deltas:
                have += np.array([alloc.deltas.get(c, 0) for c in range(c0, c0 + b - a)], dtype=np.int64)
            short = np.flatnonzero(have < need[a:b])
            if len(short):
                i = int(short[0])
                c, n, count = c0 + i, int(need[a + i]), int(have[i])
                block = int(alloc.reftable[bi]) or None if bi < len(alloc.reftable) else None
                raise FormatError("refcount block", block, f"cluster {c * self.cs:#x} has refcount {count}, but the "
                                  f"write would drop {n} reference{'s' if n > 1 else ''} to it; refusing to write "
                                  "(qjournal check -r all repairs the image)")

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
        bits = bits_steps(img, merge_ranges(self.dirty)) if self.dirty else []
        l2_writes: list[Write] = []
        for l1i, t in sorted(self.tables.items()):
            if t.new:
                tx.write_new(t.offset, t.words.astype(">u8").tobytes())
                continue
            for a, b in _runs(sorted(t.changed)):
                w = t.words[a * self.ew:b * self.ew]
                l2_writes.append((t.offset + 8 * self.ew * a, w.astype(">u8").tobytes()))
        l1_off = img.header.l1_table_offset
        l1_writes = [(l1_off + 8 * a, self.l1[a:b].astype(">u8").tobytes()) for a, b in _runs(sorted(self.l1_changed))]
        tx.stage(Phase.BITMAP_BITS_SET, bits)
        tx.stage(Phase.L2_UPDATED, l2_writes)
        tx.stage(Phase.L1_UPDATED, l1_writes)
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

    # -- invariants --------------------------------------------------------------
    def _check(self) -> None:
        """Assert every internal invariant (for tests; O(staged tables + file clusters)).

        1. The staged L1 table differs from the L1 table on disk exactly at
           ``l1_changed``, and each changed entry points, with COPIED, at a new table
           of this transaction.
        2. Each staged table is the one its staged L1 entry points at. An existing
           table still holds, in ``orig``, the words on disk, and its words differ
           from them only at the entries in ``changed``. A new table has no ``orig``
           and lies in a cluster the allocator handed out.
        3. Without an external data file, every cluster a staged entry maps (data, or
           compressed data) has a staged refcount of at least 1 and lies inside the
           clusters the allocator covers, and no entry maps a staged L2 table.
           COPIED is set on an entry exactly when the staged refcount of its cluster
           is 1 (never on a compressed entry), as ``qemu-img check`` will want it
           after the commit; likewise for the L1 entries of staged tables.
        4. Each ``fresh`` cluster was handed out by the allocator and is mapped by
           exactly one staged entry.
        5. Each piece of waiting in-place data lies within one guest cluster, whose
           staged entry still maps the host cluster it goes to; ``deferred_bytes``
           is their total and ``_deferred_at`` names their guest clusters.
        """
        img, alloc, cs, ew = self.img, self.tx.alloc, self.cs, self.ew
        h = img.header
        disk_l1 = img.medium.array(h.l1_table_offset, h.l1_size, ">u8").astype(np.uint64)
        assert len(self.l1) == len(disk_l1), f"guest map: staged L1 has {len(self.l1)} entries, not {len(disk_l1)}"
        differ = set(np.nonzero(self.l1 != disk_l1)[0].tolist())
        for i in sorted(differ ^ self.l1_changed)[:1]:
            raise AssertionError(f"guest map: L1 entry {i} is {int(self.l1[i]):#x} staged, {int(disk_l1[i]):#x} on disk, "
                                 f"but {'is' if i in self.l1_changed else 'is not'} marked changed")
        for i in sorted(self.l1_changed):
            t = self.tables.get(i)
            assert t is not None and t.new and int(self.l1[i]) & OFLAG_COPIED, \
                f"guest map: L1 entry {i} changed, but does not point with COPIED at a new table"
        n_words = cs // 8
        tables: dict[int, int] = {}  # cluster of a staged table -> L1 index
        for i, t in sorted(self.tables.items()):
            where = f"guest map: L2 table of L1 entry {i} (at {t.offset:#x})"
            assert 0 <= i < len(self.l1), f"{where}: L1 index out of range"
            assert int(self.l1[i]) & L1E_OFFSET_MASK == t.offset, \
                f"{where}: the staged L1 entry points at {int(self.l1[i]) & L1E_OFFSET_MASK:#x}"
            assert t.offset % cs == 0 and t.offset, f"{where}: unaligned or zero table offset"
            assert t.words.dtype == np.uint64 and len(t.words) == n_words, f"{where}: not {n_words} uint64 words"
            assert t.offset // cs not in tables, f"{where}: L1 entry {tables.get(t.offset // cs)} uses it too"
            tables[t.offset // cs] = i
            if t.new:
                assert t.orig is None and not t.changed, f"{where}: a new table with on-disk words or changes"
                assert t.offset // cs in alloc.taken, f"{where}: a new table in a cluster the allocator did not hand out"
                continue
            assert t.orig is not None, f"{where}: an existing table without its on-disk words"
            on_disk = img.medium.array(t.offset, n_words, ">u8").astype(np.uint64)
            assert np.array_equal(t.orig, on_disk), f"{where}: the words kept as on disk differ from the disk"
            entries = np.nonzero((t.words != t.orig).reshape(-1, ew).any(axis=1))[0].tolist()
            for e in sorted(set(entries) - t.changed)[:1]:
                raise AssertionError(f"{where}: entry {e} differs from the disk but is not marked changed")
            assert all(0 <= e < self.per_l2 for e in t.changed), f"{where}: a changed entry index out of range"
        self._check_references(tables)
        self._check_deferred()

    def _check_references(self, tables: dict[int, int]) -> None:
        """Invariants 3 and 4 of :meth:`_check`: what the staged entries map."""
        alloc, cs, ew = self.tx.alloc, self.cs, self.ew
        hosts: dict[int, list[tuple[int, int]]] = {}  # host cluster -> (L1 index, entry index) mapping it
        compressed: list[tuple[int, int, int]] = []  # (first cluster, last cluster, L1 index)
        copied: dict[tuple[int, int], bool] = {}
        for i, t in sorted(self.tables.items()):
            for k, e in enumerate(t.words[0::ew].tolist()):
                if e & OFLAG_COMPRESSED:
                    assert not e & OFLAG_COPIED, f"guest map: compressed entry {k} of L2 table {t.offset:#x} has COPIED"
                    off, length = compressed_span(e, self.img.header.cluster_bits)
                    compressed.append((off // cs, (off + length - 1) // cs, i))
                elif self.host_allocated(e):
                    hosts.setdefault((e & L2E_OFFSET_MASK) // cs, []).append((i, k))
                    copied[(i, k)] = bool(e & OFLAG_COPIED)
        for c in sorted(self.fresh):
            assert c in alloc.taken, f"guest map: fresh cluster {c * cs:#x} was not handed out by the allocator"
            n = len(hosts.get(c, ()))
            assert n == 1, f"guest map: fresh cluster {c * cs:#x} is mapped by {n} staged entries, not 1"
        if self.has_data_file:
            return
        staged = alloc.staged_refcounts()
        for c, users in sorted(hosts.items()):
            i, k = users[0]
            where = f"guest map: entry {k} of the L2 table of L1 entry {i} maps cluster {c * cs:#x}"
            assert c < len(staged), f"{where}, past the clusters the allocator covers"
            assert c not in tables, f"{where}, which holds the L2 table of L1 entry {tables.get(c)}"
            assert staged[c] >= 1, f"{where}, whose staged refcount is {int(staged[c])}"
            for i, k in users:
                assert copied[(i, k)] == (staged[c] == 1), \
                    f"guest map: entry {k} of the L2 table of L1 entry {i} has COPIED " \
                    f"{'set' if copied[(i, k)] else 'clear'}, but cluster {c * cs:#x} has staged refcount {int(staged[c])}"
        for first, last, i in compressed:
            for c in range(first, last + 1):
                assert c < len(staged) and staged[c] >= 1, \
                    f"guest map: compressed data in cluster {c * cs:#x} (L1 entry {i}) has no staged refcount"
        for i, t in sorted(self.tables.items()):
            c = t.offset // cs
            assert c < len(staged) and staged[c] >= 1, f"guest map: L2 table at {t.offset:#x} has no staged refcount"
            assert bool(int(self.l1[i]) & OFLAG_COPIED) == (staged[c] == 1), \
                f"guest map: L1 entry {i} has COPIED {'set' if int(self.l1[i]) & OFLAG_COPIED else 'clear'}, " \
                f"but its L2 table at {t.offset:#x} has staged refcount {int(staged[c])}"

    def _check_deferred(self) -> None:
        """Invariant 5 of :meth:`_check`: the in-place data that waits for the commit."""
        cs = self.cs
        total = 0
        for host, guest, data in self.deferred:
            total += len(data)
            gc = guest // cs
            where = f"guest map: {len(data)} bytes waiting for guest offset {guest:#x} (host {host:#x})"
            assert data and (guest + len(data) - 1) // cs == gc, f"{where}: empty, or across a cluster boundary"
            assert gc in self._deferred_at, f"{where}: guest cluster {gc} is not in the waiting set"
            e, _ = self.entry(gc)
            mapped = (e & L2E_OFFSET_MASK) if self.host_allocated(e) and not e & OFLAG_COMPRESSED else None
            assert mapped == host // cs * cs and host % cs == guest % cs, \
                f"{where}: the staged entry of guest cluster {gc} is {e:#x}"
        assert total == self.deferred_bytes, f"guest map: deferred_bytes is {self.deferred_bytes}, the data {total}"


def _runs(indexes: list[int]) -> list[Range]:
    """Sorted indexes as half-open runs ``(first, end)``."""
    out: list[list[int]] = []
    for i in indexes:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return [(a, b) for a, b in out]

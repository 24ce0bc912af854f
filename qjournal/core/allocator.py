"""Cluster allocation and refcount updates, staged for one transaction.

The on-disk refcounts are the truth; everything here (the refcount table copy, the
block cache, the free-space index) is derived and thrown away after every commit or
abort. An allocation inside a transaction only marks a cluster as taken; the refcount
writes are produced by :meth:`Allocator.materialize` at commit, in the order the
ordering rule wants:

* ``precommit``: new refcount blocks and a new refcount table, written whole into
  clusters nothing references yet (invisible until a later step hooks them in);
* ``increase``: in-place increments in existing refcount blocks;
* ``hook``: reftable entries pointing at the new blocks, or the header switch to a
  new, larger refcount table. After ``increase`` because a hooked block must already
  be counted;
* ``free``: in-place decrements, last, after the references are gone. A crash before
  it leaks clusters, which is allowed; the reverse order would leave a refcount lower
  than its references, which is not.
"""
from __future__ import annotations

from typing import Callable, Iterable

import attrs

from ..format.lazy import np, sortedcontainers
from ..errors import FormatError, UsageError
from ..format import refcount as rc
from ..format.tables import L2E_OFFSET_MASK, OFLAG_COMPRESSED, compressed_span
from ..storage.medium import Medium

Write = tuple[int, bytes]


@attrs.define
class RefcountPlan:
    precommit: list[Write]
    increase: list[Write]
    hook: list[Write]
    free: list[Write]
    new_reftable: tuple[int, int] | None  # (offset, clusters) when the table moved


class Allocator:
    def __init__(self, medium: Medium, cluster_bits: int, refcount_order: int,
                 reftable_offset: int, reftable_clusters: int,
                 in_use: Callable[[], np.ndarray] | None = None) -> None:
        """``in_use`` gives the clusters structures occupy (the overlap map): they are never
        handed out, whatever their refcount says."""
        self.medium = medium
        self.in_use = in_use
        self.cluster_bits = cluster_bits
        self.cs = 1 << cluster_bits
        self.order = refcount_order
        self.epb = rc.entries_per_block(self.cs, refcount_order)
        self.max = rc.max_refcount(refcount_order)
        self.rt_offset = reftable_offset
        self.rt_clusters = reftable_clusters
        raw = medium.array(reftable_offset, reftable_clusters * self.cs // rc.RT_ENTRY_SIZE, ">u8").astype(np.uint64)
        bad = np.nonzero(raw & np.uint64(rc.RT_RESERVED_MASK))[0]
        if len(bad):
            i = int(bad[0])
            raise FormatError("refcount table", reftable_offset + rc.RT_ENTRY_SIZE * i,
                              f"entry {i} has reserved bits set")
        self.reftable = raw
        for i in np.nonzero(raw)[0].tolist():
            off = int(raw[i])
            if off % self.cs:
                raise FormatError("refcount table", reftable_offset + rc.RT_ENTRY_SIZE * i,
                                  f"entry {i}: refcount block offset {off:#x} is unaligned (not a multiple of the cluster size)")
            if off + self.cs > medium.size:
                raise FormatError("refcount table", reftable_offset + rc.RT_ENTRY_SIZE * i,
                                  f"entry {i}: refcount block at {off:#x} runs past the end of the file "
                                  f"({medium.size:#x})")
        self._raw: dict[int, bytes | None] = {}  # packed blocks as on disk (None: no block)
        self._free: sortedcontainers.SortedList | None = None
        self._used_past_end: set[int] = set()
        self._end = -(-medium.size // self.cs)
        self.deltas: dict[int, int] = {}
        self.taken: set[int] = set()
        self.reserved: set[int] = set()
        # Bulk reference changes (a snapshot shares every cluster): (clusters, delta) arrays,
        # kept apart from ``deltas`` so that millions of clusters cost numpy, not a dict.
        self._bulk: list[tuple[np.ndarray, int]] = []

    # -- reading ----------------------------------------------------------
    def _block(self, bi: int) -> bytes | None:
        """The packed bytes of refcount block ``bi``; None where there is no block."""
        if bi not in self._raw:
            off = int(self.reftable[bi]) if bi < len(self.reftable) else 0
            self._raw[bi] = self.medium.read(off, self.cs) if off else None
        return self._raw[bi]

    def counts(self, bi: int, lo: int, hi: int) -> np.ndarray:
        """Counts ``lo .. hi-1`` of refcount block ``bi`` (zeros where there is no block).

        Only the bytes that hold them are decoded: a block of 1-bit refcounts in 2 MiB
        clusters has 16 Mi entries, which a small write must not unpack.
        """
        raw = self._block(bi)
        if raw is None:
            return np.zeros(hi - lo, dtype=np.uint64)
        return rc.unpack_entries(raw, self.order, lo, hi)

    def refcount(self, cluster: int) -> int:
        i = cluster % self.epb
        return int(self.counts(cluster // self.epb, i, i + 1)[0])

    def all_refcounts(self, nclusters: int) -> np.ndarray:
        """Refcounts of clusters ``0 .. nclusters-1``."""
        nb = -(-nclusters // self.epb)
        if nb == 0:
            return np.zeros(0, dtype=np.uint64)
        return np.concatenate([self.counts(b, 0, min(self.epb, nclusters - b * self.epb)) for b in range(nb)])

    def staged_refcounts(self) -> np.ndarray:
        """Refcounts of every cluster the allocator covers as the commit will leave them
        (on disk plus the staged changes, before :meth:`materialize`), as int64. O(clusters)."""
        counts = np.minimum(self.all_refcounts(self._end), np.uint64(rc.COUNT_CEILING)).astype(np.int64)
        cl, d = self.changes()
        inside = (cl >= 0) & (cl < len(counts))
        if d.dtype == object:       # a change past int64 (a 64-bit count at its maximum): held at the ceiling
            for c, x in zip(cl[inside].tolist(), d[inside].tolist()):
                counts[c] = max(-rc.COUNT_CEILING, min(rc.COUNT_CEILING, int(counts[c]) + x))
        else:
            counts[cl[inside]] += d[inside]
        return counts

    def changes(self) -> tuple[np.ndarray, np.ndarray]:
        """Every staged refcount change: (clusters, deltas) as sorted int64 arrays, clusters
        unique, zero changes left out. O(changes log changes)."""
        values = list(self.deltas.values())
        try:
            dict_d = np.array(values, dtype=np.int64)
        except OverflowError:       # check's repair of a 64-bit count at its maximum
            dict_d = np.array(values, dtype=object)
        keys = np.fromiter(self.deltas.keys(), np.int64, len(self.deltas))
        bulk_n = sum(len(c) for c, _ in self._bulk)
        top = max([int(keys.max()) if len(keys) else -1] + [int(c.max()) for c, _ in self._bulk if len(c)]) + 1
        if dict_d.dtype != object and bulk_n > 1 << 16 and 0 < top <= 4 * (bulk_n + len(keys)):
            # Many bulk references (a snapshot shares every cluster): one dense pass,
            # O(clusters), instead of sorting every reference.
            dense = np.zeros(top, np.int64)
            np.add.at(dense, keys, dict_d)
            for c, delta in self._bulk:
                if len(c):
                    counted = np.bincount(c, minlength=top)
                    if delta != 1:
                        counted *= delta
                    dense += counted
            nz = np.flatnonzero(dense)
            return nz.astype(np.int64), dense[nz]
        parts = [(keys, dict_d)]
        parts += [(c, np.full(len(c), d, np.int64)) for c, d in self._bulk]
        cl = np.concatenate([c for c, _ in parts])
        d = np.concatenate([x for _, x in parts])
        uniq, inverse = np.unique(cl, return_inverse=True)
        total = np.zeros(len(uniq), d.dtype)
        np.add.at(total, inverse, d)
        keep = total != 0
        return uniq[keep], total[keep]

    def referenced(self) -> np.ndarray:
        """Clusters given references on purpose by :meth:`reference` (sorted, unique)."""
        pos = [c for c, d in self._bulk if d > 0]
        return np.unique(np.concatenate(pos)) if pos else np.zeros(0, np.int64)

    def _free_index(self) -> sortedcontainers.SortedList:
        if self._free is None:
            counts = self.all_refcounts(self._end)
            free_mask = counts == 0
            if self.in_use is not None:
                used = self.in_use()
                free_mask[used[used < len(free_mask)]] = False  # a mask: np.setdiff1d sorts (and loads numpy.ma)
                # A damaged pointer may name a cluster past the end of the file: growing
                # the file must step over it too.
                self._used_past_end = set(used[used >= self._end].tolist())
            free = np.flatnonzero(free_mask)
            self._free = sortedcontainers.SortedList(free.tolist())
        return self._free

    # -- staging ----------------------------------------------------------
    def reserve(self, clusters: Iterable[int]) -> None:
        """Never hand out these clusters, whatever their refcount says (check's repair)."""
        free = self._free_index()
        for c in clusters:
            free.discard(c)
            self.reserved.add(c)

    def alloc(self, n: int = 1) -> int:
        """Take ``n`` contiguous free clusters; returns the byte offset of the first."""
        if n <= 0:
            raise ValueError("allocation of no clusters")
        free = self._free_index()
        start = None
        if n == 1:
            if free:
                start = free[0]
        else:
            run_start, run_len, prev = None, 0, None
            for c in free:
                if prev is not None and c == prev + 1:
                    run_len += 1
                else:
                    run_start, run_len = int(c), 1
                prev = c
                if run_len == n:
                    start = run_start
                    break
        if start is None:
            start = self._end
            while (used := self._first_used(start, n)) is not None:
                start = used + 1
            self._end = start + n
        for c in range(start, start + n):
            if c in free:
                free.remove(c)
            self.taken.add(c)
            self.deltas[c] = self.deltas.get(c, 0) + 1
        return start * self.cs

    def _first_used(self, start: int, n: int) -> int | None:
        """The first cluster of ``start .. start+n-1``, past the end of the file, that is
        in use: a structure claims it, or a refcount counts it (a leak, or damage). QEMU's
        allocator steps over both; handing out a counted one refused a write when its
        count was at the maximum (fuzz seed 20261207, case 45348). O(n), vectorised."""
        end = start + n
        claimed = min((c for c in self._used_past_end if start <= c < end), default=end)
        c = start
        while c < claimed:
            bi = c // self.epb
            hi = min(claimed, (bi + 1) * self.epb)
            if bi < len(self.reftable) and self.reftable[bi]:
                counted = np.flatnonzero(self.counts(bi, c - bi * self.epb, hi - bi * self.epb))
                if len(counted):
                    return c + int(counted[0])
            c = hi
        return claimed if claimed < end else None

    def reference(self, clusters: np.ndarray, delta: int = 1) -> None:
        """Add ``delta`` references to each of ``clusters`` (a cluster listed k times gets
        k·delta): a snapshot shares every cluster of the active tables. O(distinct clusters)."""
        self._bulk.append((np.asarray(clusters, dtype=np.int64), delta))

    def free(self, offset: int, n: int = 1) -> None:
        """Drop one reference from ``n`` clusters at ``offset`` (applied in the free step)."""
        c0 = offset // self.cs
        for c in range(c0, c0 + n):
            self.deltas[c] = self.deltas.get(c, 0) - 1

    def free_entry(self, entry: int) -> None:
        """Drop the reference a standard L2 entry holds: its cluster, or its compressed data."""
        if entry & OFLAG_COMPRESSED:
            self.free_clusters_of([compressed_span(entry, self.cluster_bits)])
        elif entry & L2E_OFFSET_MASK:
            self.free(entry & L2E_OFFSET_MASK, 1)

    def free_clusters_of(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Free every cluster touched by the byte ranges ``(offset, length)``."""
        for off, length in ranges:
            first = off // self.cs
            last = (off + length - 1) // self.cs
            self.free(first * self.cs, last - first + 1)

    # -- commit -----------------------------------------------------------
    def materialize(self) -> RefcountPlan:
        cs, epb = self.cs, self.epb
        new_blocks: dict[int, int] = {}
        new_rt: tuple[int, int] | None = None
        rt_entries = len(self.reftable)
        # Until the refcount table and blocks the changes need are themselves allocated
        # (which changes the changes). Each pass computes them once: O(clusters) for a
        # snapshot of every cluster.
        cl, dl = self.changes()
        while len(cl):
            need = int(cl[-1]) // epb + 1
            if need > rt_entries:
                if new_rt is not None:
                    self.free(new_rt[0], new_rt[1])
                else:
                    self.free(self.rt_offset, self.rt_clusters)
                clusters = -(-(need + need // 2 + 1) * rc.RT_ENTRY_SIZE // cs)
                new_rt = (self.alloc(clusters), clusters)
                rt_entries = clusters * cs // rc.RT_ENTRY_SIZE
            else:
                blocks = sorted_unique(cl // epb)
                hooked = np.zeros(len(blocks), dtype=bool)
                inside = blocks < len(self.reftable)
                hooked[inside] = self.reftable[blocks[inside]] != 0
                missing = [bi for bi in blocks[~hooked].tolist() if bi not in new_blocks]
                if not missing:
                    break
                for bi in missing:
                    new_blocks[bi] = self.alloc(1)
            del cl, dl                  # not held beside the next pass's arrays
            cl, dl = self.changes()
        plan = RefcountPlan([], [], [], [], new_rt)
        blocks = cl // epb
        cuts = np.flatnonzero(np.diff(blocks)) + 1
        for s, e in zip([0, *cuts.tolist()], [*cuts.tolist(), len(cl)]) if len(cl) else ():
            bi = int(blocks[s])
            idx, d = cl[s:e] - bi * epb, dl[s:e]
            # Only the entries between the first and last change, widened to whole bytes.
            a, b = rc.byte_span(int(idx[0]), int(idx[-1]) + 1, self.order)
            lo, hi = (a * 8) >> self.order, (b * 8) >> self.order
            old = self.counts(bi, lo, hi)
            # Python integers: a 64-bit refcount does not fit an int64.
            after = old[idx - lo].astype(object) + d.astype(object)
            low, high = after < 0, after > self.max
            if low.any():
                c = bi * epb + int(idx[np.argmax(low)])
                raise FormatError("refcount block", int(self.reftable[bi]) if bi < len(self.reftable) else None,
                                  f"refcount of cluster {c:#x} would drop below zero")
            if high.any():
                c = bi * epb + int(idx[np.argmax(high)])
                raise UsageError(f"refcount of cluster {c:#x} would exceed {self.max} "
                                 f"(refcount_bits={1 << self.order})")
            inc = old.copy()
            new = old.copy()
            up = d > 0
            inc[idx[up] - lo] = (old[idx[up] - lo].astype(object) + d[up].astype(object)).astype(np.uint64)
            new[idx - lo] = after.astype(np.uint64)
            if bi in new_blocks:
                block = bytearray(cs)
                block[a:b] = rc.pack_block(new, self.order)
                plan.precommit.append((new_blocks[bi], bytes(block)))
                continue
            base = int(self.reftable[bi]) + a
            old_b = rc.pack_block(old, self.order)
            inc_b = rc.pack_block(inc, self.order)
            new_b = rc.pack_block(new, self.order)
            plan.increase += _diff_writes(base, old_b, inc_b)
            plan.free += _diff_writes(base, inc_b, new_b)
        if new_rt is not None:
            table = np.zeros(new_rt[1] * cs // rc.RT_ENTRY_SIZE, dtype=np.uint64)
            table[:len(self.reftable)] = self.reftable
            for bi, off in new_blocks.items():
                table[bi] = off
            plan.precommit.append((new_rt[0], table.astype(">u8").tobytes()))
        else:
            for bi, off in sorted(new_blocks.items()):
                plan.hook.append((self.rt_offset + rc.RT_ENTRY_SIZE * bi, int(off).to_bytes(rc.RT_ENTRY_SIZE, "big")))
        return plan


    # -- invariants -------------------------------------------------------
    def _check(self) -> None:
        """Assert every internal invariant (for tests; O(clusters in the file)).

        With ``disk(c)`` the refcount on disk and ``delta(c)`` the staged change:

        1. the refcount table copy equals the table on disk, and each cached block
           equals the block on disk (``None`` exactly where the table has no block);
        2. every cluster handed out (``taken``) lies below the end the allocator
           covers, was free on disk (``disk(c) == 0``), is neither reserved nor in the
           free index, and is counted once: ``delta(c)`` is 1, or 0 once freed again;
        3. only a handed-out or reserved cluster gains a reference
           (``delta(c) > 0``), or one given more references on purpose
           (:meth:`reference`); a cluster never gains two in one transaction unless
           reserved (check's repair sets its counts directly) or referenced;
        4. once built, the free index is sorted and holds exactly the clusters below
           the end with ``disk(c) == 0`` that are neither taken nor reserved: a freed
           cluster is not handed out again before the commit;
        5. the file ends within the clusters the allocator covers, so that a cluster
           past the end is never handed out over data.

        A negative staged refcount is not asserted: it comes from a damaged image,
        and :meth:`materialize` reports it as a :class:`FormatError`.
        """
        cs, epb = self.cs, self.epb

        def at(c: int) -> str:
            return f"cluster {c} (at {c * cs:#x})"

        assert epb == cs * 8 >> self.order, f"allocator: {epb} entries per block for cluster size {cs}"
        disk_rt = self.medium.array(self.rt_offset, self.rt_clusters * cs // 8, ">u8").astype(np.uint64)
        assert len(self.reftable) == len(disk_rt), \
            f"allocator: refcount table copy has {len(self.reftable)} entries, the table on disk {len(disk_rt)}"
        diff = np.nonzero(self.reftable != disk_rt)[0]
        assert not len(diff), (f"allocator: refcount table entry {int(diff[0])} is "
                               f"{int(self.reftable[diff[0]]):#x} in the copy, {int(disk_rt[diff[0]]):#x} on disk")
        for bi, raw in self._raw.items():
            off = int(self.reftable[bi]) if bi < len(self.reftable) else 0
            if not off:
                assert raw is None, f"allocator: refcount block {bi} is cached but the table has no block for it"
                continue
            assert raw is not None and raw == self.medium.read(off, cs), \
                f"allocator: cached refcount block {bi} (at {off:#x}) differs from the block on disk"
        assert self.medium.size <= self._end * cs, \
            f"allocator: the file ends at {self.medium.size:#x}, past the clusters covered ({self._end * cs:#x})"
        disk = self.all_refcounts(self._end)
        for c in sorted(self.taken):
            assert 0 <= c < self._end, f"allocator: {at(c)} was handed out past the end (cluster {self._end})"
            assert int(disk[c]) == 0, f"allocator: {at(c)} was handed out with refcount {int(disk[c])} on disk"
            assert c not in self.reserved, f"allocator: {at(c)} is reserved and was handed out"
            assert self.deltas.get(c, 0) in (0, 1), \
                f"allocator: {at(c)} was handed out, but its staged change is {self.deltas.get(c, 0):+d}"
        referenced = set(self.referenced().tolist())
        for c, d in sorted(self.deltas.items()):
            assert c >= 0, f"allocator: a staged change for negative cluster {c}"
            if d > 0:
                assert c in self.taken or c in self.reserved or c in referenced, \
                    f"allocator: {at(c)} gains {d} reference(s) but was never handed out"
        if self._free is None:
            return
        self._free._check()
        free = set(self._free)
        assert len(free) == len(self._free), "allocator: the free index holds a cluster twice"
        expect = set(np.nonzero(disk == 0)[0].tolist()) - self.taken - self.reserved
        if self.in_use is not None:
            expect -= set(self.in_use().tolist())     # structures in use, whatever their refcount
        for c in sorted(free - expect)[:1]:
            why = ("past the end" if not 0 <= c < self._end else "handed out" if c in self.taken else
                   "reserved" if c in self.reserved else f"its refcount on disk is {int(disk[c])}")
            raise AssertionError(f"allocator: {at(c)} is in the free index, but {why}")
        for c in sorted(expect - free)[:1]:
            raise AssertionError(f"allocator: {at(c)} has refcount 0 on disk and is not taken, "
                                 "but it is missing from the free index")


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """The distinct values of the sorted array ``a``, in O(n). ``np.unique`` sorts again,
    and loads ``numpy.ma`` on its first call (4.6 ms of a command's start).

    >>> sorted_unique(np.array([1, 1, 2, 5, 5])).tolist()
    [1, 2, 5]
    """
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if len(a) else a


def _diff_writes(base: int, old: bytes, new: bytes) -> list[Write]:
    """One write covering the bytes that differ between two versions of a block."""
    if old == new:
        return []
    a = np.frombuffer(old, dtype=np.uint8)
    b = np.frombuffer(new, dtype=np.uint8)
    idx = np.nonzero(a != b)[0]
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    return [(base + lo, new[lo:hi])]

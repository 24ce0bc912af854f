"""Change the refcount width of an image (``amend -o refcount_bits=N``) in one journaled switch.

What QEMU does (block/qcow2-refcount.c ``qcow2_change_refcount_order``): it builds a
new refcount table and new blocks of the new width in free clusters, walking the old
structure until the new one counts every cluster in use, itself included, then points
the header at it and frees the old table and blocks. Here the same walk is done on
arrays, and the switch is one transaction declared like ``check -r all``'s rebuild
(:meth:`qjournal.core.image.Image.transaction` with ``refcount_table``):

1. Every refcount of the old structure is read as it stands (a leak stays a leak, a
   snapshot's shared cluster keeps its 2). A count the new width cannot hold is refused
   before anything is written, naming the cluster and its count, as qemu-img refuses.
2. The new blocks (one cluster each) and the new table (contiguous) go into clusters
   the old structure calls free and no structure occupies (the overlap map), first
   fit, then past the end of the file. They count themselves, and the old table and
   blocks too (in use until the switch). Placing a block can need another block or a
   larger table, so the walk repeats until nothing changes.
3. The transaction stages the new structure as new clusters: written and synced before
   the commit (ordered mode), invisible until the switch; a crash before the commit
   leaves the old image, perhaps with a longer file. The header switch writes
   ``refcount_order``, ``refcount_table_offset`` and ``refcount_table_clusters`` in one
   sector (``header-switched``): the old structure or the new one, never a mix. Then the
   old table and blocks lose their count in the new blocks (``clusters-freed``); a
   crash between the two leaks them, which is allowed.

Cost: one read of every old refcount block, O(clusters counted) numpy, and one write of
the new structure.
"""
from __future__ import annotations

from ..format.lazy import np

from ..core.allocator import sorted_unique
from ..core.image import Image
from ..errors import UsageError
from ..format import refcount as rc

_DTYPE = {0: "u1", 1: "u1", 2: "u1", 3: "u1", 4: "u2", 5: "u4", 6: "u8"}     # the narrowest that holds a count


def old_counts(img: Image) -> tuple[np.ndarray, np.ndarray]:
    """(clusters, counts) of every non-zero refcount of ``img``'s structure, sorted by cluster."""
    h, cs = img.header, img.header.cluster_size
    epb = rc.entries_per_block(cs, h.refcount_order)
    table = img.medium.array(h.refcount_table_offset, h.refcount_table_clusters * cs // rc.RT_ENTRY_SIZE, ">u8")
    clusters, counts = [], []
    for bi in np.nonzero(table)[0].tolist():
        off = int(table[bi]) & rc.RT_OFFSET_MASK
        block = rc.unpack_counts(img.medium.read(off, cs), h.refcount_order)
        nz = np.flatnonzero(block)
        clusters.append(nz + bi * epb)
        counts.append(block[nz])
    if not clusters:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(clusters).astype(np.int64), np.concatenate(counts)


def check_width(img: Image, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Refuse a refcount of ``img`` that ``1 << order`` bits cannot hold, naming the
    cluster and the count as qemu-img does; else :func:`old_counts`."""
    clusters, counts = old_counts(img)
    over = np.flatnonzero(counts > rc.max_refcount(order))
    if len(over):
        c = int(clusters[over[0]]) * img.header.cluster_size
        raise UsageError(f"{img.path}: cannot decrease refcount entry width to {1 << order} bits: cluster at "
                         f"offset {c:#x} has a refcount of {int(counts[over[0]])}")
    return clusters, counts


class _Free:
    """Clusters the new structure may take: free ones inside the file, first fit, then past its end."""

    def __init__(self, inside: np.ndarray, end: int, in_use: np.ndarray) -> None:
        self.inside = inside            # sorted free clusters below ``end``
        self.taken = np.zeros(len(inside), dtype=bool)
        self.next = 0                   # no untaken cluster before this index
        self.end = end
        self.past = set(in_use[in_use >= end].tolist())   # a damaged pointer past the end

    def one(self) -> int:
        while self.next < len(self.inside) and self.taken[self.next]:
            self.next += 1
        if self.next < len(self.inside):
            self.taken[self.next] = True
            return int(self.inside[self.next])
        return self.run(1)

    def run(self, n: int) -> int:
        left = np.flatnonzero(~self.taken)
        cl = self.inside[left]
        if len(cl) >= n:
            starts = np.flatnonzero(cl[n - 1:] - cl[:len(cl) - n + 1] == n - 1)
            if len(starts):
                self.taken[left[starts[0]:starts[0] + n]] = True
                return int(cl[starts[0]])
        start = self.end
        while any(c in self.past for c in range(start, start + n)):
            start += 1
        self.end = start + n
        return start


def plan_structure(img: Image, order: int) -> tuple[tuple[int, int], list[tuple[int, bytes]], list[int]]:
    """The new refcount structure of width ``1 << order`` for ``img``: ((table offset,
    table clusters), (offset, bytes) of its blocks and table, clusters of the old table
    and blocks). Refuses counts the new width cannot hold."""
    h, cs = img.header, img.header.cluster_size
    clusters, counts = check_width(img, order)
    epb = rc.entries_per_block(cs, order)
    end = -(-img.medium.size // cs)
    in_use = img.overlap_map().clusters         # sorted
    taken = np.zeros(end, dtype=bool)
    taken[clusters[clusters < end]] = True
    taken[in_use[in_use < end]] = True
    free = _Free(np.flatnonzero(~taken), end, in_use)
    counted = sorted_unique(clusters // epb).tolist()    # blocks the old counts need
    blocks: dict[int, int] = {}                # block index -> cluster
    table: tuple[int, int] | None = None       # (first cluster, clusters)
    while True:
        own = list(blocks.values()) + (list(range(table[0], table[0] + table[1])) if table else [])
        needed = sorted(set(counted).union(c // epb for c in own))
        missing = [b for b in needed if b not in blocks]
        rt_clusters = -(-(needed[-1] + 1) * rc.RT_ENTRY_SIZE // cs)
        if not missing and table is not None and table[1] >= rt_clusters:
            break
        for b in missing:
            blocks[b] = free.one()
        if table is None or table[1] < rt_clusters:
            # A table outgrown by the blocks just placed is left unused (nothing counts it).
            table = (free.run(rt_clusters), rt_clusters)
    mine = np.array(sorted(blocks.values()) + list(range(table[0], table[0] + table[1])), dtype=np.int64)
    # Every new block in one array (blocks in table order), packed at once: the old
    # counts, then the new structure's own clusters (1 each).
    bidx = np.array(sorted(blocks), dtype=np.int64)
    packed = np.zeros(len(bidx) * epb, dtype=_DTYPE[order])
    for cl, n in ((clusters, counts), (mine, 1)):
        packed[np.searchsorted(bidx, cl // epb) * epb + cl % epb] = n
    raw = memoryview(rc.pack_block(packed, order))
    del packed
    rt = np.zeros(table[1] * cs // rc.RT_ENTRY_SIZE, dtype=">u8")
    rt[bidx] = np.array([blocks[b] for b in bidx.tolist()], dtype=np.int64) * cs
    # One write per run of adjacent clusters (views into the packed bytes until joined).
    content = {blocks[b]: raw[k * cs:(k + 1) * cs] for k, b in enumerate(bidx.tolist())}
    rt_raw = memoryview(rt.tobytes())
    content.update({table[0] + k: rt_raw[k * cs:(k + 1) * cs] for k in range(table[1])})
    writes: list[tuple[int, bytes]] = []
    run: list[memoryview] = []
    first = prev = -2
    for c in sorted(content):
        if c != prev + 1 and run:
            writes.append((first * cs, b"".join(run)))
            run = []
        if not run:
            first = c
        run.append(content[c])
        prev = c
    writes.append((first * cs, b"".join(run)))
    old_table = h.refcount_table_offset // cs
    old = list(range(old_table, old_table + h.refcount_table_clusters))
    t = img.medium.array(h.refcount_table_offset, h.refcount_table_clusters * cs // rc.RT_ENTRY_SIZE, ">u8")
    old += [(int(x) & rc.RT_OFFSET_MASK) // cs for x in t[t != 0]]
    return (table[0] * cs, table[1]), writes, old


def change_refcount_order(img: Image, order: int) -> None:
    """Switch ``img`` (open ``r+``) to refcounts of ``1 << order`` bits, in one transaction."""
    if order == img.header.refcount_order:
        return
    (rt_offset, rt_clusters), writes, old = plan_structure(img, order)
    cs = img.header.cluster_size
    with img.transaction(f"amend refcount_bits={1 << order}", refcount_table=(rt_offset, rt_clusters),
                         refcount_order=order, refcount_structure=writes) as tx:
        # After the header switch: the old table and blocks, counted by the new
        # structure until then, are freed (clusters-freed). A crash before leaks them.
        for c in old:
            tx.alloc.free(c * cs)

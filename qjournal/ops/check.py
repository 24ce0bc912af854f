"""``qjournal check``: rebuild the refcounts from every reference and compare.

The semantics and counters are qemu-img 7.2's (``qcow2_check_refcounts``):

* every reference adds one to the cluster that holds its first byte: the header
  cluster, the active L1 table and its L2 tables and data clusters, each snapshot's
  L1 table and everything under it, the snapshot table, the refcount table, the LUKS
  header, the bitmap directory, tables and data, and last the refcount blocks;
* an L1 or standard L2 entry with reserved bits set, an unaligned L2 table or data
  cluster offset, the COPIED flag on a compressed cluster, a refcount block that is
  unaligned, outside the file or referenced more than once are corruptions;
* a cluster whose on-disk refcount is higher than its references is a leak, lower
  is a corruption; a referenced cluster whose refcount is 0 means the refcount
  structure itself must be rebuilt (as does any damaged refcount block entry);
* COPIED flags of the active tables are judged last, against the refcounts as they
  are after the repair;
* references past the end of the file count (QEMU reads zeros there): they make the
  image end offset larger and show as refcount-0 corruptions;
* references past a refcount's maximum are one corruption each (QEMU's "overflow
  cluster"); no repair can fix them but a wider refcount. Counts are unsigned: a
  64-bit count above 2^63 - 1 is held as 2^63 - 1 (``refcount.unpack_counts``);
* extended L2: a compressed entry with a non-zero subcluster bitmap is a corruption
  and is not counted (its clusters leak); a subcluster both allocated and zero, or an
  allocated subcluster in an unallocated cluster, is a corruption
  (``_Scan._subcluster_rules``);
* a version 3 snapshot entry with under 16 bytes of extra data is a corruption
  ("incomplete"); ``-r all`` writes the snapshot table anew with each entry complete;
* a backing file that cannot be opened is a refusal, as qemu-img's open fails.

Repair (``-r leaks`` / ``-r all``) is one journaled transaction (two when in-use
bitmaps are made consistent after a rebuild). In place, when the refcount structure
is sound: refcount increases first, then dropping what must go, then decreases, so a
crash in between only ever leaves leaks. Otherwise (``-r all`` only; QEMU's
``rebuild_refcount_structure``): a fresh refcount table and blocks holding the final
counts are written past the end of the file, where nothing references them, and made
durable; the transaction then switches the header to them in one sector write. A
crash before the switch leaves the old image and a longer file with unreferenced
clusters (invisible); after it, the new counts. The old table and blocks are simply
free in the new counts.

qjournal also repairs what ``qemu-img check -r all`` leaves alone, always by dropping
a reference that cannot be read anyway (QEMU fails the read or returns zeros):

* an L1 entry whose L2 table is unaligned, past the end of the file, or inside
  other metadata (header, L1, refcount or snapshot table, refcount block, bitmaps)
  is cleared: its guest range becomes unallocated;
* an L2 entry whose data cluster is unaligned, past the end of the file, or inside
  metadata other than a refcount block (a rebuild moves those away instead, as QEMU
  does) becomes a zero cluster (unallocated on a v2 image, which has none);
* a compressed entry with a non-zero subcluster bitmap is dropped (it reads as
  zeros); conflicting or stray allocation bits of a subcluster bitmap are cleared;
* a bitmaps extension too damaged to open is dropped (the autoclear rule: as if a
  program without bitmap support had written the image), and bitmaps left
  ``in_use`` are made all-dirty and consistent.
"""
from __future__ import annotations

from typing import Iterator

import attrs

from ..format.lazy import np
from ..errors import QcowError, UsageError
from ..format import bitmaps as bm
from ..format import refcount as rc
from ..format.extensions import EXT_CRYPTO, crypto_header_span
from ..format.geometry import SECTOR
from ..format.header import INCOMPAT_CORRUPT, INCOMPAT_DIRTY
from ..format.snapshots import MIN_EXTRA_V3, completed
from ..format.tables import (L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK, L2E_RESERVED_MASK,
                            OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, compressed_geometry, l2_entries)
from ..core.image import Image
from ..core.ordering import Phase
from ..core.transaction import Transaction
from ..read.guest import GuestReader
from .bitmaps import Bitmaps
from ..progress import Progress

MAX_MESSAGES = 300
L2_CHUNK_BYTES = 4 << 20   # L2 tables decoded at a time: this many bytes of them (each decoded entry
                           # costs about 8 arrays of 8 bytes while its chunk is walked)


@attrs.define
class CheckResult:
    filename: str
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    messages: list[str] = attrs.Factory(list)
    # Of ``corruptions``: entries without COPIED whose refcount is 1. qemu-img counts them
    # as corruptions too, but they only cost one copy-on-write at the next write (the
    # dangerous way round is COPIED on a shared cluster): a crash between the phases that
    # clear COPIED and raise a refcount (snapshots, repairs) may leave them.
    copied_too_few: int = 0

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"image-end-offset": self.image_end_offset,
                                  "total-clusters": self.total_clusters}
        for key, val in (("corruptions", self.corruptions), ("leaks", self.leaks),
                         ("corruptions-fixed", self.corruptions_fixed), ("leaks-fixed", self.leaks_fixed),
                         ("allocated-clusters", self.allocated_clusters),
                         ("fragmented-clusters", self.fragmented_clusters),
                         ("compressed-clusters", self.compressed_clusters)):
            if val:
                out[key] = val
        out.update({"check-errors": self.check_errors, "filename": self.filename, "format": "qcow2"})
        return out

    @property
    def exit_code(self) -> int:
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def error(self, text: str, corruptions: int = 1) -> None:
        self.corruptions += corruptions
        self.say(f"ERROR {text}")

    def say(self, text: str) -> None:
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(text)


@attrs.define
class _Entries:
    """Table entries of the active tables whose COPIED flag must mean "refcount is 1"."""

    pos: list[np.ndarray] = attrs.Factory(list)      # byte offset of the entry in the image
    value: list[np.ndarray] = attrs.Factory(list)    # the entry (reserved bits cleared)
    keep: list[np.ndarray] = attrs.Factory(list)     # False where -r all drops the entry
    ref: list[int] = attrs.Factory(list)             # per part: the refcount to judge by, -1: look it up

    def add(self, pos: np.ndarray, value: np.ndarray, keep: np.ndarray, refcount: int = -1) -> None:
        """Entries to judge; ``refcount`` >= 0 stands for every one of them (data-file clusters: 1)."""
        self.pos.append(pos.astype(np.int64))
        self.value.append(value.astype(np.uint64))
        self.keep.append(keep.astype(bool))
        self.ref.append(refcount)

    def parts(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
        """Each part as added: (positions, entries, keep, refcount); judged part by part, so
        that nothing the size of every entry is built again."""
        yield from zip(self.pos, self.value, self.keep, self.ref)


class _Scan:
    """Every reference of the image, as cluster indices (QEMU's in-memory refcount table).

    A reference whose range ends a cluster or more past the end of the file is not
    counted: it is a corruption of its own (QEMU 7.2). One that ends less than a
    cluster past it may count the cluster just past the end: ``m = n + 1`` slots.
    """

    def __init__(self, img: Image, result: CheckResult) -> None:
        h = img.header
        self.img, self.result = img, result
        self.cs, self.cb = h.cluster_size, h.cluster_bits
        self.fsize = img.medium.size
        self.n = -(-self.fsize // self.cs)
        self.m = self.n + 1
        self.refs: list[np.ndarray] = []       # every counted reference (as index_type)
        # Cluster indices are held in 32 bits when the file allows: 2M clusters cost 8 MiB, not 16.
        self.index_type = np.int32 if self.m < 1 << 31 else np.int64
        self.dropped: list[np.ndarray] = []    # the counted references a repair removes with their entries
        self.refstruct: list[int] = []         # clusters of the refcount table and blocks
        self.l1_writes: dict[int, bytes] = {}  # entry position -> new entry (drops, reserved bits cleared)
        self.l2_writes: dict[int, bytes] = {}
        self.copied = _Entries()
        self.rebuild = False
        # Metadata that an L2 table or data cluster must not share a cluster with.
        self.meta = np.zeros(self.m, dtype=bool)
        self.refblocks = np.zeros(self.m, dtype=bool)
        self.l2_tables = np.zeros(self.m, dtype=bool)

    # -- reading, zeros past the end of the file (as QEMU reads) ---------------
    def read_u64(self, off: int, count: int) -> np.ndarray:
        out = np.zeros(count, dtype=np.uint64)
        if off % 8 == 0:
            avail = max(0, min(count, (self.fsize - off) // 8))
            if avail:
                out[:avail] = self.img.medium.array(off, avail, ">u8")
            return out
        avail = max(0, min(count * 8, self.fsize - off))
        raw = bytearray(count * 8)
        raw[:avail] = self.img.medium.read(off, avail)
        return np.frombuffer(bytes(raw), dtype=">u8").astype(np.uint64)

    # -- counting ---------------------------------------------------------------
    def span(self, off: int, length: int) -> np.ndarray:
        if length <= 0:
            return np.zeros(0, np.int64)
        return np.arange(off // self.cs, (off + length - 1) // self.cs + 1, dtype=np.int64)

    def add_range(self, off: int, length: int, what: str) -> np.ndarray:
        """Count one metadata range; the clusters counted."""
        if length <= 0:
            return np.zeros(0, np.int64)
        if off + length - self.fsize >= self.cs:
            self.result.error(f"{what} at {off:#x}+{length:#x} exceeds the end of the file by a cluster or more")
            return np.zeros(0, np.int64)
        clusters = self.span(off, length)
        self.refs.append(clusters.astype(self.index_type))
        self.meta[clusters] = True
        return clusters

    def ranges(self, off: np.ndarray, size: np.ndarray | int, what: str | None) -> tuple[np.ndarray, np.ndarray]:
        """Clusters of ranges ``(off, size)`` (each at most 3 clusters), less those too far out
        (corruptions, unless ``what`` is None); per range, whether it was too far out."""
        off = off.astype(np.int64)
        size = np.broadcast_to(np.asarray(size, dtype=np.int64), off.shape)
        far = off + size - self.fsize >= self.cs
        if far.any() and what is not None:
            for o in off[far].tolist()[:20]:
                self.result.say(f"ERROR: {what} at {o:#x} exceeds the end of the file by a cluster or more")
            self.result.corruptions += int(far.sum())
        first, last = off // self.cs, (off + size - 1) // self.cs
        parts = [first[~far]]
        for k in range(1, int((last - first).max(initial=0)) + 1):
            parts.append((first + k)[~far & (first + k <= last)])
        return np.concatenate(parts), far

    def count(self, clusters: np.ndarray, dropped: np.ndarray | None = None) -> None:
        self.refs.append(clusters.astype(self.index_type))
        if dropped is not None:
            self.dropped.append(dropped)

    def walk_l1(self, l1_offset: int, l1_size: int, active: bool) -> None:
        """Count an L1 table's L2 tables and their clusters (``check_refcounts_l1``)."""
        res, cs = self.result, self.cs
        l1 = self.read_u64(l1_offset, l1_size)
        idx = np.nonzero(l1)[0]
        raw = l1[idx]
        pos = l1_offset + 8 * idx.astype(np.int64)
        resv = (raw & np.uint64(L1E_RESERVED_MASK)) != 0
        for e in raw[resv].tolist()[:20]:
            res.say(f"ERROR found L1 entry with reserved bits set: {e:#x}")
        res.corruptions += int(resv.sum())
        ent = raw & ~np.uint64(L1E_RESERVED_MASK)
        l2off = ent & np.uint64(L1E_OFFSET_MASK)
        unaligned = (l2off % np.uint64(cs)) != 0
        for o in l2off[unaligned].tolist()[:20]:
            res.say(f"ERROR l2_offset={o:#x}: Table is not cluster aligned; L1 entry corrupted")
        res.corruptions += int(unaligned.sum())
        clusters, _ = self.ranges(l2off.astype(np.int64), cs, "L2 table")
        whole = l2off + np.uint64(cs) <= np.uint64(self.fsize)
        c = (l2off // np.uint64(cs)).astype(np.int64)
        clash = np.zeros(len(ent), dtype=bool)
        ok = whole & ~unaligned
        clash[ok] = self.meta[c[ok]] | self.refblocks[c[ok]]
        drop = unaligned | ~whole | clash
        self.count(clusters, self.ranges(l2off[drop], cs, None)[0])
        for p, e, d in zip(pos[resv | drop].tolist(), ent[resv | drop].tolist(), drop[resv | drop].tolist()):
            self.l1_writes[p] = bytes(8) if d else int(e).to_bytes(8, "big")
        if active:
            self.copied.add(pos, ent, ~drop)
        # L2 tables a chunk at a time: memory stays bounded on a large image, and a
        # terminal shows how far the check is. A chunk is also at most a quarter of the
        # file: a damaged L1 table may name one table thousands of times, and what a
        # chunk decodes must stay within the image's own size.
        chunk = max(1, min(L2_CHUNK_BYTES, self.fsize // 4) // cs)
        with Progress(len(l2off), "check", "L2 table", minimum=chunk) as bar:
            for i in range(0, len(l2off), chunk):
                self._walk_l2(l2off[i:i + chunk], drop[i:i + chunk], active)
                bar.update(len(l2off[i:i + chunk]))

    def _walk_l2(self, l2off: np.ndarray, l1_drop: np.ndarray, active: bool) -> None:
        """Several L2 tables of one L1 at once (``check_refcounts_l2``), vectorised over entries."""
        if not len(l2off):
            return
        img, res, cs = self.img, self.result, self.cs
        ext = img.header.extended_l2
        per = l2_entries(cs, ext)
        width = 2 if ext else 1
        tables = np.stack([self.read_u64(int(o), per * width) for o in l2off.tolist()])
        ent = tables[:, ::2] if ext else tables
        comp = (ent & np.uint64(OFLAG_COMPRESSED)) != 0
        resv = ~comp & ((ent & np.uint64(L2E_RESERVED_MASK)) != 0)
        if resv.any():
            for e in ent[resv].tolist()[:20]:
                res.say(f"ERROR found l2 entry with reserved bits set: {e:#x}")
            res.corruptions += int(resv.sum())
            ent = np.where(resv, ent & ~np.uint64(L2E_RESERVED_MASK), ent)
        off = ent & np.uint64(L2E_OFFSET_MASK)
        std = ~comp & (off != 0)        # normal and preallocated zero clusters
        if img.header.has_data_file:
            # Offset 0 with COPIED is guest data at the start of the data file (unless
            # the zero flag makes it a plain zero cluster).
            at0 = ~comp & (off == 0) & ((ent & np.uint64(OFLAG_COPIED)) != 0)
            if not ext:
                at0 &= (ent & np.uint64(OFLAG_ZERO)) == 0
            std |= at0
        pos = l2off.astype(np.int64)[:, None] + 8 * width * np.arange(per, dtype=np.int64)[None, :]
        gone = np.broadcast_to(l1_drop[:, None], ent.shape)   # the whole table is dropped
        fix = resv & ~gone
        if ext:
            comp = self._subcluster_rules(tables[:, 1::2], comp, std, pos, gone)

        # Compressed clusters: the bytes they occupy; never COPIED.
        if comp.any():
            centries = ent[comp]
            mask, shift, smask = compressed_geometry(self.cb)
            copied = (centries & np.uint64(OFLAG_COPIED)) != 0
            for e in centries[copied].tolist()[:20]:
                res.say(f"ERROR: coffset={e & mask:#x}: copied flag must never be set for compressed clusters")
            res.corruptions += int(copied.sum())
            coff = (centries & np.uint64(mask)).astype(np.int64)
            nsec = ((centries >> np.uint64(shift)) & np.uint64(smask)).astype(np.int64) + 1
            clusters, far = self.ranges(coff, nsec * SECTOR - (coff & (SECTOR - 1)), "compressed cluster")
            cgone = gone[comp]
            kill = far & ~cgone
            drop_c, _ = self.ranges(coff[cgone], (nsec * SECTOR - (coff & (SECTOR - 1)))[cgone], None)
            self.count(clusters, drop_c)
            cpos = pos[comp]
            newv = np.where(kill, np.uint64(0), centries & ~np.uint64(OFLAG_COPIED))
            for p, v in zip(cpos[(kill | copied) & ~cgone].tolist(), newv[(kill | copied) & ~cgone].tolist()):
                self.l2_writes[p] = self._zero_entry() if v == 0 else int(v).to_bytes(8, "big")
            if active:
                n = int(comp.sum())
                res.allocated_clusters += n
                res.compressed_clusters += n
                res.fragmented_clusters += n   # QEMU: compressed clusters are fragmented by nature

        # Normal and preallocated zero clusters.
        rows, cols = np.nonzero(std)
        offs = off[rows, cols].astype(np.int64)
        unaligned = offs % cs != 0
        for o in offs[unaligned].tolist()[:20]:
            res.say(f"ERROR offset={o:#x}: Cluster is not properly aligned; L2 entry corrupted.")
        res.corruptions += int(unaligned.sum())
        if active:
            res.allocated_clusters += len(offs)
            if len(offs) > 1:
                jump = offs[1:] != offs[:-1] + cs
                res.fragmented_clusters += int((jump & (rows[1:] == rows[:-1])).sum())
        already = l1_drop[rows]
        # Data clusters in an external data file have no refcounts here and lie
        # wherever the data file reaches: only their alignment is checked (QEMU).
        # A data cluster may end past the end of the file (QEMU does not write the tail
        # of a fresh cluster, nor do we the unwritten subclusters): only one that starts
        # there is unreadable.
        whole = offs < self.fsize if not img.header.has_data_file else np.ones(len(offs), dtype=bool)
        c = offs // cs
        clash = np.zeros(len(offs), dtype=bool)
        ok = whole & ~unaligned
        drop = unaligned | ~whole
        if not img.header.has_data_file:
            clash[ok] = self.meta[c[ok]] | self.l2_tables[c[ok]]
            drop |= clash
            clusters, far = self.ranges(offs, cs, "data cluster")
            drop_d, _ = self.ranges(offs[drop | already], cs, None)
            self.count(clusters, drop_d)
        p_std = pos[rows, cols]
        e_std = ent[rows, cols]
        for p in p_std[drop & ~already].tolist():
            self.l2_writes[p] = self._zero_entry()
        keepfix = fix[rows, cols] & ~drop
        for p, e in zip(p_std[keepfix].tolist(), e_std[keepfix].tolist()):
            self.l2_writes[p] = int(e).to_bytes(8, "big")
        if active:
            self.copied.add(p_std, e_std, ~(drop | already), 1 if img.header.has_data_file else -1)
        other = fix & ~std & ~comp     # unallocated or plain zero entries with reserved bits
        for p, e in zip(pos[other].tolist(), ent[other].tolist()):
            self.l2_writes[p] = int(e).to_bytes(8, "big")

    def _subcluster_rules(self, bmp: np.ndarray, comp: np.ndarray, std: np.ndarray, pos: np.ndarray,
                          gone: np.ndarray) -> np.ndarray:
        """QEMU's subcluster bitmap rules (``check_refcounts_l2``); the compressed entries still counted.

        * a compressed entry's bitmap must be 0: QEMU neither counts such an entry nor
          reads it, so its clusters are leaked; the repair drops it (it reads as zeros);
        * a subcluster of an allocated cluster may not be both allocated and zero (QEMU
          fails every read of the cluster): the repair clears those allocation bits, so
          the subcluster reads as zeros and the others keep their data;
        * an unallocated cluster may mark no subcluster allocated: the repair clears
          those bits.

        Each broken entry is one corruption, in every table, active or not.
        """
        res = self.result
        alloc, zero = bmp & np.uint64(0xFFFFFFFF), bmp >> np.uint64(32)
        bad_comp = comp & (bmp != 0)
        both = std & ((alloc & zero) != 0)
        stray = ~comp & ~std & (alloc != 0)
        for what, bad in (("compressed cluster with a non-zero subcluster bitmap", bad_comp),
                          ("allocated cluster has a subcluster both allocated and zero", both),
                          ("unallocated cluster has subclusters marked allocated", stray)):
            for p, b in zip(pos[bad].tolist()[:20], bmp[bad].tolist()[:20]):
                res.say(f"ERROR L2 entry at {p:#x}: {what} (bitmap {b:#018x})")
            res.corruptions += int(bad.sum())
        for p in pos[bad_comp & ~gone].tolist():
            self.l2_writes[p] = self._zero_entry()
        # Only the bitmap word (8 bytes on from the entry): the entry itself stays as it is.
        fixed = np.where(both, bmp & ~(bmp >> np.uint64(32)), bmp & ~np.uint64(0xFFFFFFFF))
        for p, b in zip(pos[(both | stray) & ~gone].tolist(), fixed[(both | stray) & ~gone].tolist()):
            self.l2_writes[p + 8] = int(b).to_bytes(8, "big")
        return comp & ~bad_comp

    def _zero_entry(self) -> bytes:
        """An L2 entry that reads as zeros (unallocated on v2, which has no zero flag)."""
        h = self.img.header
        if h.extended_l2:
            return bytes(8) + (0xFFFFFFFF << 32).to_bytes(8, "big")
        return (OFLAG_ZERO if h.version >= 3 else 0).to_bytes(8, "big")


def _l2_table_mask(img: Image, scan: _Scan) -> list[tuple[int, int, bool]]:
    """Mark the clusters holding an L2 table (active or snapshot); the L1 tables to walk."""
    l1s = [(img.header.l1_table_offset, img.header.l1_size, True)]
    l1s += [(s.l1_table_offset, s.l1_size, False) for s in img.snapshots]
    for off, size, _ in l1s:
        l2 = scan.read_u64(off, size) & np.uint64(L1E_OFFSET_MASK)
        l2 = l2[(l2 != 0) & (l2 % np.uint64(scan.cs) == 0)] // np.uint64(scan.cs)
        scan.l2_tables[l2[l2 < np.uint64(scan.n)].astype(np.int64)] = True
    return l1s


class _OnDisk:
    """The refcounts as the image's refcount table and blocks say, read without trusting them."""

    def __init__(self, img: Image, scan: _Scan) -> None:
        h = img.header
        self.scan, self.order = scan, h.refcount_order
        self.epb = rc.entries_per_block(scan.cs, h.refcount_order)
        self.table = scan.read_u64(h.refcount_table_offset, h.refcount_table_clusters * scan.cs // 8)

    def _raw(self, bi: int, end: int) -> bytes | None:
        """The first ``end`` bytes of block ``bi``, zeros where there is no block or no file
        (None where QEMU's read of it fails: an unaligned entry)."""
        off = int(self.table[bi]) & rc.RT_OFFSET_MASK if bi < len(self.table) else 0
        if not off:
            return bytes(end)
        if off % self.scan.cs:
            return None
        raw = bytearray(end)
        avail = max(0, min(end, self.scan.fsize - off))
        if avail:
            raw[:avail] = self.scan.img.medium.read(off, avail)
        return bytes(raw)

    def block(self, bi: int, count: int) -> np.ndarray | None:
        """Counts ``0 .. count-1`` of block ``bi`` (None: unreadable). Only their bytes are
        read and decoded: a block of narrow counts in large clusters holds millions (2-bit
        counts in 2 MiB clusters: 8 Mi, 64 MiB as int64; fuzz case 54680)."""
        count = min(count, self.epb)
        raw = self._raw(bi, rc.byte_span(0, count, self.order)[1])
        return None if raw is None else rc.unpack_counts(raw, self.order)[:count]

    def counts(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(refcounts, unreadable) of clusters ``0 .. n-1``."""
        out = np.zeros(n, np.int64)
        err = np.zeros(n, dtype=bool)
        for bi in range(min(-(-n // self.epb), len(self.table))):
            lo, hi = bi * self.epb, min(n, (bi + 1) * self.epb)
            b = self.block(bi, hi - lo)
            if b is None:
                err[lo:hi] = True
            else:
                out[lo:hi] = b[:hi - lo]
        return out, err

    def lookup(self, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(refcounts, unreadable) of arbitrary clusters (those past the end of the file)."""
        out = np.zeros(len(clusters), np.int64)
        err = np.zeros(len(clusters), dtype=bool)
        for bi in np.unique(clusters // self.epb).tolist():
            sel = clusters // self.epb == bi
            at = clusters[sel] % self.epb
            raw = self._raw(int(bi), rc.byte_span(0, int(at.max()) + 1, self.order)[1])
            if raw is None:
                err[sel] = True
            else:
                out[sel] = rc.unpack_counts(raw, self.order, at)
        return out, err


def check(img: Image, repair: str | None = None) -> CheckResult:
    """Check ``img`` (and repair with ``repair`` = ``"leaks"`` or ``"all"``).

    Cost: one read of every L1 and L2 table and every refcount block, O(clusters) numpy.
    """
    h, cs = img.header, img.header.cluster_size
    if img.backing_name is not None:
        # qemu-img check opens the backing chain first: a backing file it cannot open
        # is a refusal (exit 1), not a clean image.
        chain = GuestReader(img)
        try:
            chain.backing
        except QcowError:
            raise
        except (OSError, ValueError) as why:   # a name the OS cannot open at all (a NUL byte in it)
            raise UsageError(f"{img.path}: cannot open backing file {img.backing_name!r}: {why}") from None
        finally:
            chain.close()
    result = CheckResult(img.path)
    result.total_clusters = -(-h.size // cs)
    scan = _Scan(img, result)
    # Header, refcount table, active L1, snapshot table, bitmap directory and tables.
    for off, length, what in img.metadata_ranges():
        counted = scan.add_range(off, length, what)
        if what == "refcount table":
            scan.refstruct += counted.tolist()
    for s in img.snapshots:
        scan.add_range(s.l1_table_offset, s.l1_size * 8, "snapshot L1 table")
    # QEMU's qcow2_check_read_snapshot_table: a version 3 entry without disk_size.
    incomplete = [i for i, s in enumerate(img.snapshots) if h.version >= 3 and len(s.extra) < MIN_EXTRA_V3]
    for i in incomplete:
        result.error(f"snapshot table entry {i} is incomplete" + (" (repaired)" if repair == "all" else ""))
    crypto = next((e for e in img.extensions if e.type == EXT_CRYPTO), None)
    luks = crypto_header_span(crypto.data) if crypto is not None else None
    if luks is not None:
        scan.add_range(*luks, "LUKS header")
    ondisk = _OnDisk(img, scan)
    rt = ondisk.table
    rb = rt & np.uint64(rc.RT_OFFSET_MASK)
    ok = (rt != 0) & ((rt & np.uint64(rc.RT_RESERVED_MASK)) == 0) & (rb % np.uint64(cs) == 0) & \
        (rb < np.uint64(scan.fsize))
    scan.refblocks[(rb[ok] // np.uint64(cs)).astype(np.int64)] = True
    drop_bitmaps = img.bitmaps_damage is not None and repair == "all"
    if img.bitmaps_damage is not None:
        result.error(str(img.bitmaps_damage))
    if img.bitmaps_ext is not None:
        for e in img.entries:
            t = img.bitmap_table(e) & np.uint64(bm.TE_OFFSET_MASK)
            clusters, _ = scan.ranges(t[t != 0].astype(np.int64), cs, f"bitmap data of {e.name!r}")
            scan.count(clusters)
            scan.meta[clusters] = True
            if e.in_use:
                result.say(f"Bitmap {e.name!r} is in use (inconsistent)" + ("; made all-dirty" if repair == "all" else ""))
    for off, size, active in _l2_table_mask(img, scan):
        scan.walk_l1(off, size, active)
    before = len(scan.refs)
    expected = np.bincount(np.concatenate(scan.refs), minlength=scan.m).astype(np.int64, copy=False)
    _count_refblocks(scan, rt, expected)          # reads the counts; counts the refcount blocks too
    if len(scan.refs) > before:
        added = np.concatenate(scan.refs[before:]).astype(np.int64)
        if len(added) and int(added.max()) >= len(expected):
            expected = np.concatenate((expected, np.zeros(int(added.max()) + 1 - len(expected), np.int64)))
        np.add.at(expected, added, 1)
    nb = scan.m if expected[scan.n] else scan.n       # QEMU's in-memory table grows only when referenced
    expected = expected[:nb]
    # QEMU's counter stops at the refcount maximum: every reference beyond it is an error.
    top = min(rc.max_refcount(h.refcount_order), np.iinfo(np.int64).max)
    over = int(np.maximum(expected - top, 0).sum())
    if over:
        result.error(f"{over} references overflow the {h.refcount_bits}-bit refcounts", over)
        expected = np.minimum(expected, top)

    disk, err = ondisk.counts(nb)
    result.check_errors += int(err.sum())
    if err.any():
        result.say(f"ERROR: {int(err.sum())} refcounts cannot be read (unaligned refcount block offset)")
    leaks = ~err & (disk > expected)
    low = ~err & (disk < expected)
    # QEMU rebuilds the refcount structure when a referenced cluster has no refcount.
    unrefd = bool((low & (disk == 0)).any())
    for c in np.nonzero(low)[0].tolist()[:100]:
        result.say(f"ERROR cluster {c} refcount={disk[c]} reference={expected[c]}")
    for c in np.nonzero(leaks)[0].tolist()[:100]:
        result.say(f"Leaked cluster {c} refcount={disk[c]} reference={expected[c]}")
    result.corruptions += int(low.sum())
    result.leaks += int(leaks.sum())
    used = np.nonzero(~err & ((expected > 0) | (disk > 0)))[0]
    result.image_end_offset = (int(used[-1]) + 1 if len(used) else 1) * cs

    # A damaged refcount table or block is replaced; missing counts are added in place.
    rebuild = repair == "all" and (scan.rebuild or bool(err.any()))
    if repair == "leaks" and (scan.rebuild or unrefd or err.any()):
        # QEMU gives up here ("need to rebuild refcount structures"); so do we, untouched.
        result.say("ERROR need to rebuild refcount structures (use -r all)")
        _judge_copied(scan, ondisk, disk, err, result, fix=False)
        return result

    # What the refcounts will be after the repair (COPIED flags are judged against them).
    if repair == "all":
        kept = _subtract(expected, scan.dropped)
        final = kept if not rebuild else _subtract(kept, [np.array(scan.refstruct, dtype=np.int64)])
        err = np.zeros_like(err)
    elif repair == "leaks":
        final = np.where(leaks, expected, disk)
    else:
        final = disk
    fix_flags = repair == "all" or (repair == "leaks" and not low.any() and result.corruptions == 0
                                    and not result.check_errors)
    flag_fixes = _judge_copied(scan, ondisk, final, err, result, fix=fix_flags)

    if repair is None:
        return result
    if repair == "leaks":
        if leaks.any() or flag_fixes:
            _repair_in_place(img, "leaks", final, disk, flag_fixes, {}, {}, reserve=expected)
            return _recheck(img, result, int(leaks.sum()), len(flag_fixes))
        return result

    for p, _ in flag_fixes:
        scan.l1_writes.pop(p, None)
        scan.l2_writes.pop(p, None)
    drops = len(scan.l1_writes) + len(scan.l2_writes)
    flags = h.incompatible_features & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
    in_use = any(e.in_use for e in img.entries)
    if not (result.corruptions or result.leaks or result.check_errors or flag_fixes or drops
            or drop_bitmaps or flags or in_use):
        return result
    if incomplete:
        # The snapshot table is completed last, with a header switch; a header cluster that
        # another structure claims refuses it. Refuse now, before the first repair writes,
        # so that a refused repair leaves the file as it was (fuzz case 16107).
        img.overlap_map().check_shared(0, 1, "check -r all: the header switch to a completed snapshot table",
                                       only_header=True)
    if rebuild:
        _rebuild(img, final, expected, scan, flag_fixes)
        if in_use:
            with img.transaction("check -r all: bitmaps in use") as tx:
                tx.repairing = True
                for e in list(img.entries):
                    if e.in_use:
                        Bitmaps(img).repair(e.name)
    else:
        _repair_in_place(img, "all", final, disk, flag_fixes, scan.l1_writes, scan.l2_writes, reserve=expected)
    if incomplete:
        _complete_snapshot_table(img)
    if drops:
        result.say(f"Rewrote {drops} table entries (reserved bits, or pointing at unreadable or misplaced "
                   "clusters: dropped)")
    if drop_bitmaps:
        result.say("Dropped the damaged bitmaps extension; its clusters were reclaimed")
    # Unreadable refcounts (check errors) were no corruption of their own.
    return _recheck(img, result, result.leaks, result.corruptions)


def _complete_snapshot_table(img: Image) -> None:
    """Write the snapshot table anew with every entry complete, as QEMU's repair does.

    The new table goes into clusters this transaction allocates (nothing references them
    before the commit); the header switch points ``snapshots_offset`` at it in one sector
    write; the old table's clusters are freed after. A crash before the switch leaves
    the old table and leaked clusters; after it, the new table.
    """
    h, cs = img.header, img.header.cluster_size
    old = next((off, n) for off, n, what in img.metadata_ranges() if what == "snapshot table")
    blob = b"".join(completed(s, h.size).pack() for s in img.snapshots)
    n = -(-len(blob) // cs)
    with img.transaction("check -r all: complete the snapshot table") as tx:
        tx.repairing = True
        off = tx.alloc.alloc(n)
        tx.write_new(off, blob + bytes(n * cs - len(blob)))
        tx.set_header(snapshots_offset=off)
        tx.alloc.free_clusters_of([old])


def _recheck(img: Image, before: CheckResult, leaks_fixed: int, corruptions_fixed: int) -> CheckResult:
    """As qemu-img does after a repair: the counters of a fresh check, and what was fixed."""
    after = check(img, None)
    after.leaks_fixed, after.corruptions_fixed = leaks_fixed, corruptions_fixed
    after.messages = before.messages + after.messages
    return after


def _count_refblocks(scan: _Scan, rt: np.ndarray, counts: np.ndarray) -> None:
    """QEMU's ``check_refblocks``: each refcount block, in table order, after everything else."""
    res, cs = scan.result, scan.cs
    nb = scan.m if counts[scan.n] else scan.n
    seen: dict[int, int] = {}
    for i in np.nonzero(rt)[0].tolist():
        e = int(rt[i])
        off = e & rc.RT_OFFSET_MASK
        if e & rc.RT_RESERVED_MASK:
            res.error(f"refcount table entry {i} has reserved bits set")
            scan.rebuild = True
            continue
        if off % cs:
            res.error(f"refcount block {i} is not cluster aligned; refcount table entry corrupted")
            scan.rebuild = True
            continue
        c = off // cs
        if c >= nb:
            res.error(f"refcount block {i} is outside image")
            scan.rebuild = True
            continue
        seen[c] = seen.get(c, 0) + 1
        if int(counts[c]) + seen[c] != 1:
            res.error(f"refcount block {i} refcount={int(counts[c]) + seen[c]}")
            scan.rebuild = True
    extra = [c for c, k in seen.items() for _ in range(k)]
    scan.refs.append(np.array(extra, dtype=scan.index_type))
    scan.refstruct += extra


def _subtract(counts: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    gone = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    gone = gone[gone < len(counts)]
    return counts - np.bincount(gone, minlength=len(counts))[:len(counts)].astype(np.int64)


def _judge_copied(scan: _Scan, ondisk: _OnDisk, final: np.ndarray, err: np.ndarray, result: CheckResult,
                  fix: bool) -> list[tuple[int, bytes]]:
    """QEMU's ``check_oflag_copied`` over the active tables, against ``final``; the fixes."""
    fixes: list[tuple[int, bytes]] = []
    for pos, value, keep, given in scan.copied.parts():
        if fix:
            pos, value = pos[keep], value[keep]
        cl = ((value & np.uint64(L2E_OFFSET_MASK)) // np.uint64(scan.cs)).astype(np.int64)
        if given >= 0:
            ref, readable = np.full(len(cl), given, np.int64), np.ones(len(cl), dtype=bool)
        else:
            ref, readable = np.zeros(len(cl), np.int64), np.ones(len(cl), dtype=bool)
            inside = cl < len(final)
            ref[inside] = final[cl[inside]]
            readable[inside] = ~err[cl[inside]]
            if (~inside).any():
                ref[~inside], bad = ondisk.lookup(cl[~inside])
                readable[~inside] = ~bad
        has = (value & np.uint64(OFLAG_COPIED)) != 0
        wrong = readable & (has != (ref == 1))
        idx = np.nonzero(wrong)[0]
        result.corruptions += len(idx)
        result.copied_too_few += int((wrong & ~has).sum())
        for i in idx.tolist():
            v, p = int(value[i]), int(pos[i])
            result.say(f"{'Repairing' if fix else 'ERROR'} OFLAG_COPIED: entry at {p:#x} is {v:#018x}, "
                       f"refcount={int(ref[i])}")
            if fix:
                new = (v | OFLAG_COPIED) if ref[i] == 1 else (v & ~OFLAG_COPIED)
                fixes.append((p, new.to_bytes(8, "big")))
    return fixes if fix else []


def _stage_entries(tx: Transaction, flag_fixes: list[tuple[int, bytes]], l1_writes: dict[int, bytes],
                   l2_writes: dict[int, bytes]) -> None:
    """Drops go with the mapping steps (after increases, before any decrease); flags around the counts."""
    for pos, data in flag_fixes:
        # A flag may say "refcount 1" only once the refcount is 1 (after the last
        # step), and must stop saying it before a refcount grows (first step).
        phase = Phase.COPIED_SET if int.from_bytes(data, "big") & OFLAG_COPIED else Phase.COPIED_CLEARED
        tx.stage(phase, [(pos, data)])
    # The L2 entries first, then the L1 entries: a dropped L2 table is not written.
    tx.stage(Phase.L2_UPDATED, sorted(l2_writes.items()))
    tx.stage(Phase.L1_UPDATED, sorted(l1_writes.items()))


def _repair_in_place(img: Image, repair: str, final: np.ndarray, ondisk: np.ndarray,
                     flag_fixes: list[tuple[int, bytes]], l1_writes: dict[int, bytes],
                     l2_writes: dict[int, bytes], reserve: np.ndarray) -> None:
    with img.transaction(f"check -r {repair}") as tx:
        tx.repairing = True
        alloc = tx.alloc
        # Clusters something references are not free, whatever their refcount says.
        alloc.reserve(np.nonzero(reserve)[0].tolist())
        for c in np.nonzero(ondisk != final)[0].tolist():
            # From the exact count: ``ondisk`` holds a 64-bit count above 2^63 - 1 as 2^63 - 1.
            alloc.deltas[c] = alloc.deltas.get(c, 0) + int(final[c]) - alloc.refcount(c)
        _stage_entries(tx, flag_fixes, l1_writes, l2_writes)
        if repair == "all":
            # Everything is counted again: the image is neither dirty nor corrupt any more.
            tx.clear_incompatible(INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
            for e in list(tx.entries):
                if e.in_use:
                    Bitmaps(img).repair(e.name)


def _rebuild(img: Image, final: np.ndarray, referenced: np.ndarray, scan: _Scan,
             flag_fixes: list[tuple[int, bytes]]) -> None:
    """QEMU's ``rebuild_refcount_structure``, as a journaled switch.

    ``final`` holds the counts of every cluster below the end of the file once the
    repair is done, without the old refcount table and blocks. The new blocks (every
    block with a non-zero count, and those covering the new structure itself) and
    then the new table go in one run of clusters at the end of the file.
    """
    h, cs = img.header, scan.cs
    epb = rc.entries_per_block(cs, h.refcount_order)
    nz = np.nonzero(final)[0]
    start = max(scan.n, int(nz[-1]) + 1 if len(nz) else 0)
    used_blocks = np.unique(np.nonzero(final)[0] // epb)
    k = 0
    while True:
        own = np.arange(start // epb, (start + k - 1) // epb + 1) if k else np.zeros(0, np.int64)
        blocks = np.union1d(used_blocks, own).astype(np.int64)
        rt_clusters = -(-(int(blocks[-1]) + 1) * 8 // cs)
        k_new = len(blocks) + rt_clusters
        if k_new <= k:
            break
        k = k_new
    # Each block is packed from the counts it holds below ``start + k`` (the rest are
    # zeros): never a whole block of int64 counts, 8 MiB for a 2 MiB cluster of 16-bit
    # counts and 128 MiB of 1-bit ones (fuzz cases 69100 and 87090, bound 40 MiB).
    parts = []
    for b in blocks.tolist():
        lo = b * epb
        n = min(epb, -(-(start + k - lo) // 8) * 8)       # whole bytes of the narrow widths
        counts = np.zeros(n, dtype=np.int64)
        known = final[lo:lo + n]
        counts[:len(known)] = known
        counts[max(start - lo, 0):start + k - lo] = 1
        packed = rc.pack_block(counts, h.refcount_order)
        parts += [packed, bytes(cs - len(packed))]
    table = np.zeros(rt_clusters * cs // 8, dtype=np.uint64)
    table[blocks] = (start + np.arange(len(blocks), dtype=np.int64)).astype(np.uint64) * np.uint64(cs)
    parts.append(table.astype(">u8").tobytes())
    blob = b"".join(parts)
    blob += bytes(k * cs - len(blob))
    # Step 1 (outside the journal, as the ordered-mode data of a transaction): the new
    # structure in clusters past the end of the file, which nothing references, made
    # durable before the commit that points the header at it. A crash here leaves a
    # longer file whose extra clusters no reader looks at.
    size = img.medium.size
    img.medium.write(start * cs, blob)
    img.medium.flush([(start * cs, len(blob))])
    # Step 2: one transaction switches the header to the new table (one sector), with
    # the entries it drops and the COPIED flags around it. Its allocator counts with
    # the new table.
    try:
        with img.transaction("check -r all: rebuild the refcount structure",
                             refcount_table=((start + len(blocks)) * cs, rt_clusters)) as tx:
            tx.repairing = True
            # The old structure and everything referenced now stay untouched until the switch.
            tx.alloc.reserve(np.nonzero(referenced)[0].tolist())
            _stage_entries(tx, flag_fixes, scan.l1_writes, scan.l2_writes)
            tx.clear_incompatible(INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
    except BaseException:
        # A refused switch leaves the file as it was: drop the new structure past its end.
        if img.medium.size > size and not img.journal.pending():
            img.medium.resize(size)
        raise


"""``qjournal check``: rebuild the refcounts from every reference and compare.

The semantics and counters are qemu-img's: a cluster whose on-disk refcount is
higher than its references is a leak, lower is a corruption; references outside the
file or unaligned are corruptions. Repair (``-r leaks`` / ``-r all``) is one journaled
transaction: refcount increases first, then dropping what must go (a damaged bitmaps
extension), then decreases, so a crash in between only ever leaves leaks.

qjournal also repairs what ``qemu-img check -r all`` leaves alone: with ``-r all`` a
bitmaps extension too damaged to open is dropped (the autoclear rule: as if a program
without bitmap support had written the image), and bitmaps left ``in_use`` are made
all-dirty and consistent.
"""
from __future__ import annotations

import attrs
import numpy as np

from .format import bitmaps as bm
from .format import refcount as rc
from .format.header import INCOMPAT_CORRUPT, INCOMPAT_DIRTY
from .format.tables import (L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
                            compressed_geometry, l2_entries)
from .image import Image


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


class _Refs:
    """Expected refcounts, accumulated from references (vectorised with numpy)."""

    def __init__(self, img: Image, result: CheckResult) -> None:
        self.cs = img.header.cluster_size
        self.file_size = img.medium.size
        self.n = -(-self.file_size // self.cs)
        self.counts = np.zeros(self.n, dtype=np.int64)
        self.result = result

    def add_range(self, off: int, length: int, what: str) -> None:
        if length <= 0:
            return
        if off % self.cs and what != "compressed data":
            self.result.corruptions += 1
            self.result.messages.append(f"ERROR {what} offset {off:#x} is not cluster aligned")
            return
        first, last = off // self.cs, (off + length - 1) // self.cs
        if last >= self.n:
            self.result.corruptions += 1
            self.result.messages.append(f"ERROR {what} at {off:#x} lies past the end of the file")
            return
        self.counts[first:last + 1] += 1

    def add_clusters(self, offsets: np.ndarray, what: str) -> None:
        offsets = offsets.astype(np.uint64)
        bad = (offsets % np.uint64(self.cs) != 0) | (offsets // np.uint64(self.cs) >= np.uint64(self.n))
        for off in offsets[bad].tolist():
            self.result.corruptions += 1
            self.result.messages.append(f"ERROR {what} at {int(off):#x} is unaligned or past the end of the file")
        np.add.at(self.counts, (offsets[~bad] // np.uint64(self.cs)).astype(np.int64), 1)


@attrs.define
class _Copied:
    """Table entries whose COPIED flag must say "refcount is exactly 1" (active L1 only)."""

    pos: list[int] = attrs.Factory(list)      # byte offset of the entry in the image
    value: list[int] = attrs.Factory(list)
    what: list[str] = attrs.Factory(list)     # "L2 cluster" or "data cluster"


def _walk_l1(img: Image, refs: _Refs, l1_offset: int, l1_size: int, result: CheckResult, active: bool,
             copied: _Copied | None = None) -> None:
    h, cs = img.header, img.header.cluster_size
    l1 = img.medium.array(l1_offset, l1_size, ">u8").astype(np.uint64) if l1_size else np.zeros(0, np.uint64)
    l2s = l1 & np.uint64(L1E_OFFSET_MASK)
    if copied is not None:
        for i in np.nonzero(l2s)[0].tolist():
            copied.pos.append(l1_offset + 8 * i)
            copied.value.append(int(l1[i]))
            copied.what.append("L2 cluster")
    l2s = l2s[l2s != 0]
    refs.add_clusters(l2s, "L2 table")
    ext = h.extended_l2
    per = l2_entries(cs, ext)
    offset_mask, shift, mask = compressed_geometry(h.cluster_bits)
    prev_end = None
    for l2off in l2s.tolist():
        if l2off % cs or l2off + cs > refs.file_size:
            continue
        raw = img.medium.array(int(l2off), per * (2 if ext else 1), ">u8").astype(np.uint64)
        ent = raw[::2] if ext else raw
        comp = (ent & np.uint64(OFLAG_COMPRESSED)) != 0
        std = ent[~comp] & np.uint64(L2E_OFFSET_MASK)
        std = std[std != 0]
        if not img.data_file:
            refs.add_clusters(std, "data cluster")
            if copied is not None:
                stride = 16 if ext else 8
                for j in np.nonzero(~comp & ((ent & np.uint64(L2E_OFFSET_MASK)) != 0))[0].tolist():
                    copied.pos.append(int(l2off) + stride * j)
                    copied.value.append(int(ent[j]))
                    copied.what.append("data cluster")
        for e in ent[comp].tolist():
            off = e & offset_mask
            nsec = ((e >> shift) & mask) + 1
            refs.add_range(off, nsec * 512 - (off & 511), "compressed data")
        if active:
            result.allocated_clusters += int(len(std) + comp.sum())
            result.compressed_clusters += int(comp.sum())
            if len(std):
                s = std.astype(np.int64)
                breaks = int((np.diff(s) != cs).sum())
                if prev_end is not None and int(s[0]) != prev_end:
                    breaks += 1
                result.fragmented_clusters += breaks
                prev_end = int(s[-1]) + cs


def check(img: Image, repair: str | None = None) -> CheckResult:
    """Check ``img`` (and repair with ``repair`` = ``"leaks"`` or ``"all"``)."""
    h, cs = img.header, img.header.cluster_size
    result = CheckResult(img.path)
    result.total_clusters = -(-h.size // cs)
    refs = _Refs(img, result)
    # Header, refcount table, active L1, snapshot table, bitmap directory and tables.
    for off, length, what in img.metadata_ranges():
        refs.add_range(off, length, what)
    copied = _Copied()
    _walk_l1(img, refs, h.l1_table_offset, h.l1_size, result, True, copied)
    for s in img.snapshots:
        refs.add_range(s.l1_table_offset, s.l1_size * 8, "snapshot L1 table")
        _walk_l1(img, refs, s.l1_table_offset, s.l1_size, result, False)
    rt = img.medium.array(h.refcount_table_offset, h.refcount_table_clusters * cs // 8, ">u8").astype(np.uint64)
    refs.add_clusters(rt[rt != 0] & np.uint64(rc.RT_OFFSET_MASK), "refcount block")
    drop_bitmaps = img.bitmaps_damage is not None and repair == "all"
    if img.bitmaps_damage is not None:
        result.corruptions += 1
        result.messages.append(f"ERROR {img.bitmaps_damage}")
    if img.bitmaps_ext is not None:
        for e in img.entries:
            t = img.bitmap_table(e) & np.uint64(bm.TE_OFFSET_MASK)
            refs.add_clusters(t[t != 0], f"bitmap data of {e.name!r}")
            if e.in_use:
                result.messages.append(f"Bitmap {e.name!r} is in use (inconsistent)"
                                       + ("; made all-dirty" if repair == "all" else ""))
    expected = refs.counts
    from .allocator import Allocator
    alloc = Allocator(img.medium, h.cluster_bits, h.refcount_order, h.refcount_table_offset,
                      h.refcount_table_clusters)
    ondisk = alloc.all_refcounts(refs.n).astype(np.int64)
    leaks = np.nonzero(ondisk > expected)[0]
    low = np.nonzero(ondisk < expected)[0]
    for c in low.tolist()[:100]:
        result.messages.append(f"ERROR cluster {c} refcount={ondisk[c]} reference={expected[c]}")
    for c in leaks.tolist()[:100]:
        result.messages.append(f"Leaked cluster {c} refcount={ondisk[c]} reference={expected[c]}")
    result.leaks += len(leaks)
    result.corruptions += len(low)
    # COPIED flags are judged against the refcounts as they will be after the repair,
    # as QEMU does: fixed refcounts usually make the flags right again.
    final = ondisk.copy()
    if repair in ("leaks", "all"):
        final = np.where(ondisk > expected, expected, final)
    if repair == "all":
        final = expected
    # QEMU repairs flags with -r all, and with -r leaks only when nothing else is wrong.
    fix_flags = repair == "all" or (repair == "leaks" and not len(low) and not result.check_errors
                                    and result.corruptions == 0)
    flag_fixes: list[tuple[int, bytes]] = []
    for pos, value, what in zip(copied.pos, copied.value, copied.what):
        c = (value & L2E_OFFSET_MASK) // cs
        if c >= len(final):
            continue
        want = int(final[c]) == 1
        if bool(value & OFLAG_COPIED) != want:
            result.corruptions += 1
            if len(result.messages) < 300:
                result.messages.append(f"ERROR OFLAG_COPIED {what}: entry at {pos:#x} is {value:#018x}, "
                                       f"refcount={int(final[c])}")
            new = (value | OFLAG_COPIED) if want else (value & ~OFLAG_COPIED)
            flag_fixes.append((pos, new.to_bytes(8, "big")))
    used = np.nonzero(np.maximum(expected, ondisk))[0]
    result.image_end_offset = (int(used[-1]) + 1) * cs if len(used) else cs
    flags = h.incompatible_features & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
    if not fix_flags:
        flag_fixes = []
    if repair in ("leaks", "all") and (len(leaks) or flag_fixes or (repair == "all" and (
            len(low) or drop_bitmaps or flags or any(e.in_use for e in img.entries)))):
        _repair(img, repair, expected, ondisk, result, drop_bitmaps, flag_fixes)
    return result


def _repair(img: Image, repair: str, expected: np.ndarray, ondisk: np.ndarray, result: CheckResult,
            drop_bitmaps: bool, flag_fixes: list[tuple[int, bytes]]) -> None:
    with img.transaction(f"check -r {repair}") as tx:
        alloc = tx.alloc
        # Clusters something references are not free, whatever their refcount says.
        alloc.reserve(np.nonzero(expected)[0].tolist())
        fixed_leaks = fixed_corr = 0
        for c in np.nonzero(ondisk != expected)[0].tolist():
            d = int(expected[c] - ondisk[c])
            if d < 0 or repair == "all":
                alloc.deltas[c] = alloc.deltas.get(c, 0) + d
                if d < 0:
                    fixed_leaks += 1
                else:
                    fixed_corr += 1
        for pos, data in flag_fixes:
            # A flag may say "refcount 1" only once the refcount is 1 (after the last
            # step), and must stop saying it before a refcount grows (first step).
            name = "copied-set" if int.from_bytes(data, "big") & OFLAG_COPIED else "copied-cleared"
            tx.extra_steps.setdefault(name, []).append((pos, data))
        fixed_corr += len(flag_fixes)
        if repair == "all":
            # Everything is counted again: the image is neither dirty nor corrupt any more.
            tx.clear_incompatible |= INCOMPAT_DIRTY | INCOMPAT_CORRUPT
            for e in list(tx.entries):
                if e.in_use:
                    img.bitmaps.repair(e.name)
            if drop_bitmaps:
                result.messages.append("Dropped the damaged bitmaps extension; its clusters were reclaimed")
                fixed_corr += 1
    result.leaks_fixed += fixed_leaks
    result.corruptions_fixed += fixed_corr
    result.leaks -= fixed_leaks
    result.corruptions -= fixed_corr


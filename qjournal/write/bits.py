"""Bitmap bits for guest writes: every enabled persistent bitmap records the ranges a
transaction writes, in the same transaction, in the phase before the mapping changes
(``bitmap-bits-set``: a bit set early costs a backup extra bytes; a bit missing is
silent data loss for the incremental backups built on the bitmap).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..format.lazy import np
from ..format import bitmaps as bm

if TYPE_CHECKING:
    from ..core.image import Image

Write = tuple[int, bytes]


def bits_steps(img: "Image", ranges: list[tuple[int, int]]) -> list[Write]:
    """Writes that set the bits of every enabled bitmap for guest ``ranges`` (offset, length).

    Bits in existing bitmap data clusters are set in place (only the bytes that change);
    a table entry that reads as all zeros gets a new data cluster, staged in the open
    transaction, and the returned writes point the entry at it.
    """
    tx = img.require_transaction()
    cs = img.header.cluster_size
    bits_per_cluster = cs * 8
    out: list[Write] = []
    for e in tx.entries:
        if not e.auto or e.in_use or not e.table_size:
            continue
        g = e.granularity
        per_entry: dict[int, list[tuple[int, int]]] = {}
        for off, n in ranges:
            if n <= 0:
                continue
            first, last = off // g, (off + n - 1) // g
            for t in range(first // bits_per_cluster, last // bits_per_cluster + 1):
                lo = max(first, t * bits_per_cluster) - t * bits_per_cluster
                hi = min(last, (t + 1) * bits_per_cluster - 1) - t * bits_per_cluster
                per_entry.setdefault(t, []).append((lo, hi))
        if not per_entry:
            continue
        table = img.bitmap_table(e)
        for t, spans in sorted(per_entry.items()):
            entry = int(table[t])
            doff = entry & bm.TE_OFFSET_MASK
            if not doff and entry & bm.TE_ALL_ONES:
                continue
            before = img.reader.array(doff, cs, "u1") if doff else np.zeros(cs, dtype=np.uint8)
            # Only the bytes the spans touch are unpacked (a whole 2 MiB cluster is 16 Mi bits).
            first, end = min(lo for lo, _ in spans) // 8, max(hi for _, hi in spans) // 8 + 1
            bits = np.unpackbits(before[first:end], bitorder="little")
            for lo, hi in [(lo - 8 * first, hi - 8 * first) for lo, hi in spans]:
                bits[lo:hi + 1] = 1
            part = np.packbits(bits, bitorder="little")
            if np.array_equal(part, before[first:end]):
                continue
            if doff:
                changed = np.nonzero(part != before[first:end])[0]
                a, b = int(changed[0]), int(changed[-1]) + 1
                out.append((doff + first + a, part[a:b].tobytes()))
            else:
                chunk = before.copy()
                chunk[first:end] = part
                new = tx.alloc.alloc(1)
                tx.write_new(new, chunk.tobytes())
                out.append((e.table_offset + bm.TABLE_ENTRY_SIZE * t, int(new).to_bytes(bm.TABLE_ENTRY_SIZE, "big")))
    return out

"""Guest writes, zeroes and discards, with the ordering rule for data (ordered mode).

Guest data is not journaled; the metadata that maps it is. For one request:

1. ``bitmap-bits-set`` (a journaled transaction of its own, only when a cluster is
   overwritten in place and an enabled bitmap lacks bits for it): the bits reach the
   disk before the data. A crash after it leaves extra dirty bits, which only cost a
   backup some bytes; the reverse order would leave a consistent bitmap that misses a
   write, which is silent data loss for incremental backups.
2. In-place overwrites of clusters this image owns alone (COPIED), then a barrier.
3. One transaction for everything that needs new clusters. New data clusters (with the
   copy-on-write fill from the backing file or the old cluster) and new L2 tables are
   written into free clusters and synced before the commit; then the steps
   ``refcounts-increased`` → ``bitmap-bits-set`` → ``l2-updated`` → ``l1-updated`` →
   ``clusters-freed``. A crash before ``l2-updated`` leaves leaked clusters and, at
   worst, extra dirty bits; after it, the data is there because it was synced first.

:func:`write_zeroes` turns whole clusters into zero clusters in one transaction of the
same shape (bits, then L2 entries, then frees).

Only images with standard L2 entries and data inside the image file are written here;
extended L2 and external data files are refused with :class:`UnsupportedError`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import UnsupportedError, UsageError
from .format import bitmaps as bm
from .format.tables import (L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
                            compressed_span)

if TYPE_CHECKING:
    from .image import Image

Write = tuple[int, bytes]


def _check_request(img: "Image", offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > img.header.size:
        raise UsageError(f"request {offset:#x}+{length:#x} lies outside the {img.header.size}-byte disk")
    if img.header.extended_l2:
        raise UnsupportedError(f"{img.path}: writing to an image with extended L2 entries is not supported yet")
    if img.data_file is not None:
        raise UnsupportedError(f"{img.path}: writing to an image with an external data file is not supported yet")
    if img.header.crypt_method:
        raise UnsupportedError(f"{img.path}: writing to an encrypted image is not supported")


class _Plan:
    """What one request changes, gathered before anything is written."""

    def __init__(self, img: "Image") -> None:
        self.img = img
        h = img.header
        self.cs = h.cluster_size
        self.per_l2 = self.cs // 8
        self.l1 = img.l1_table()
        self.l2_cache: dict[int, np.ndarray] = {}

    def l2(self, l1i: int) -> tuple[int, np.ndarray | None]:
        entry = int(self.l1[l1i]) if l1i < len(self.l1) else 0
        off = entry & L1E_OFFSET_MASK
        if not off:
            return entry, None
        if off not in self.l2_cache:
            self.l2_cache[off] = self.img.reader.array(off, self.per_l2, ">u8").astype(np.uint64)
        return entry, self.l2_cache[off]


def _bits_steps(img: "Image", ranges: list[tuple[int, int]]) -> list[Write]:
    """Writes that set the bits of every enabled bitmap for guest ``ranges`` (offset, length).

    Bits in existing bitmap data clusters are set in place (only the bytes that change);
    a table entry that reads as all zeros gets a new data cluster, staged in the open
    transaction, and the returned writes point the entry at it.
    """
    tx = img._staged()
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
            bits = np.unpackbits(before, bitorder="little")
            for lo, hi in spans:
                bits[lo:hi + 1] = 1
            chunk = np.packbits(bits, bitorder="little")
            if np.array_equal(chunk, before):
                continue
            if doff:
                changed = np.nonzero(chunk != before)[0]
                a, b = int(changed[0]), int(changed[-1]) + 1
                out.append((doff + a, chunk[a:b].tobytes()))
            else:
                new = tx.alloc.alloc(1)
                img.precommit_write(new, chunk.tobytes())
                out.append((e.table_offset + 8 * t, int(new).to_bytes(8, "big")))
    return out


def _runs(clusters: list[int], offset: int, length: int, cs: int) -> list[tuple[int, int]]:
    """Guest byte ranges of the request covered by runs of consecutive clusters."""
    out: list[tuple[int, int]] = []
    for gc in clusters:
        lo, hi = max(offset, gc * cs), min(offset + length, (gc + 1) * cs)
        if out and out[-1][0] + out[-1][1] == lo:
            out[-1] = (out[-1][0], hi - out[-1][0])
        else:
            out.append((lo, hi - lo))
    return out


def write(img: "Image", offset: int, data: bytes) -> None:
    """Write ``data`` at guest ``offset``; see the module docstring for the order of writes."""
    length = len(data)
    _check_request(img, offset, length)
    if length == 0:
        return
    from .guest import read as guest_read
    cs = img.header.cluster_size
    first, last = offset // cs, (offset + length - 1) // cs
    plan = _Plan(img)
    in_place: list[tuple[int, int, int]] = []  # (host offset, guest offset, length)
    needs_alloc: list[int] = []
    for gc in range(first, last + 1):
        l1e, l2 = plan.l2(gc // plan.per_l2)
        entry = int(l2[gc % plan.per_l2]) if l2 is not None else 0
        lo = max(offset, gc * cs)
        hi = min(offset + length, (gc + 1) * cs)
        host = entry & L2E_OFFSET_MASK
        if (l2 is not None and l1e & OFLAG_COPIED and entry & OFLAG_COPIED and host
                and not entry & (OFLAG_COMPRESSED | OFLAG_ZERO)):
            in_place.append((host + lo - gc * cs, lo, hi - lo))
        else:
            needs_alloc.append(gc)

    # Step 1: bits before in-place data.
    if in_place:
        with img.transaction("bitmap bits for in-place write"):
            bits = _bits_steps(img, [(lo, n) for _, lo, n in in_place])
            if bits:
                img._staged().extra_steps.setdefault("bitmap-bits-set", []).extend(bits)
        # Step 2: the data itself, in place, then a barrier.
        for host, lo, n in in_place:
            img.medium.write(host, data[lo - offset:lo - offset + n])
        img.medium.flush([(host, n) for host, _, n in in_place])
    if not needs_alloc:
        return

    # Step 3: new clusters, then the mapping.
    with img.transaction("guest write"):
        tx = img._staged()
        alloc = tx.alloc
        l2_writes: list[Write] = []
        l1_writes: list[Write] = []
        new_l2: dict[int, tuple[int, np.ndarray]] = {}
        disk = img.header.size
        for gc in needs_alloc:
            l1i, l2i = divmod(gc, plan.per_l2)
            l1e, l2 = plan.l2(l1i)
            entry = int(l2[l2i]) if l2 is not None else 0
            lo = max(offset, gc * cs)
            hi = min(offset + length, (gc + 1) * cs)
            ceiling = min(cs, disk - gc * cs)
            content = bytearray(guest_read(img, gc * cs, ceiling)) + bytearray(cs - ceiling)
            content[lo - gc * cs:hi - gc * cs] = data[lo - offset:hi - offset]
            host = alloc.alloc(1)
            img.precommit_write(host, bytes(content))
            new_entry = host | OFLAG_COPIED
            if entry & OFLAG_COMPRESSED:
                alloc.free_clusters_of([compressed_span(entry, img.header.cluster_bits)])
            elif entry & L2E_OFFSET_MASK:
                alloc.free(entry & L2E_OFFSET_MASK, 1)
            if l2 is not None and l1e & OFLAG_COPIED:
                l2_writes.append(((l1e & L1E_OFFSET_MASK) + 8 * l2i, int(new_entry).to_bytes(8, "big")))
                l2[l2i] = new_entry
            else:
                if l1i not in new_l2:
                    table = l2.copy() if l2 is not None else np.zeros(plan.per_l2, dtype=np.uint64)
                    if l2 is not None:
                        # The old table is shared (a snapshot holds it): copy it. A data
                        # cluster's refcount counts the L1 tables that reach it, so the
                        # clusters the copy maps keep their counts; only the old table
                        # loses the active L1's reference.
                        alloc.free(l1e & L1E_OFFSET_MASK, 1)
                        table[(table & np.uint64(OFLAG_COPIED)) != 0] &= ~np.uint64(OFLAG_COPIED)
                    new_l2[l1i] = (alloc.alloc(1), table)
                new_l2[l1i][1][l2i] = new_entry
        for l1i, (toff, table) in new_l2.items():
            img.precommit_write(toff, table.astype(">u8").tobytes())
            l1_writes.append((img.header.l1_table_offset + 8 * l1i, int(toff | OFLAG_COPIED).to_bytes(8, "big")))
        bits = _bits_steps(img, _runs(needs_alloc, offset, length, cs))
        if bits:
            tx.extra_steps.setdefault("bitmap-bits-set", []).extend(bits)
        if l2_writes:
            tx.extra_steps.setdefault("l2-updated", []).extend(l2_writes)
        if l1_writes:
            tx.extra_steps.setdefault("l1-updated", []).extend(l1_writes)


def write_zeroes(img: "Image", offset: int, length: int) -> None:
    """Make ``[offset, offset + length)`` read as zeros.

    Whole clusters of a v3 image become zero clusters (their data clusters are freed);
    partial clusters, v2 images and clusters whose L2 table a snapshot shares are
    written with zero data. One transaction: bitmap bits, then the L2 entries, then the
    frees; a crash in between leaves extra dirty bits or leaked clusters at worst.
    """
    _check_request(img, offset, length)
    if length == 0:
        return
    cs = img.header.cluster_size
    first_full = -(-offset // cs)
    end_full = (offset + length) // cs
    if img.header.version < 3 or first_full >= end_full:
        write(img, offset, bytes(length))
        return
    head = (offset, first_full * cs - offset)
    tail = (end_full * cs, offset + length - end_full * cs)
    plan = _Plan(img)
    fallback: list[int] = []
    with img.transaction("guest write zeroes"):
        tx = img._staged()
        l2_writes: list[Write] = []
        for gc in range(first_full, end_full):
            l1e, l2 = plan.l2(gc // plan.per_l2)
            if l2 is None:
                if img.backing_name is not None:
                    fallback.append(gc)  # a backing file shows through: needs an L2 table
                continue
            if not l1e & OFLAG_COPIED:
                fallback.append(gc)
                continue
            l2i = gc % plan.per_l2
            entry = int(l2[l2i])
            if entry == OFLAG_ZERO:
                continue
            if entry & OFLAG_COMPRESSED:
                tx.alloc.free_clusters_of([compressed_span(entry, img.header.cluster_bits)])
            elif entry & L2E_OFFSET_MASK:
                tx.alloc.free(entry & L2E_OFFSET_MASK, 1)
            l2[l2i] = OFLAG_ZERO
            l2_writes.append(((l1e & L1E_OFFSET_MASK) + 8 * l2i, OFLAG_ZERO.to_bytes(8, "big")))
        bits = _bits_steps(img, [(first_full * cs, (end_full - first_full) * cs)])
        if bits:
            tx.extra_steps.setdefault("bitmap-bits-set", []).extend(bits)
        if l2_writes:
            tx.extra_steps.setdefault("l2-updated", []).extend(l2_writes)
    for gc in fallback:
        write(img, gc * cs, bytes(cs))
    for off, n in (head, tail):
        if n:
            write(img, off, bytes(n))

"""Changing the virtual size of an image, as ``qemu-img resize`` (QEMU 7.2) does.

What QEMU does (block/qcow2.c ``qcow2_co_truncate``), and what qjournal matches:

* The new size is positive and a multiple of 512; a smaller one needs ``shrink``
  (``qemu-img resize --shrink``).
* A v2 image with internal snapshots is refused. A v3 image with snapshots may grow
  (each snapshot keeps its own L1 table and disk size); shrinking one is refused by
  qjournal (QEMU discards through the active L1 with copy-on-write of shared L2
  tables, which qjournal does not do yet).
* Persistent bitmaps are resized with the disk, not refused: QEMU 7.2 refuses only
  when a bitmap cannot be used (``qcow2_truncate_bitmaps_check``: a bitmap left in use
  is "inconsistent and cannot be used"). On disk, QEMU stores every bitmap at close
  with a table sized for the new disk: bits of a grown area clear, bits past a
  shrunken end dropped. qjournal writes the same: every bitmap gets a new table (and
  data clusters where bits are set) for the new size, in a new directory.
* Growing grows the L1 table when the disk needs more entries: exactly
  ``ceil(size / (L2 entries * cluster size))`` entries, in new clusters. Shrinking
  keeps ``l1_size`` (QEMU does not move the L1 table on shrink) but zeroes the L1
  entries past the new end, frees their L2 tables, and frees every data cluster past
  the new end (a "full discard": the L2 entries become 0).
* Not done (QEMU does them, nothing depends on them): freeing refcount blocks that
  only count themselves, and truncating the file after a shrink.
* ``preallocation`` (growth only, "Preallocation can only be used for growing
  images" otherwise): ``metadata``, ``falloc`` and ``full`` allocate every cluster of
  the grown area, new L2 tables where needed (QEMU's ``preallocate_co``); see
  :func:`_preallocate`. QEMU's ``metadata`` leaves the data clusters as holes of the
  file; the medium here reserves every grown region, so they take space as after
  ``falloc``.
* A grow over a backing file longer than the old disk, which QEMU fills with zeros so
  that the backing data does not show through, is refused (not supported yet), as
  are images with an external data file.

What the resize declares (:func:`declare`); the planner orders it by the table in
:mod:`qjournal.core.ordering`, with a barrier after each step. Before the commit, the
new L1 table and bitmap tables and data are written into clusters nothing references,
and synced; a crash then leaves, at worst, a longer file.

* header fields: ``size`` (and ``l1_size``/``l1_table_offset`` for a new L1 table).
  They share bytes 24..47 of sector 0, so the header switch lands them whole or not
  at all: the old size with the old L1 table, or the new size with the new one,
  never a size the L1 table is too small for.
* bitmaps: every bitmap gets a new table for the new size; the planner writes a new
  directory and switches the bitmaps extension in the same header change, under a
  clear autoclear bit when the change spans sectors (a crash in between leaves
  bitmaps every reader drops; no reader meets a bitmap with the other size).
* ``tail-l2-cleared`` / ``tail-l1-cleared`` (shrink): the L2 entries past the new end
  in the last L2 table, and the L1 entries past it, become 0, *after* the size
  switch. They lie past the end of the disk then, so no reader looks at them; a
  crash before leaves leaks only. QEMU discards before it writes the size; doing it
  after means a crash never shows a reader of the old size a tail that reads as
  zeros (or as the backing file).
* frees: the old L1 table, the old bitmap clusters and the discarded clusters, in
  ``clusters-freed``, after nothing references them (leaks before, never a refcount
  lower than its references).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from ..format.lazy import np
from ..core.allocator import Allocator
from ..core.ordering import Phase
from ..core.transaction import Transaction
from ..errors import BitmapError, UnsupportedError, UsageError
from ..format import bitmaps as bm
from ..format.geometry import SECTOR
from ..format.header import MAX_L1_ENTRIES
from ..format.tables import L1E_OFFSET_MASK, OFLAG_COPIED, l2_entries, size_to_l1
from ..read.guest import reader, release
from .bitmaps import free_bitmap, load_bits, store_bits
from .syntax import parse_size

if TYPE_CHECKING:
    from ..core.image import Image

Write = tuple[int, bytes]


def target_size(current: int, text: str) -> int:
    """The size ``qemu-img resize FILE [+|-]SIZE`` asks for, before any rule is checked."""
    if text[:1] in "+-" and text:
        delta = parse_size(text[1:])
        return current + delta if text[0] == "+" else current - delta
    return parse_size(text)


def check_request(img: "Image", new_size: int, shrink: bool) -> None:
    """Refuse what qemu-img resize refuses, in its order, before anything is staged."""
    h = img.header
    if new_size <= 0:
        raise UsageError("New image size must be positive")
    if new_size < h.size and not shrink:
        raise UsageError("Use the --shrink option to perform a shrink operation.")
    if new_size % SECTOR:
        raise UsageError(f"The new size must be a multiple of {SECTOR}")
    if h.nb_snapshots and h.version < 3:
        raise UsageError(f"{img.path}: Can't resize a v2 image which has snapshots")
    if h.nb_snapshots and new_size < h.size:
        raise UnsupportedError(f"{img.path}: shrinking an image with internal snapshots is not supported "
                               "(QEMU 7.2 allows it on v3 images; delete the snapshots or use qemu-img resize)")
    if img.header.has_data_file:
        raise UnsupportedError(f"{img.path}: resizing an image with an external data file is not supported")
    if not img.stale_bitmaps_ext:
        for e in img.entries:
            if e.in_use:
                raise BitmapError(f"Bitmap '{e.name}' is inconsistent and cannot be used "
                                  "(remove or repair it first: qjournal bitmap --remove/--repair)")
            nbits = -(-new_size // e.granularity)
            if -(-nbits // 8) > bm.MAX_BITMAP_BYTES:
                raise BitmapError(f"bitmap {e.name!r} with granularity {e.granularity} would take "
                                  f"{-(-nbits // 8)} bytes at {new_size} bytes, more than QEMU's limit of "
                                  f"{bm.MAX_BITMAP_BYTES}")
    if size_to_l1(new_size, h.cluster_size, h.extended_l2) > MAX_L1_ENTRIES:
        raise UsageError("Failed to grow the L1 table: File too large "
                         f"(a disk of {new_size} bytes needs an L1 table larger than QEMU's 32 MiB)")
    if new_size > h.size and img.backing_name is not None:
        try:
            backing = reader(img).backing
            longer = backing is not None and backing.size > h.size
        finally:
            release(img)
        if longer:
            raise UnsupportedError(f"{img.path}: growing over a backing file longer than the disk is not "
                                   "supported (QEMU writes zeros over the new area so that the backing data "
                                   "does not show through)")


def resize(img: "Image", new_size: int, shrink: bool = False, preallocation: str = "off") -> None:
    """Set the virtual size of ``img`` to ``new_size`` bytes in one journaled transaction.

    ``preallocation`` (qemu-img resize's ``--preallocation``, growth only): ``metadata``
    allocates the L2 tables and data clusters of the grown area, ``falloc`` does the
    same (both reserve the clusters' space in the file, which reads as zeros), ``full``
    also writes zeros into them. Refusals raise before anything is written (the image
    stays byte-identical). See the module docstring for the rules and the order of
    writes. Cost: O(L1 + the L2 tables past a shrunken end + bitmap sizes), and with
    preallocation O(clusters of the grown area).
    """
    if not img.writable:
        raise UsageError(f"{img.path}: the image is open read-only")
    if img.staged is not None:
        raise UsageError("resize cannot join an open transaction: it commits its own")
    if preallocation not in PREALLOCATION:
        raise UsageError(f"Invalid preallocation mode {preallocation!r}")
    check_request(img, new_size, shrink)
    h = img.header
    if preallocation != "off" and new_size <= h.size:
        raise UsageError("Preallocation can only be used for growing images")
    if new_size == h.size:
        return
    with img.transaction(f"resize {h.size} -> {new_size}" +
                         (f" (preallocation={preallocation})" if preallocation != "off" else "")) as tx:
        declare(img, tx, new_size, preallocation)


def declare(img: "Image", tx: Transaction, new_size: int, preallocation: str = "off") -> None:
    """Declare the resize in ``tx``: what it writes per phase (see the module docstring)."""
    h = img.header
    cs = h.cluster_size
    new_l1 = size_to_l1(new_size, cs, h.extended_l2)
    tx.set_header(size=new_size)
    if new_l1 > h.l1_size:
        # A new, larger L1 table in free clusters: the old entries, then zeros (and the
        # preallocated L2 tables).
        table = np.zeros(new_l1, dtype=np.uint64)
        table[:h.l1_size] = img.l1_table()
        nclusters = -(-new_l1 * 8 // cs)
        off = tx.alloc.alloc(nclusters)
        if preallocation != "off":
            _preallocate(img, tx, new_size, preallocation, table)
        raw = table.astype(">u8").tobytes()
        tx.write_new(off, raw + bytes(nclusters * cs - len(raw)))
        if h.l1_size:
            tx.alloc.free_clusters_of([(h.l1_table_offset, h.l1_size * 8)])
        tx.set_header(l1_size=new_l1, l1_table_offset=off)
    elif preallocation != "off":
        _preallocate(img, tx, new_size, preallocation, None)
    elif new_size < h.size:
        l2_writes, l1_writes = _discard_tail(img, tx.alloc, new_size)
        tx.stage(Phase.TAIL_L2_CLEARED, l2_writes)
        tx.stage(Phase.TAIL_L1_CLEARED, l1_writes)
    if img.entries and not img.stale_bitmaps_ext:
        tx.entries[:] = [_resized(img, e, new_size) for e in img.entries]


def _resized(img: "Image", e: bm.DirectoryEntry, new_size: int) -> bm.DirectoryEntry:
    """Stage bitmap ``e`` at ``new_size`` in new clusters (QEMU's
    ``bdrv_dirty_bitmap_truncate``, then its store at close): bits of a grown area are
    clear, bits past a shrunken end are dropped. The planner writes the new directory."""
    old_bits = load_bits(img, e)
    nbits = -(-new_size // e.granularity)
    bits = np.zeros(-(-nbits // 8), dtype=np.uint8)
    n = min(len(bits), len(old_bits))
    bits[:n] = old_bits[:n]
    if nbits % 8:
        bits[-1] &= (1 << (nbits % 8)) - 1
    toff, tsize = store_bits(img, bits, e.granularity_bits, disk_size=new_size)
    free_bitmap(img, e)
    return attrs.evolve(e, table_offset=toff, table_size=tsize)


def _discard_tail(img: "Image", alloc: Allocator, new_size: int) -> tuple[list[Write], list[Write]]:
    """Stage the full discard of every cluster past ``new_size``: (L2 writes, L1 writes).

    The L2 table that straddles the new end keeps its entries before it and gets zeros
    after; every L2 table wholly past it is freed with its L1 entry zeroed. Data
    clusters are freed (compressed ones by their span).
    """
    h = img.header
    cs, ext = h.cluster_size, h.extended_l2
    per_l2 = l2_entries(cs, ext)
    words = 2 if ext else 1
    first_gone = -(-new_size // cs)          # the first guest cluster past the new end
    keep_l1 = size_to_l1(new_size, cs, ext)
    l1 = img.l1_table()
    l2_writes: list[Write] = []
    l1_writes: list[Write] = []
    for l1i in np.nonzero(l1 & np.uint64(L1E_OFFSET_MASK))[0].tolist():
        if (l1i + 1) * per_l2 <= first_gone:
            continue                          # wholly before the new end
        start = max(0, first_gone - l1i * per_l2)
        l1e = int(l1[l1i])
        toff = l1e & L1E_OFFSET_MASK
        raw = img.medium.array(toff, per_l2 * words, ">u8").astype(np.uint64)
        if not l1e & OFLAG_COPIED:
            raise UnsupportedError(f"L2 table at {toff:#x} (L1 index {l1i}) is shared; shrinking it needs "
                                   "copy-on-write, which qjournal does not do")
        for entry in raw[start * words::words].tolist():
            alloc.free_entry(entry)
        if l1i < keep_l1:
            lo = start * words * 8
            if raw[start * words:].any():
                l2_writes.append((toff + lo, bytes(per_l2 * words * 8 - lo)))
        else:
            alloc.free(toff, 1)
            l1_writes.append((h.l1_table_offset + 8 * l1i, bytes(8)))
    return l2_writes, l1_writes


PREALLOCATION = ("off", "metadata", "falloc", "full")
ZERO_CHUNK = 16 << 20


def _preallocate(img: "Image", tx: Transaction, new_size: int, mode: str, new_l1: np.ndarray | None) -> None:
    """Allocate every unallocated cluster of the grown area, as ``qemu-img resize
    --preallocation`` does (QEMU's ``preallocate_co``): new L2 tables where the L1 has
    none, entries ``offset | COPIED`` (with extended L2 the subcluster bitmap stays 0, as
    QEMU leaves it), data clusters in one run in guest order.

    Ordering: the data clusters and new L2 tables are new clusters (counted in
    refcounts-increased, nothing points at them before the commit); entries of an
    existing L2 table change in l2-updated, new L1 entries in l1-updated (or in the new
    L1 table, switched with the size). The data clusters read as zeros before anything
    maps them: past the old end of the file the file is grown over them (the medium
    reserves the space), inside it zeros are written; ``full`` writes zeros everywhere.
    A crash before the commit leaves a longer file, nothing else.
    """
    h, cs = img.header, img.header.cluster_size
    ext = h.extended_l2
    per_l2, words = l2_entries(cs, ext), (2 if ext else 1)
    # Guest clusters of the grown area. Over a backing file, a cluster the old end cuts
    # stays as it is: allocating it would hide the backing data before the old end.
    first = (-(-h.size // cs) if img.backing_name is not None else h.size // cs)
    last = -(-new_size // cs)
    if first >= last:
        return
    old_l1 = img.l1_table()
    # (L1 index, L2 offset or None for a new table, guest clusters to allocate)
    todo: list[tuple[int, int | None, np.ndarray]] = []
    for li in range(first // per_l2, (last - 1) // per_l2 + 1):
        lo, hi = max(first, li * per_l2), min(last, (li + 1) * per_l2)
        l1e = int(old_l1[li]) if li < len(old_l1) else 0
        if l1e & L1E_OFFSET_MASK:
            if not l1e & OFLAG_COPIED:
                raise UnsupportedError(f"{img.path}: the L2 table at {l1e & L1E_OFFSET_MASK:#x} (L1 index {li}) "
                                       "is shared with a snapshot; preallocating into it needs copy-on-write, "
                                       "which qjournal does not do")
            toff = l1e & L1E_OFFSET_MASK
            raw = img.medium.array(toff, per_l2 * words, ">u8").astype(np.uint64)
            idx = np.arange(lo, hi, dtype=np.int64)
            free = raw[(idx - li * per_l2) * words] == 0
            if ext:                          # and no subcluster reads as zeros
                free &= raw[(idx - li * per_l2) * words + 1] == 0
            todo.append((li, toff, idx[free]))
        else:
            todo.append((li, None, np.arange(lo, hi, dtype=np.int64)))
    n = sum(len(c) for _, _, c in todo)
    if not n:
        return
    l2_new = {li: tx.alloc.alloc(1) for li, toff, _ in todo if toff is None}
    data = tx.alloc.alloc(n)
    zero_new_clusters(img, data, n * cs, write_all=mode == "full")
    k = 0
    for li, l2off, clusters in todo:
        offs = (np.arange(k, k + len(clusters), dtype=np.uint64) * np.uint64(cs) + np.uint64(data)) | \
            np.uint64(OFLAG_COPIED)
        k += len(clusters)
        if not len(clusters):
            continue
        pos = (clusters - li * per_l2) * words
        if l2off is None:
            table = np.zeros(per_l2 * words, dtype=np.uint64)
            table[pos] = offs
            tx.write_new(l2_new[li], table.astype(">u8").tobytes())
            entry = l2_new[li] | OFLAG_COPIED
            if new_l1 is not None:
                new_l1[li] = entry
            else:
                tx.stage(Phase.L1_UPDATED, [(h.l1_table_offset + 8 * li, entry.to_bytes(8, "big"))])
        else:
            raw = img.medium.array(l2off, per_l2 * words, ">u8").astype(np.uint64)
            raw[pos] = offs
            a, b = int(pos[0]), int(pos[-1]) + 1
            tx.stage(Phase.L2_UPDATED, [(l2off + 8 * a, raw[a:b].astype(">u8").tobytes())])


def zero_new_clusters(img: "Image", off: int, length: int, write_all: bool = False) -> None:
    """Make new clusters ``off .. off+length`` (allocated in the open transaction, nothing
    references them yet) read as zeros before the commit maps them: the file grows over
    the part past its end (the medium reserves it; it reads as zeros), zeros are written
    over the part inside it, or over all of it with ``write_all`` (``full``), in pieces
    of :data:`ZERO_CHUNK`, and synced (ordered mode). A crash before the commit leaves
    unreferenced clusters and perhaps a longer file."""
    end, size = off + length, img.medium.size
    if end > size:
        img.medium.resize(end)
    stop = end if write_all else min(end, size)
    if stop > off:
        chunk = bytes(min(ZERO_CHUNK, stop - off))
        for pos in range(off, stop, ZERO_CHUNK):
            img.medium.write(pos, chunk[:min(ZERO_CHUNK, stop - pos)])
    if length > 0:
        # The zeros and the new length of the file: durable before the commit.
        img.medium.flush([(off, length)])

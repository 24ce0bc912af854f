"""Internal snapshots: create and delete, as ``qemu-img snapshot -c/-d`` (QEMU 7.2) do.

What QEMU does (block/qcow2-snapshot.c), and what qjournal matches:

* ``-c NAME`` copies the active L1 table as it is (COPIED flags included) into new
  clusters, adds one reference to every L2 table and every data cluster the active
  tables map (compressed clusters by their span, preallocated zero clusters too), and
  clears the COPIED flag of every active L1 and L2 entry, since their clusters are now
  shared. The snapshot table is written anew with the new entry last: id one more than
  the largest numeric id, the date now, VM state size 0, VM clock 0, and 24 bytes of
  extra data (large VM state size 0, the disk size, icount 0), on v2 images too.
  Persistent bitmaps are left as they are.
* ``-d NAME`` (by name, as qemu-img does) writes the table without the entry, drops
  one reference from every cluster the snapshot's L1 table maps and from the L1 table
  itself, and sets COPIED on every active entry whose refcount is 1 again.

Differences, on purpose: a name that an existing snapshot has is refused (qemu-img 7.2
makes a second snapshot of the same name, which ``-a`` and ``-d`` can then not tell
apart); images with an external data file are refused, as QEMU refuses them.

What each declares, ordered by :mod:`qjournal.core.ordering`: the new L1 copy and the
new snapshot table in new clusters (durable before the commit); ``copied-cleared``
before the refcounts grow (a crash between leaves flags too few: a copy on the next
write, never a shared cluster written in place); the refcount phases; the header switch
of ``nb_snapshots`` and ``snapshots_offset`` (bytes 60..71, one sector write); the old
table (and, for ``-d``, the snapshot's clusters) freed after it; ``copied-set`` last.
A crash anywhere leaves the old snapshot list or the new one, with leaks at worst.

Cost: O(L1 + entries of the L2 tables the active (or deleted) L1 maps), numpy.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..format.lazy import np
from ..core.ordering import Phase
from ..core.transaction import Transaction
from ..errors import UnsupportedError, UsageError
from ..format.snapshots import MAX_SNAPSHOTS, Snapshot
from ..storage.medium import read_rows
from ..format.tables import (L1_ENTRY_SIZE, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
                             compressed_span)

if TYPE_CHECKING:
    from ..core.image import Image

Write = tuple[int, bytes]
EXTRA_SIZE = 24                      # QEMU writes vm_state_size_large, disk_size, icount
MAX_NAME = (1 << 16) - 1             # name_size is a u16
MAX_TABLE = 64 << 20                 # QEMU's QCOW_MAX_SNAPSHOTS_SIZE


def find(img: "Image", name: str) -> Snapshot:
    """The snapshot called ``name`` (qemu-img snapshot -d looks names up only)."""
    for s in img.snapshots:
        if s.name == name:
            return s
    raise UsageError(f"{img.path}: Could not delete snapshot '{name}': snapshot not found")


def create(img: "Image", name: str, now: float | None = None) -> Snapshot:
    """Take an internal snapshot of the active disk, called ``name``, in one transaction."""
    _check_image(img)
    if not name:
        raise UsageError("a snapshot name must not be empty")
    if len(name.encode()) > MAX_NAME:
        raise UsageError(f"snapshot name of {len(name.encode())} bytes exceeds the {MAX_NAME}-byte limit")
    if any(s.name == name for s in img.snapshots):
        raise UsageError(f"{img.path}: a snapshot called '{name}' exists already (names must be unique here, "
                         "so that -a and -d can tell them apart)")
    if len(img.snapshots) >= MAX_SNAPSHOTS:
        raise UsageError(f"{img.path}: the image has {len(img.snapshots)} snapshots, QEMU's limit")
    h, cs = img.header, img.header.cluster_size
    now = time.time() if now is None else now
    ids = [int(s.id) for s in img.snapshots if s.id.isdigit()]
    with img.transaction(f"snapshot -c {name}") as tx:
        l1 = img.l1_table()
        n = -(-max(h.l1_size, 1) * L1_ENTRY_SIZE // cs)
        copy = tx.alloc.alloc(n)
        raw = l1.astype(">u8").tobytes()
        tx.write_new(copy, raw + bytes(n * cs - len(raw)))
        _share(img, tx, l1, +1)
        extra = (0).to_bytes(8, "big") + h.size.to_bytes(8, "big") + (0).to_bytes(8, "big")
        sec, nsec = int(now), int(now % 1 * 1e9) // 1000 * 1000
        snap = Snapshot(copy, h.l1_size, str(max(ids, default=0) + 1), name, sec, nsec, 0, 0, h.size, 0,
                        extra, 0)
        _write_table(img, tx, list(img.snapshots) + [snap])
    return snap


def delete(img: "Image", name: str) -> None:
    """Delete the snapshot called ``name`` and free what it alone held, in one transaction."""
    _check_image(img)
    snap = find(img, name)
    with img.transaction(f"snapshot -d {name}") as tx:
        l1 = img.medium.array(snap.l1_table_offset, snap.l1_size, ">u8").astype(np.uint64)
        _share(img, tx, l1, -1)
        if snap.l1_size:
            tx.alloc.free_clusters_of([(snap.l1_table_offset, snap.l1_size * L1_ENTRY_SIZE)])
        _write_table(img, tx, [s for s in img.snapshots if s is not snap])
        _copied_set(img, tx)


def lookup(img: "Image", name: str) -> Snapshot:
    """The snapshot whose id is ``name``, else the one called ``name`` (QEMU's
    ``find_snapshot_by_id_or_name``, which ``qemu-img snapshot -a`` uses)."""
    for s in img.snapshots:
        if s.id == name:
            return s
    for s in img.snapshots:
        if s.name == name:
            return s
    raise UsageError(f"{img.path}: Could not apply snapshot '{name}': Failed to load snapshot: "
                     "No such file or directory")


def apply(img: "Image", name: str) -> Snapshot:
    """Make the disk what it was when snapshot ``name`` was taken (``qemu-img snapshot -a``).

    The active L1 table becomes a copy of the snapshot's, in new clusters, switched in by
    one header write (``l1_table_offset``, ``l1_size``); the snapshot's clusters get one
    reference more before it (their entries' COPIED flags cleared first), and the old
    active table and what it mapped lose one after it. Refused, as QEMU refuses, while
    the image has persistent bitmaps ("Device has active dirty bitmaps"); a snapshot of
    another disk size is refused (QEMU resizes the disk).
    """
    _check_image(img)
    snap = lookup(img, name)
    h, cs = img.header, img.header.cluster_size
    if img.entries and not img.stale_bitmaps_ext:
        raise UsageError(f"{img.path}: Could not apply snapshot '{name}': Device has active dirty bitmaps")
    if snap.disk_size is not None and snap.disk_size != h.size:
        raise UnsupportedError(f"{img.path}: snapshot '{name}' has a disk of {snap.disk_size} bytes and the "
                               f"image {h.size}; applying it would resize the disk, which qjournal does not do")
    with img.transaction(f"snapshot -a {name}") as tx:
        snap_l1 = img.medium.array(snap.l1_table_offset, snap.l1_size, ">u8").astype(np.uint64)
        size = max(h.l1_size, snap.l1_size)
        table = np.zeros(size, dtype=np.uint64)
        table[:snap.l1_size] = snap_l1 & ~np.uint64(OFLAG_COPIED)        # every L2 table is shared now
        n = -(-max(size, 1) * L1_ENTRY_SIZE // cs)
        new = tx.alloc.alloc(n)
        raw = table.astype(">u8").tobytes()
        tx.write_new(new, raw + bytes(n * cs - len(raw)))
        _share(img, tx, snap_l1, +1, active=False)
        _share(img, tx, img.l1_table(), -1)
        if h.l1_size:
            tx.alloc.free_clusters_of([(h.l1_table_offset, h.l1_size * L1_ENTRY_SIZE)])
        tx.set_header(l1_table_offset=new, l1_size=size)
    return snap


def _check_image(img: "Image") -> None:
    if not img.writable:
        raise UsageError(f"{img.path}: the image is open read-only")
    if img.staged is not None:
        raise UsageError("a snapshot cannot join an open transaction: it commits its own")
    if img.header.has_data_file:
        raise UnsupportedError(f"{img.path}: internal snapshots are not supported with an external data file")


def _mapped(img: "Image", l1: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The L2 tables ``l1`` maps: their offsets, their raw entries (one row per table, as
    uint64), and the clusters their entries hold (data clusters, compressed spans'
    clusters), one per reference. All tables at once: numpy per table cost 8 us each,
    a quarter of a second for the 32,768 tables of 2M clusters."""
    h, cs = img.header, img.header.cluster_size
    words = 2 if h.extended_l2 else 1
    offs = (l1[l1 & np.uint64(L1E_OFFSET_MASK) != 0] & np.uint64(L1E_OFFSET_MASK)).astype(np.int64)
    raw = read_rows(img.medium, offs, cs).view(">u8").astype(np.uint64)
    e = raw[:, ::words]
    comp = (e & np.uint64(OFLAG_COMPRESSED)) != 0
    std = e[~comp] & np.uint64(L2E_OFFSET_MASK)
    held = [(std[std != 0] // np.uint64(cs)).astype(np.int64)]
    for entry in e[comp].tolist():
        start, length = compressed_span(int(entry), h.cluster_bits)
        held.append(np.arange(start // cs, (start + length - 1) // cs + 1, dtype=np.int64))
    return offs, raw, np.concatenate(held)


def _share(img: "Image", tx: Transaction, l1: np.ndarray, delta: int, active: bool = True) -> None:
    """One reference more (``delta`` +1) or less (-1) for every cluster ``l1`` maps; with
    +1, the entries of the L2 tables it maps (and, when ``l1`` is the ``active`` table,
    the active L1 entries) stop claiming refcount 1 first (``copied-cleared``)."""
    cs = img.header.cluster_size
    words = 2 if img.header.extended_l2 else 1
    offs, raw, held = _mapped(img, l1)
    tx.alloc.reference(np.concatenate([offs // cs, held]), delta)
    if delta < 0:
        return
    h = img.header
    if active:
        tx.stage(Phase.COPIED_CLEARED, [(h.l1_table_offset + L1_ENTRY_SIZE * i,
                                         int(v & ~np.uint64(OFLAG_COPIED)).to_bytes(8, "big"))
                                        for i, v in enumerate(img.l1_table().tolist()) if v & OFLAG_COPIED])
    change = ((raw[:, ::words] & np.uint64(OFLAG_COPIED)) != 0).any(axis=1)
    new = raw[change]
    new[:, ::words] &= ~np.uint64(OFLAG_COPIED)
    _stage_tables(tx, Phase.COPIED_CLEARED, offs[change], new)


def _stage_tables(tx: Transaction, phase: Phase, offs: np.ndarray, tables: np.ndarray) -> None:
    """Stage each row of ``tables`` (uint64 entries) as the new content of the L2 table at
    the matching offset of ``offs``."""
    data = tables.astype(">u8")
    tx.stage(phase, [(off, row.tobytes()) for off, row in zip(offs.tolist(), data)])


def _copied_set(img: "Image", tx: Transaction) -> None:
    """Set COPIED on every active L1 and L2 entry whose refcount the commit leaves at 1."""
    h, cs = img.header, img.header.cluster_size
    words = 2 if h.extended_l2 else 1
    counts = tx.alloc.staged_refcounts()

    def one(c: np.ndarray) -> np.ndarray:
        inside = c < len(counts)
        out = np.zeros(c.shape, dtype=bool)
        out[inside] = counts[c[inside]] == 1
        return out

    l1 = img.l1_table()
    l2 = (l1 & np.uint64(L1E_OFFSET_MASK)) // np.uint64(cs)
    want = (l1 & np.uint64(L1E_OFFSET_MASK) != 0) & one(l2.astype(np.int64)) & ((l1 & np.uint64(OFLAG_COPIED)) == 0)
    copied = np.uint64(OFLAG_COPIED)
    tx.stage(Phase.COPIED_SET, [(h.l1_table_offset + L1_ENTRY_SIZE * i, int(l1[i] | copied).to_bytes(8, "big"))
                                for i in np.nonzero(want)[0].tolist()])
    offs, raw, _ = _mapped(img, l1)
    e = raw[:, ::words]
    host = e & np.uint64(L2E_OFFSET_MASK)
    fix = (host != 0) & ((e & np.uint64(OFLAG_COMPRESSED)) == 0) & ((e & np.uint64(OFLAG_COPIED)) == 0) & \
        one((host // np.uint64(cs)).astype(np.int64))
    change = fix.any(axis=1)
    new = raw[change]
    new[:, ::words] |= np.where(fix[change], copied, np.uint64(0))
    _stage_tables(tx, Phase.COPIED_SET, offs[change], new)


def _write_table(img: "Image", tx: Transaction, snaps: list[Snapshot]) -> None:
    """The snapshot table ``snaps`` in new clusters, switched in by the header; the old
    table freed after the switch."""
    h, cs = img.header, img.header.cluster_size
    raw = b"".join(s.pack() for s in snaps)
    if len(raw) > MAX_TABLE:
        raise UsageError(f"snapshot table of {len(raw)} bytes exceeds QEMU's limit of {MAX_TABLE}")
    offset = 0
    if snaps:
        n = -(-len(raw) // cs)
        offset = tx.alloc.alloc(n)
        tx.write_new(offset, raw + bytes(n * cs - len(raw)))
    if h.nb_snapshots:
        old = img.snapshots[-1]
        tx.alloc.free_clusters_of([(h.snapshots_offset, old.offset + len(old.pack()) - h.snapshots_offset)])
    tx.set_header(nb_snapshots=len(snaps), snapshots_offset=offset)

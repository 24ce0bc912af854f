"""The one ordering table: in which order the phases of every transaction reach the image.

An operation never writes the image step by step. It declares, in a
:class:`~qjournal.core.transaction.Transaction`, what it writes in each phase (new
clusters, refcount changes, tables, directory, header fields, frees), and
:func:`plan` turns that into journal steps here, in the order of :class:`Phase`. The
journal applies the steps with a barrier after each one, so the table below is also
the list of every crash point an operation has: beside each phase is what a crash
right after it leaves **for a reader that ignores the journal** (QEMU). qjournal
itself, after recovery, always sees exactly the old state or the new one.

=========================  ===========================================================
phase (journal step name)  a crash right after it leaves
=========================  ===========================================================
copied-cleared             entries that are about to be shared (or whose refcount
                           grows) no longer claim refcount 1: at worst a COPIED flag
                           too few, which only costs a copy on the next write
refcounts-increased        the new clusters are counted; nothing points at them yet:
                           leaked clusters only
refcount-blocks-hooked     new refcount blocks entered in the refcount table; they
                           count themselves (increased above): leaks only
refcount-table-switched    the header names a new refcount table that already counts
                           every cluster, itself included (one sector write): leaks
bitmap-bits-set            enabled bitmaps record guest ranges before the data and the
                           mapping change: a bit set early costs a backup extra bytes
l2-updated                 L2 entries point at new, counted, durable clusters (or drop
                           references): the old mapping or the new one per entry;
                           anything no longer referenced is leaked until freed
l1-updated                 L1 entries point at new, counted L2 tables: same as above
autoclear-cleared          autoclear bit 0 clear: every reader drops the persistent
                           bitmaps (allowed) until autoclear-set
directory-written          the bitmap directory rewritten in place, under the clear
                           autoclear bit: dropped bitmaps, never a half-written
                           directory that claims to be consistent
header-tail-written        bytes of cluster 0 no reader of the old layout looks at
backing-name-moved         the header points at a copy of the backing file name
header-switched            one sector of cluster 0 per step, sector 0 last; each lands
                           whole (a 512-byte sector does not tear), so each step is the
                           old header or the new one; the extension it writes is
                           vouched for only once sector 0 sets autoclear again
autoclear-set              the new bitmaps are declared consistent: the new state
header-cleanup             bytes the new layout no longer looks at are zeroed
tail-l2-cleared            (shrink) L2 entries past the new end are dropped, after the
                           size switch: no reader of the old size sees a zeroed tail
tail-l1-cleared            (shrink) L1 entries past the new end: as above
clusters-freed             refcounts of what nothing references any more go down:
                           before this, leaks only; never a refcount below its
                           references
copied-set                 entries whose refcount is now 1 claim it again
=========================  ===========================================================

The cluster-0 phases (``autoclear-cleared`` through ``header-cleanup``) come from
:func:`qjournal.core.cluster0.plan`, which splits one change of the header cluster
into sector writes; the seed protocol (an in-place directory rewrite) uses
``autoclear-cleared``, ``directory-written`` and ``autoclear-set`` only.
"""
from __future__ import annotations

import enum
from typing import Protocol

import attrs

from ..errors import UsageError
from ..format import bitmaps as bm
from ..format.extensions import EXT_BACKING_FORMAT, EXT_BITMAPS, Extension
from ..format.header import AUTOCLEAR_BITMAPS, AUTOCLEAR_KNOWN, FIELD_OFFSET, Header
from .allocator import Allocator
from .cluster0 import Cluster0, plan as plan_cluster0, unsafe_boundary

Write = tuple[int, bytes]
Step = tuple[str, list[Write]]
AUTOCLEAR = FIELD_OFFSET["autoclear_features"]


class Phase(enum.Enum):
    """The phases in apply order; the value is the journal step's name (see the module table)."""

    COPIED_CLEARED = "copied-cleared"
    REFCOUNTS_INCREASED = "refcounts-increased"
    REFCOUNT_BLOCKS_HOOKED = "refcount-blocks-hooked"
    REFCOUNT_TABLE_SWITCHED = "refcount-table-switched"
    BITMAP_BITS_SET = "bitmap-bits-set"
    L2_UPDATED = "l2-updated"
    L1_UPDATED = "l1-updated"
    AUTOCLEAR_CLEARED = "autoclear-cleared"
    DIRECTORY_WRITTEN = "directory-written"
    HEADER_TAIL_WRITTEN = "header-tail-written"
    BACKING_NAME_MOVED = "backing-name-moved"
    HEADER_SWITCHED = "header-switched"
    AUTOCLEAR_SET = "autoclear-set"
    HEADER_CLEANUP = "header-cleanup"
    TAIL_L2_CLEARED = "tail-l2-cleared"
    TAIL_L1_CLEARED = "tail-l1-cleared"
    CLUSTERS_FREED = "clusters-freed"
    COPIED_SET = "copied-set"


#: Phases an operation fills with writes of its own (``Transaction.stage``); the others
#: are derived here from the allocator, the staged directory and the header fields.
DECLARED = (Phase.COPIED_CLEARED, Phase.BITMAP_BITS_SET, Phase.L2_UPDATED, Phase.L1_UPDATED,
            Phase.TAIL_L2_CLEARED, Phase.TAIL_L1_CLEARED, Phase.COPIED_SET)


class ImageState(Protocol):
    """What the planner reads of the image as it stands (:class:`qjournal.core.image.Image`)."""

    path: str
    header: Header
    extensions: tuple[Extension, ...]
    entries: list[bm.DirectoryEntry]
    bitmaps_ext: bm.BitmapsExtension | None
    stale_bitmaps_ext: bool

    @property
    def cluster0(self) -> Cluster0: ...
    @property
    def cluster0_bytes(self) -> bytes: ...
    @property
    def backing_span(self) -> tuple[int, int] | None: ...


class Declaration(Protocol):
    """What the planner reads of a transaction (:class:`qjournal.core.transaction.Transaction`)."""

    alloc: Allocator
    entries: list[bm.DirectoryEntry]
    header_fields: dict[str, int]
    backing: tuple[bytes | None, str | None] | None
    incompatible_cleared: int
    in_place_directory: bool

    def declared(self) -> dict["Phase", list[Write]]: ...
    def write_new(self, off: int, data: bytes) -> None: ...


def plan(img: ImageState, tx: Declaration) -> list[Step]:
    """The ordered journal steps of ``tx`` on ``img``. New clusters it needs (a bitmap
    directory, refcount blocks or table) are allocated and staged in ``tx`` here."""
    h, cs, alloc = img.header, img.header.cluster_size, tx.alloc
    declared = tx.declared()
    old_c0 = img.cluster0
    exts = [e for e in img.extensions if e.type != EXT_BITMAPS]
    backing_name, backing_span = old_c0.backing_name, img.backing_span
    if tx.backing is not None:
        # A new backing file (rebase): the name and the backing format extension change
        # with the header. A name that differs is never overwritten in place: it is
        # placed after the old one (told to place() as an empty span at the old name's
        # end), so the header's offset and size switch to it in one sector-0 write.
        backing_name, fmt = tx.backing
        exts = [e for e in exts if e.type != EXT_BACKING_FORMAT]
        if fmt is not None:
            exts.append(Extension(EXT_BACKING_FORMAT, fmt.encode()))
        if backing_span is not None and backing_name != old_c0.backing_name:
            backing_span = (backing_span[0] + backing_span[1], 0)
    old_ext = next((e for e in img.extensions if e.type == EXT_BITMAPS), None)
    bitmaps_changed = tx.entries != img.entries or img.stale_bitmaps_ext or tx.in_place_directory
    seed: list[Step] = []
    new_ext: Extension | None = None
    if bitmaps_changed and _in_place_possible(img, tx):
        # The seed protocol: clear autoclear, rewrite the directory in place, set
        # autoclear. A crash between the first and the last write leaves bitmaps that
        # every reader drops, never a half-written directory that claims to be valid.
        be = img.bitmaps_ext
        assert be is not None
        ac = h.autoclear_features & AUTOCLEAR_KNOWN
        seed = [(Phase.AUTOCLEAR_CLEARED.value, [(AUTOCLEAR, (ac & ~AUTOCLEAR_BITMAPS).to_bytes(8, "big"))]),
                (Phase.DIRECTORY_WRITTEN.value, [(be.directory_offset, bm.pack_directory(tx.entries))]),
                (Phase.AUTOCLEAR_SET.value, [(AUTOCLEAR, (ac | AUTOCLEAR_BITMAPS).to_bytes(8, "big"))])]
        new_ext = old_ext
    elif bitmaps_changed:
        if tx.entries:
            # A rewrite: the new directory goes into new clusters, switched in by the
            # header write below; the old one is freed after it.
            directory = bm.pack_directory(tx.entries)
            if len(directory) > bm.MAX_DIRECTORY_SIZE:
                raise UsageError(f"bitmap directory of {len(directory)} bytes exceeds QEMU's limit of "
                                 f"{bm.MAX_DIRECTORY_SIZE}")
            n = -(-len(directory) // cs)
            doff = alloc.alloc(n)
            tx.write_new(doff, directory + bytes(n * cs - len(directory)))
            new_ext = Extension(EXT_BITMAPS, bm.BitmapsExtension(len(tx.entries), len(directory), doff).pack())
        if img.bitmaps_ext:
            alloc.free_clusters_of([(img.bitmaps_ext.directory_offset, img.bitmaps_ext.directory_size)])
    elif old_ext is not None and not img.stale_bitmaps_ext:
        new_ext = old_ext
    if new_ext is not None:
        exts.append(Extension(EXT_BITMAPS, new_ext.data))
    rplan = alloc.materialize()
    for off, data in rplan.precommit:
        tx.write_new(off, data)

    steps: list[Step] = []

    def add(phase: Phase, writes: list[Write]) -> None:
        if writes:
            steps.append((phase.value, writes))

    add(Phase.COPIED_CLEARED, declared.get(Phase.COPIED_CLEARED, []))
    add(Phase.REFCOUNTS_INCREASED, rplan.increase)
    add(Phase.REFCOUNT_BLOCKS_HOOKED, rplan.hook)
    header: Header = h.replace(incompatible_features=h.incompatible_features & ~tx.incompatible_cleared,
                               **tx.header_fields)
    cur_bytes, cur_c0 = img.cluster0_bytes, old_c0
    if rplan.new_reftable:
        header = header.replace(refcount_table_offset=rplan.new_reftable[0],
                                refcount_table_clusters=rplan.new_reftable[1])
        # The new refcount table, alone, before anything relies on it.
        mid = attrs.evolve(old_c0, header=old_c0.header.replace(refcount_table_offset=rplan.new_reftable[0],
                                                                refcount_table_clusters=rplan.new_reftable[1]))
        for _, writes in plan_cluster0(cur_bytes, cur_c0, mid, False):
            steps.append((Phase.REFCOUNT_TABLE_SWITCHED.value, writes))
        cur_bytes, cur_c0 = mid.render(len(cur_bytes)), mid
    for phase in (Phase.BITMAP_BITS_SET, Phase.L2_UPDATED, Phase.L1_UPDATED):
        add(phase, declared.get(phase, []))
    ac = header.autoclear_features & AUTOCLEAR_KNOWN
    ac = (ac | AUTOCLEAR_BITMAPS) if new_ext is not None else (ac & ~AUTOCLEAR_BITMAPS)
    if seed:
        steps += seed
        ac = header.autoclear_features & AUTOCLEAR_KNOWN | AUTOCLEAR_BITMAPS
    header = header.replace(autoclear_features=ac)
    # Extensions keep their order; a new bitmaps extension goes last, where QEMU puts it.
    order = {x.type: i for i, x in enumerate(img.extensions)}
    ordered = tuple(sorted(exts, key=lambda e: order.get(e.type, len(order))))
    new_c0 = Cluster0(header, ordered, backing_name, old_c0.header_tail).place(backing_span)
    if not seed or new_c0.header != cur_c0.header.replace(autoclear_features=ac):
        if seed:
            cur_bytes = cur_bytes[:AUTOCLEAR] + ac.to_bytes(8, "big") + cur_bytes[AUTOCLEAR + 8:]
            cur_c0 = attrs.evolve(cur_c0, header=cur_c0.header.replace(autoclear_features=ac))
        hsteps = plan_cluster0(cur_bytes, cur_c0, new_c0, guard_bitmaps=bitmaps_changed)
        why = unsafe_boundary(cur_bytes, cur_c0, new_c0, hsteps)
        if why and old_ext is not None and new_ext is None:
            # Dropping the bitmaps extension would move the extensions after it
            # across a sector boundary, and no order of sector writes keeps them
            # intact. Keep it in place instead, declared stale by the clear
            # autoclear bit: QEMU ignores it (and drops it at its next writable
            # open), we treat it as absent.
            new_c0 = Cluster0(header, img.extensions, backing_name,
                              old_c0.header_tail).place(backing_span)
            hsteps = plan_cluster0(cur_bytes, cur_c0, new_c0, guard_bitmaps=bitmaps_changed)
            why = unsafe_boundary(cur_bytes, cur_c0, new_c0, hsteps)
        if why:
            raise UsageError(f"{img.path}: no crash-safe way to rewrite the header cluster: {why} "
                             "(the header extensions and the backing file name do not fit side by side)")
        steps += hsteps
    for phase in (Phase.TAIL_L2_CLEARED, Phase.TAIL_L1_CLEARED):
        add(phase, declared.get(phase, []))
    add(Phase.CLUSTERS_FREED, rplan.free)
    add(Phase.COPIED_SET, declared.get(Phase.COPIED_SET, []))
    return steps


def _in_place_possible(img: ImageState, tx: Declaration) -> bool:
    """Only flags changed: the directory can be rewritten in place under the seed protocol."""
    if not img.bitmaps_ext or img.stale_bitmaps_ext or len(tx.entries) != len(img.entries):
        return False
    if len(tx.alloc.changes()[0]) or tx.header_fields or tx.backing is not None:
        return False
    return all(attrs.evolve(a, flags=0) == attrs.evolve(b, flags=0) for a, b in zip(tx.entries, img.entries))

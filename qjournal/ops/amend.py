"""Change an image's creation options in place, as ``qemu-img amend -o ...`` does.

What qjournal amends, and what it refuses (block/qcow2.c ``qcow2_amend_options``):

======================  ==============================================================
``lazy_refcounts``      on/off: the compatible feature bit, in one journaled header
                        write. ``on`` needs a v3 image, as in QEMU. Turning it off on
                        an image left dirty is safe: the writable open has already
                        rebuilt the refcounts and cleared the dirty bit.
``refcount_bits``       any power of two up to 64 on a v3 image: a new refcount
                        structure of that width, switched in by one header write
                        (:mod:`qjournal.ops.refcount_order`). A count the new width
                        cannot hold is refused with the cluster and its count, as
                        qemu-img refuses; a v2 image keeps 16 bits.
``compat=1.1``          on a v2 image: the header grows to the v3 fields (no feature
                        bits, 16-bit refcounts, header_length 112, zlib), and
                        snapshot entries without the extra data v3 needs (disk size)
                        are completed in a new snapshot table, as QEMU's upgrade does;
                        one transaction, the header switched in one write. QEMU also
                        adds the optional feature name table; qjournal does not.
``compat=0.10``         on a v3 image: the header shrinks to v2 (lazy refcounts off).
                        Refused with the reason, before anything is written, when v2
                        cannot express the image: extended L2 entries, persistent
                        bitmaps (qemu-img 7.2 goes on and leaves an orphan bitmaps
                        extension, every bitmap inconsistent, its clusters leaked), an
                        external data file, zstd compression (qemu-img 7.2 goes on, and
                        a v2 reader then inflates zstd clusters as zlib), refcounts
                        other than 16 bits (unless ``refcount_bits=16`` is given too:
                        the width changes first, as in QEMU). Zero clusters are
                        expanded in the same transaction, as QEMU expands them
                        (:func:`_expand_zero_clusters`)
creation-only options   ``cluster_size``, ``extended_l2``, ``preallocation``,
                        ``compression_type``, ``backing_fmt``, ``size``...: refused, as
                        qemu-img refuses them
======================  ==============================================================

Every refusal comes before anything is written, and names the option. Like QEMU, an
upgrade is done before a refcount width change and a downgrade after it; each is one
transaction, so a crash between two leaves a v3 image with the one change made, which
every reader opens.
"""
from __future__ import annotations

import struct

import attrs
from ..format.lazy import np

from ..core.image import Image
from ..errors import UsageError
from ..format.header import (COMPAT_LAZY_REFCOUNTS, COMPRESSION_ZLIB, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY,
                             INCOMPAT_EXTL2, QEMU_V3_LENGTH, REFCOUNT_ORDER_V2, V2_LENGTH)
from ..format.snapshots import MIN_EXTRA_V3, Snapshot, completed
from ..core.ordering import Phase
from ..core.transaction import Transaction
from ..format.tables import L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, l2_entries
from .create import COMPAT_ALIASES, parse_options
from .syntax import split_options
from .refcount_order import change_refcount_order, check_width
from .resize import zero_new_clusters

AMENDABLE = ("compat", "lazy_refcounts", "refcount_bits")
CREATION_ONLY = ("cluster_size", "extended_l2", "preallocation", "compression_type", "size", "encrypt",
                 "backing_file", "backing_fmt", "data_file", "data_file_raw")
WIDTHS_NEED_V3 = ("Refcount widths other than 16 bits require compatibility level 1.1 or above "
                  "(use compat=1.1 or greater)")


def amend(img: Image, spec: str) -> None:
    """Apply the ``-o`` list ``spec`` to ``img`` (open ``r+``), or refuse it whole.

    Everything is checked before the first write; then, as QEMU orders them: the
    upgrade, the refcount width, lazy refcounts, the downgrade (one transaction each).
    """
    if not img.writable:
        raise UsageError(f"{img.path}: open the image writable to amend it")
    options = split_options(spec)
    if not options:
        raise UsageError("must specify options (-o)")
    values: dict[str, str] = {}
    for key, value in options:
        if key in CREATION_ONLY:
            raise UsageError(f"invalid parameter {key!r}: this option is only supported for image creation")
        if key not in AMENDABLE:
            raise UsageError(f"invalid parameter {key!r} (amend takes {', '.join(AMENDABLE)})")
        values[key] = value
    h = img.header
    version = target = h.version
    if "compat" in values:
        if values["compat"] not in COMPAT_ALIASES:
            raise UsageError(f"compat={values['compat']}: expected 0.10, 1.1, v2 or v3")
        target = 3 if parse_options(f"compat={values['compat']}").compat == "1.1" else 2
    order = h.refcount_order
    if "refcount_bits" in values:
        bits = parse_options(f"refcount_bits={values['refcount_bits']}").refcount_bits
        if bits != 1 << REFCOUNT_ORDER_V2 and target < 3:
            raise UsageError(WIDTHS_NEED_V3)
        order = bits.bit_length() - 1
    lazy: bool | None = None
    if "lazy_refcounts" in values:
        lazy = parse_options(f"lazy_refcounts={values['lazy_refcounts']}").lazy_refcounts
        if lazy and target < 3:
            raise UsageError("lazy refcounts only supported with compatibility level 1.1 and above "
                             "(use compat=1.1 or greater)")
    if target < version:
        if order != REFCOUNT_ORDER_V2:
            raise UsageError("compat=0.10 requires refcount_bits=16")
        _refuse_downgrade(img)
    if order != h.refcount_order and target > version:
        check_width(img, order)     # refused before the upgrade writes anything
    if target > version:
        _upgrade(img)
    if order != img.header.refcount_order:
        # Refused here, before any write, when a count does not fit the new width.
        change_refcount_order(img, order)
    if lazy is not None:
        h = img.header
        features = (h.compatible_features | COMPAT_LAZY_REFCOUNTS) if lazy else \
            (h.compatible_features & ~COMPAT_LAZY_REFCOUNTS)
        if features != h.compatible_features:
            # One header field, one sector: the header switch (header-switched).
            with img.transaction(f"amend lazy_refcounts={'on' if lazy else 'off'}") as tx:
                tx.set_header(compatible_features=features)
    if target < version:
        _downgrade(img)


def _refuse_downgrade(img: Image) -> None:
    """Refuse, with the reason, a v3 image that version 2 cannot express."""
    h = img.header
    why = None
    if h.incompatible_features & INCOMPAT_EXTL2:
        why = (f"the image has extended L2 entries (incompatible feature {INCOMPAT_EXTL2:#x}), "
               "which version 2 lacks")
    elif img.entries:
        why = (f"the image has {len(img.entries)} persistent bitmap(s), which version 2 cannot hold "
               "(qemu-img 7.2 goes on and leaves them inconsistent and their clusters leaked): remove them first")
    elif h.incompatible_features & INCOMPAT_DATA_FILE:
        why = "the image has an external data file, which version 2 cannot name"
    elif h.compression_type != COMPRESSION_ZLIB:
        why = ("the image uses zstd compression, which version 2 cannot declare (qemu-img 7.2 goes on, and "
               "its compressed clusters are then read as zlib)")
    elif h.incompatible_features & INCOMPAT_DIRTY:
        why = "the image is dirty (lazy refcounts): run qjournal check -r all first"
    elif h.incompatible_features:
        why = f"the image has incompatible features {h.incompatible_features:#x}"
    if why:
        raise UsageError(f"{img.path}: cannot downgrade to compat=0.10: {why}")


def _expand_zero_clusters(img: Image, tx: Transaction) -> None:
    """Declare in ``tx`` what QEMU's downgrade does to zero clusters, which version 2
    cannot express (block/qcow2-cluster.c ``qcow2_expand_zero_clusters``), in every L2
    table of the disk and of its snapshots: without a backing file an unallocated zero
    cluster becomes unallocated (it reads as zeros all the same); over a backing file,
    and wherever the zero cluster has a cluster of its own, the entry points at a new
    cluster of zeros instead, counted as often as the L2 table is shared, and an old
    cluster loses those counts.

    Ordering: the new clusters are zeroed and synced before the commit and counted
    first (refcounts-increased); the entries change in place (l2-updated) before the
    header switch to version 2; old clusters are freed last. A crash leaves a v3 image
    with some zero clusters expanded, or leaks.
    """
    h, cs = img.header, img.header.cluster_size
    n = l2_entries(cs, False)
    l1s = [(h.l1_table_offset, h.l1_size)] + [(s.l1_table_offset, s.l1_size) for s in img.snapshots]
    tables: set[int] = set()
    for off, size in l1s:
        l1 = img.medium.array(off, size, ">u8").astype(np.uint64) & np.uint64(L1E_OFFSET_MASK)
        tables.update(int(t) for t in l1[l1 != 0].tolist())
    backed = img.backing_name is not None
    todo: list[tuple[int, np.ndarray, np.ndarray, int]] = []      # (table, raw, zero indices, its refcount)
    need = 0
    for t in sorted(tables):
        raw = img.medium.array(t, n, ">u8").astype(np.uint64)
        idx = np.flatnonzero(((raw & np.uint64(OFLAG_ZERO)) != 0) & ((raw & np.uint64(OFLAG_COMPRESSED)) == 0))
        if len(idx):
            shared = tx.alloc.refcount(t // cs)
            todo.append((t, raw, idx, shared))
            need += int(((raw[idx] & np.uint64(L2E_OFFSET_MASK)) != 0).sum()) if not backed else len(idx)
    if not todo:
        return
    first = tx.alloc.alloc(need) if need else 0
    if need:
        zero_new_clusters(img, first, need * cs)
    k = 0
    for t, raw, idx, shared in todo:
        old = raw[idx] & np.uint64(L2E_OFFSET_MASK)
        expand = np.ones(len(idx), dtype=bool) if backed else old != 0
        new = np.zeros(len(idx), dtype=np.uint64)
        m = int(expand.sum())
        clusters = first // cs + k + np.arange(m, dtype=np.int64)
        k += m
        new[expand] = clusters.astype(np.uint64) * np.uint64(cs) | np.uint64(OFLAG_COPIED if shared == 1 else 0)
        if shared > 1:
            tx.alloc.reference(clusters, shared - 1)     # alloc counted each once
        for c in old[old != 0].tolist():
            tx.alloc.reference(np.array([int(c) // cs], dtype=np.int64), -shared)
        raw[idx] = new
        a, b = int(idx[0]), int(idx[-1]) + 1
        tx.stage(Phase.L2_UPDATED, [(t + 8 * a, raw[a:b].astype(">u8").tobytes())])


def _upgrade(img: Image) -> None:
    """Version 2 to 3 in one transaction: the header's v3 fields, in one header write."""
    h, cs = img.header, img.header.cluster_size
    with img.transaction("amend compat=1.1") as tx:
        fields = dict(version=3, header_length=QEMU_V3_LENGTH, compatible_features=0,
                      autoclear_features=0, refcount_order=REFCOUNT_ORDER_V2, compression_type=COMPRESSION_ZLIB)
        if any(len(s.extra) < MIN_EXTRA_V3 for s in img.snapshots):
            # A v3 snapshot entry holds the disk size (QEMU's upgrade completes them):
            # the completed table goes into new clusters, switched by the same header
            # write; the old table is freed after it.
            old = next((off, n) for off, n, what in img.metadata_ranges() if what == "snapshot table")
            blob = b"".join(_v3_entry(s, h.size).pack() for s in img.snapshots)
            n = -(-len(blob) // cs)
            off = tx.alloc.alloc(n)
            tx.write_new(off, blob + bytes(n * cs - len(blob)))
            fields["snapshots_offset"] = off
            tx.alloc.free_clusters_of([old])
        tx.set_header(**fields)


_U64 = struct.Struct(">Q")
ICOUNT_UNKNOWN = (1 << 64) - 1


def _v3_entry(s: Snapshot, disk_size: int) -> Snapshot:
    """``s`` as QEMU's upgrade rewrites it (``qcow2_write_snapshots``): extra data of
    vm_state_size_large, disk_size (the image's size where the entry had none) and icount
    (-1 where unknown), then any extra bytes of later versions, kept."""
    done = completed(s, disk_size)
    icount = done.icount if done.icount is not None else ICOUNT_UNKNOWN
    extra = done.extra[:2 * _U64.size] + _U64.pack(icount) + done.extra[3 * _U64.size:]
    return attrs.evolve(done, extra=extra, icount=icount)


def _downgrade(img: Image) -> None:
    """Version 3 to 2 in one header write (checked by :func:`_refuse_downgrade`), zero
    clusters expanded in the same transaction."""
    with img.transaction("amend compat=0.10") as tx:
        _expand_zero_clusters(img, tx)
        tx.set_header(version=2, header_length=V2_LENGTH, compatible_features=0,
                      autoclear_features=0, compression_type=COMPRESSION_ZLIB)

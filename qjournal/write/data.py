"""Guest writes, zeroes and discards, with the ordering rule for data (ordered mode).

Guest data is not journaled; the metadata that maps it is. Every request stages its
mapping changes in the transaction's :class:`~qjournal.guestmap.GuestMap` (many
requests may share one transaction), and the commit orders them:

1. New host clusters (fresh data, with the copy-on-write fill from the backing file,
   a compressed cluster or a cluster a snapshot shares) and unallocated subclusters
   of clusters the image owns are written at once: nothing maps them yet. They are
   made durable before the commit.
2. The commit's steps: ``refcounts-increased`` → ``bitmap-bits-set`` →
   ``l2-updated`` → ``l1-updated`` → ``clusters-freed``. A crash before
   ``l2-updated`` leaves leaked clusters and, at worst, extra dirty bits; after it,
   the data is there because it was synced first.
3. Data over clusters the image already maps and owns alone (COPIED) is written in
   place, as QEMU does, by a single write and by a :class:`~qjournal.write.disk.GuestDisk`
   batch (their transaction has ``atomic_data`` False): at once when no enabled
   bitmap records writes, otherwise after the commit, so that the bits reach the disk
   before the data. A crash after the bits leaves extra dirty bits, which only cost a
   backup some bytes; the reverse order would leave a consistent bitmap that misses a
   write, which is silent data loss for incremental backups.
4. Inside a user's ``with img.transaction():`` (``atomic_data`` True) nothing is
   written in place: an overwrite of such a cluster goes, copy-on-write, into a new
   cluster (step 1), which the commit's ``l2-updated`` step maps and whose old
   cluster ``clusters-freed`` gives back. An exception before the commit maps
   nothing, and a crash leaves, after recovery, all of the block or none of it; a
   reader that ignores the journal sees each cluster old or new. An external data
   file cannot take a cluster elsewhere (a cluster lives at its guest offset there):
   its overwrites wait in memory and are written after the commit, so an exception
   still undoes them, but a crash after the commit may leave part of them.

:func:`write_zeroes` turns whole clusters (whole subclusters with extended L2) into
zero clusters and frees what they held, in a transaction of the same shape.

With an external data file the host offset of a cluster is its guest offset, and
data clusters have no refcounts (as QEMU does); with ``data_file_raw`` the data file
must stay a raw image of the disk, so zeroes are written as data there.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

from ..format.lazy import np
from ..errors import UnsupportedError, UsageError
from ..format.header import AUTOCLEAR_DATA_FILE_RAW
from ..format.tables import L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, SUBCLUSTERS, compressed_span
from ..read.guest import reader
from .guestmap import GuestMap

if TYPE_CHECKING:
    from ..core.image import Image
    from ..core.transaction import Transaction

Write = tuple[int, bytes]


def _check_request(img: "Image", offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > img.header.size:
        raise UsageError(f"request {offset:#x}+{length:#x} lies outside the {img.header.size}-byte disk")
    if img.header.crypt_method:
        raise UnsupportedError(f"{img.path}: writing to an encrypted image is not supported")


ALL_ALLOCATED = (1 << SUBCLUSTERS) - 1
ALL_ZERO = ALL_ALLOCATED << SUBCLUSTERS


def stage(img: "Image") -> GuestMap:
    """The staged guest mapping of the open transaction (made on first use)."""
    tx = img.require_transaction()
    if tx.guest is None:
        # Guest data goes into the clusters the refcounts call free, at once: they must be
        # counts, not a refcount block that doubles as another structure (fuzz case 760).
        img.overlap_map().check_unshared("guest write")
        tx.guest = GuestMap(img, tx)
    gm: GuestMap = tx.guest
    return gm


def write(img: "Image", offset: int, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` at guest ``offset`` (any alignment) in the open transaction, or in one of its own."""
    view = memoryview(data).cast("B")
    _check_request(img, offset, len(view))
    if not len(view):
        return
    with in_place_transaction(img, "guest write"):
        gm = stage(img)
        _validate(img, gm, offset, offset + len(view))
        _write(img, gm, offset, view)


@contextlib.contextmanager
def in_place_transaction(img: "Image", description: str) -> Iterator["Transaction"]:
    """The write layer's own transaction: joins the open one (and its ``atomic_data``), or
    opens one that keeps QEMU's in-place semantics for overwrites (``atomic_data`` False)."""
    new = img.staged is None
    with img.transaction(description) as tx:
        if new:
            tx.atomic_data = False
        yield tx


def _validate(img: "Image", gm: GuestMap, start: int, end: int, zeroes: bool = False) -> None:
    """Refuse a request over damaged entries before it writes anything.

    Every entry of ``[start, end)`` must keep the rules reads apply, and no cluster an
    entry maps (which the request may write in place, or release) may hold metadata:
    a damaged entry refuses the whole request, not half of it, and never gets us to
    write or free a table. Nor may the request release a reference the refcounts do
    not hold (see :meth:`GuestMap.check_releases`); with ``zeroes``, a whole cluster
    in the range releases what it maps.
    """
    cs, per = gm.cs, gm.per_l2
    first, last = start // cs, (end - 1) // cs
    for _ in reader(img).runs(first * cs, min((last + 1) * cs, img.header.size)):
        pass
    released: list[np.ndarray] = []
    for l1i in range(first // per, last // per + 1):
        t = gm.table(l1i)
        if t is None:
            continue
        owned = gm.owned(l1i)
        if not owned:
            released.append(np.array([t.offset // cs], np.int64))   # copied on write: the old table
        a, b = max(first, l1i * per) - l1i * per, min(last + 1, (l1i + 1) * per) - l1i * per
        ent = t.words[a * gm.ew:b * gm.ew:gm.ew]
        comp = (ent & np.uint64(OFLAG_COMPRESSED)) != 0
        off = ent & np.uint64(L2E_OFFSET_MASK)
        fresh = np.isin((off // np.uint64(cs)).astype(np.int64), list(gm.fresh)) if gm.fresh else \
            np.zeros(len(off), dtype=bool)
        mapped = np.nonzero(~comp & (off != 0) & ~fresh)[0]
        gm.check_hosts(mapped + l1i * per + a, off[mapped])
        if not gm.has_data_file:
            # As ``_write`` decides: an entry not written in place is copied on write, and
            # what it mapped is released.
            in_place = fresh | ((ent & np.uint64(OFLAG_COPIED)) != 0) & owned & (not gm.tx.atomic_data)
            if not gm.extended:
                in_place &= (ent & np.uint64(OFLAG_ZERO)) == 0
            if zeroes:
                # Zeroing a whole cluster releases what it maps, owned or not.
                whole = (np.arange(a, b) + l1i * per) * cs >= start
                whole &= (np.arange(a, b) + l1i * per + 1) * cs <= end
                in_place &= ~whole | fresh
            released.append((off[~comp & (off != 0) & ~in_place] // np.uint64(cs)).astype(np.int64))
        for i in np.nonzero(comp)[0].tolist():
            coff, clen = compressed_span(int(ent[i]), img.header.cluster_bits)
            spanned = np.arange(coff // cs, (coff + clen - 1) // cs + 1, dtype=np.uint64) * np.uint64(cs)
            gm.check_hosts(np.full(len(spanned), l1i * per + a + i), spanned)
            if not gm.has_data_file:
                released.append((spanned // np.uint64(cs)).astype(np.int64))
    if released:
        gm.check_releases(np.concatenate(released))


def _fill(img: "Image", gm: GuestMap, start: int, length: int, offset: int, data: memoryview) -> bytearray:
    """``length`` bytes of the disk as the transaction sees it from ``start``, ``data`` (at ``offset``) laid over.

    Past the end of the disk the bytes are zeros (the tail of the last cluster).
    """
    disk = img.header.size
    buf = bytearray(length)
    lo, hi = max(offset, start), min(offset + len(data), start + length)
    # Only what the data leaves uncovered is read.
    for a, b in ((start, lo), (hi, min(start + length, disk))):
        if b > a:
            buf[a - start:b - start] = reader(img).read(a, b - a)
    buf[lo - start:hi - start] = data[lo - offset:hi - offset]
    return buf


def _write(img: "Image", gm: GuestMap, offset: int, data: memoryview) -> None:
    cs = gm.cs
    end = offset + len(data)
    gm.dirty.append((offset, len(data)))
    first, last = offset // cs, (end - 1) // cs
    # The clusters the rules below must look at: every one with a data file; otherwise
    # those with an entry, and a partly written one with extended L2. The others (no
    # entry: nothing allocated, not zero) end in the run of new clusters whatever the
    # rules say, so they join it without a Python step each (numpy finds them).
    if gm.has_data_file:
        ruled: list[int] | range = range(first, last + 1)
    else:
        has_entry = gm.entry_words(first, last + 1) != 0
        if gm.extended:
            has_entry[0] |= offset > first * cs
            has_entry[-1] |= end < (last + 1) * cs
        ruled = (np.flatnonzero(has_entry) + first).tolist()
    run = -1  # the first guest cluster of the run that gets new host clusters (-1: none yet)
    pos = first  # the clusters before this one are decided
    for gc in ruled:
        if gc > pos and run < 0:
            run = pos  # clusters pos .. gc - 1 have no entry: they start the run
        pos = gc + 1
        e, sub = gm.entry(gc)  # read now: the clusters before it may have changed its table
        if gm.has_data_file:
            # The data file is laid out as the disk (QEMU maps every cluster there).
            host = (e & L2E_OFFSET_MASK) if gm.host_allocated(e) else gc * cs
        elif gm.host_allocated(e) and (((e & L2E_OFFSET_MASK) // cs) in gm.fresh or (
                e & OFLAG_COPIED and gm.owned(gc // gm.per_l2) and not gm.tx.atomic_data)) and not (
                not gm.extended and e & OFLAG_ZERO):
            # A cluster this transaction wrote, or (not atomic) one the image owns: in place.
            host = e & L2E_OFFSET_MASK
        elif gm.extended and not gm.host_allocated(e) and not e & OFLAG_COMPRESSED and (
                offset > gc * cs or end < (gc + 1) * cs):
            # Part of a cluster with no host cluster: a new one, of which only the
            # subclusters written are allocated; the others keep reading through.
            host = gm.tx.alloc.alloc(1)
            gm.fresh.add(host // cs)
        else:
            if run < 0:
                run = gc
            continue
        if run >= 0:
            _new_clusters(img, gm, range(run, gc), offset, data)
            run = -1
        _owned(img, gm, gc, e, sub, host, offset, data)
    if pos <= last and run < 0:
        run = pos
    if run >= 0:
        _new_clusters(img, gm, range(run, last + 1), offset, data)


def _owned(img: "Image", gm: GuestMap, gc: int, e: int, sub: int, host: int, offset: int, data: memoryview) -> None:
    """Write into guest cluster ``gc``, whose host cluster at ``host`` the image owns alone."""
    cs = gm.cs
    base = gc * cs
    lo, hi = max(offset, base), min(offset + len(data), base + cs)
    fresh = host // cs in gm.fresh
    on_disk = gm.mapped_on_disk(gc, host)  # units readers map to these host bytes until the commit

    def put(h: int, g: int, piece: Any, unit_bit: int) -> None:
        if fresh:
            gm.write_direct(h, piece)
        elif on_disk & unit_bit:
            gm.write_in_place(h, g, piece)   # after the bitmap bits, when a bitmap records writes
        else:
            gm.write_direct(h, piece)        # unmapped until the commit maps it

    if not gm.extended:
        if gm.host_allocated(e) and not e & OFLAG_ZERO:
            put(host + lo - base, lo, data[lo - offset:hi - offset], 1)
            return
        # A data-file cluster that reads as zeros or unallocated: written whole, with
        # the zeros or backing data around the request, and mapped at commit.
        ceiling = min(cs, img.header.size - base)
        put(host, base, _fill(img, gm, base, ceiling, offset, data), 1)
        gm.set_entry(gc, host | OFLAG_COPIED)
        return
    unit = cs // SUBCLUSTERS
    allocated = sub & ALL_ALLOCATED if gm.host_allocated(e) else 0
    touched = 0
    for u in range((lo - base) // unit, (hi - base - 1) // unit + 1):
        u_lo, u_hi = base + u * unit, base + (u + 1) * unit
        a, b = max(lo, u_lo), min(hi, u_hi)
        touched |= 1 << u
        if allocated >> u & 1:
            put(host + a - base, a, data[a - offset:b - offset], 1 << u)
        else:
            # An unallocated or zero subcluster: written whole, and allocated by the
            # bitmap at commit.
            put(host + u * unit, u_lo, _fill(img, gm, u_lo, unit, offset, data), 1 << u)
    new_sub = (allocated | touched) | ((sub >> SUBCLUSTERS) & ~touched & ALL_ALLOCATED) << SUBCLUSTERS
    new_e = (e & ~L2E_OFFSET_MASK) | OFLAG_COPIED | host
    if new_sub != sub or new_e != e:
        gm.set_entry(gc, new_e, new_sub)


def _new_clusters(img: "Image", gm: GuestMap, run: range, offset: int, data: memoryview) -> None:
    """Give each guest cluster of ``run`` (consecutive) a new host cluster holding its new content.

    The old content comes along where the request does not cover it (copy-on-write);
    what the clusters held before loses this image's reference.
    """
    cs, alloc = gm.cs, gm.tx.alloc
    g0, n = run[0] * cs, len(run)
    end = g0 + n * cs
    host = alloc.alloc(n)
    if offset <= g0 and offset + len(data) >= end:
        content: bytes | memoryview | bytearray = data[g0 - offset:end - offset]
    else:
        content = bytearray(n * cs)
        lo, hi = max(offset, g0), min(offset + len(data), end)
        content[lo - g0:hi - g0] = data[lo - offset:hi - offset]
        for gc in {run[0], run[-1]}:
            c_lo = gc * cs
            if lo > c_lo or hi < c_lo + cs:
                ceiling = min(cs, img.header.size - c_lo)
                content[c_lo - g0:c_lo - g0 + cs] = _fill(img, gm, c_lo, ceiling, offset, data) + \
                    bytes(cs - ceiling)
    gm.write_direct(host, content)
    # The run's entries as a whole (numpy, not a Python step per cluster): what the old
    # entries map loses its reference; the new host clusters (none of which an old entry
    # maps: they were free) become fresh and mapped.
    gm.forget(g0, end)  # data waiting for the old host clusters is in the new ones
    old = gm.entry_words(run[0], run[0] + n)
    for e in old[old != 0].tolist():
        _release(img, gm, e)
    gm.fresh.update(range(host // cs, host // cs + n))
    gm.map_run(run[0], n, host, ALL_ALLOCATED)


def _release(img: "Image", gm: GuestMap, e: int) -> None:
    """Drop this image's reference to what entry ``e`` maps (applied in the free step)."""
    if gm.has_data_file:
        return  # data-file clusters have no refcounts
    gm.fresh.discard((e & L2E_OFFSET_MASK) // gm.cs)
    gm.tx.alloc.free_entry(e)


def write_zeroes(img: "Image", offset: int, length: int) -> None:
    """Make ``[offset, offset + length)`` read as zeros.

    Whole clusters of a v3 image become zero clusters (and whole subclusters, with
    extended L2), and what they held is freed; in a v2 image without a backing file
    they become unallocated. The rest is written with zero data, as is everything in a
    v2 image with a backing file (no zero flag can hide it) or with a raw data file.
    One transaction.
    """
    _check_request(img, offset, length)
    if length == 0:
        return
    cs = img.header.cluster_size
    with in_place_transaction(img, "guest write zeroes"):
        gm = stage(img)
        h = img.header
        raw = bool(h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW) and gm.has_data_file
        as_data = (h.version < 3 and img.backing_name is not None) or raw
        _validate(img, gm, offset, offset + length, zeroes=not as_data)
        if as_data:
            for off in range(offset, offset + length, ZERO_CHUNK):
                n = min(ZERO_CHUNK, offset + length - off)
                _write(img, gm, off, memoryview(bytes(n)))
            return
        unit = cs // SUBCLUSTERS if gm.extended else cs
        first, end = -(-offset // unit), (offset + length) // unit
        if first >= end:
            _write(img, gm, offset, memoryview(bytes(length)))
            return
        gm.dirty.append((first * unit, (end - first) * unit))
        gc, last = first * unit // cs, (end * unit - 1) // cs
        while gc <= last:
            if img.backing_name is None and gm.table(gc // gm.per_l2) is None:
                gc = (gc // gm.per_l2 + 1) * gm.per_l2  # no L2 table, no backing file: zeros already
                continue
            u0 = max(first * unit, gc * cs) // unit - gc * cs // unit
            u1 = min(end * unit, (gc + 1) * cs) // unit - gc * cs // unit
            _zero_units(img, gm, gc, u0, u1)
            gc += 1
        for off, n in ((offset, first * unit - offset), (end * unit, offset + length - end * unit)):
            e, sub = gm.entry(off // cs)
            if n and (e or sub & ALL_ALLOCATED or img.backing_name is not None):
                _write(img, gm, off, memoryview(bytes(n)))


ZERO_CHUNK = 16 << 20  # zeros written as data, at most this much at a time


def _zero_units(img: "Image", gm: GuestMap, gc: int, u0: int, u1: int) -> None:
    """Make units ``u0 .. u1-1`` of guest cluster ``gc`` (subclusters, or the cluster) read as zeros."""
    unit = gm.cs // SUBCLUSTERS if gm.extended else gm.cs
    gm.forget(gc * gm.cs + u0 * unit, gc * gm.cs + u1 * unit)  # in-place data there is zeroed too
    e, sub = gm.entry(gc)
    if not e and not sub & ALL_ALLOCATED and img.backing_name is None:
        return  # unallocated without a backing file: it reads as zeros already
    if not gm.extended:
        if e == OFLAG_ZERO or (not e and img.header.version < 3):
            return
        if gm.has_data_file and gm.host_allocated(e):
            gm.set_entry(gc, (e & L2E_OFFSET_MASK) | OFLAG_COPIED | OFLAG_ZERO)
            return
        _release(img, gm, e)
        gm.set_entry(gc, OFLAG_ZERO if img.header.version >= 3 else 0)  # v2: no backing file here
        return
    mask = ((1 << u1) - 1) & ~((1 << u0) - 1)
    if e & OFLAG_COMPRESSED:
        if mask != ALL_ALLOCATED:
            # Part of a compressed cluster: it becomes a plain cluster first.
            _new_clusters(img, gm, range(gc, gc + 1), gc * gm.cs, memoryview(b""))
            e, sub = gm.entry(gc)
        else:
            _release(img, gm, e)
            gm.set_entry(gc, 0, ALL_ZERO)
            return
    if mask == ALL_ALLOCATED and gm.host_allocated(e) and not gm.has_data_file:
        _release(img, gm, e)
        gm.set_entry(gc, 0, ALL_ZERO)
        return
    new_sub = (sub & ALL_ALLOCATED & ~mask) | ((sub >> SUBCLUSTERS | mask) & ALL_ALLOCATED) << SUBCLUSTERS
    if new_sub != sub:
        gm.set_entry(gc, e, new_sub)

"""Persistent dirty bitmaps: the ``Image.bitmaps`` mapping and its operations.

Every operation stages its change in the image's open transaction (one is opened if
none is), so several operations can be one atomic unit. Bits are never changed in
place: a bitmap whose bits change gets a new table and new data clusters, written
into free clusters before the commit; the header then switches to a new directory
in one write, and the old clusters are freed last (see :mod:`qjournal.core.ordering`). A
crash leaves the old bitmaps, the new ones, or (for a reader that ignores the
journal) leaked clusters, never a bitmap that claims to be consistent and misses bits.
Changes of flags only (enable, disable, in_use) rewrite the directory in place under
QEMU's seed protocol instead.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Iterator

import attrs

from ..format.lazy import np
from ..errors import BitmapError
from ..format import bitmaps as bm

if TYPE_CHECKING:
    from ..core.image import Image


def _check_name(name: str) -> None:
    n = len(name.encode("utf-8"))
    if not 1 <= n <= bm.MAX_NAME:
        raise BitmapError(f"bitmap name must be 1 to {bm.MAX_NAME} bytes long, not {n}")


def _granularity_bits(granularity: int) -> int:
    g = int(granularity)
    if g <= 0 or g & (g - 1) or not (1 << bm.MIN_GRANULARITY_BITS) <= g <= (1 << bm.MAX_GRANULARITY_BITS):
        raise BitmapError(f"granularity {granularity} must be a power of two between "
                          f"{1 << bm.MIN_GRANULARITY_BITS} and {1 << bm.MAX_GRANULARITY_BITS}")
    return g.bit_length() - 1


class Bitmap:
    """One persistent bitmap of an open image (a view: it follows the image's state)."""

    def __init__(self, image: "Image", name: str) -> None:
        self.image = image
        self.name = name

    @property
    def entry(self) -> bm.DirectoryEntry:
        entries = self.image.staged.entries if self.image.staged else self.image.entries
        for e in entries:
            if e.name == self.name:
                return e
        raise KeyError(self.name)

    @property
    def granularity(self) -> int:
        return self.entry.granularity

    @property
    def enabled(self) -> bool:
        return self.entry.auto

    @property
    def in_use(self) -> bool:
        return self.entry.in_use

    @property
    def nbits(self) -> int:
        return -(-self.image.header.size // self.granularity)

    def bits(self) -> np.ndarray:
        """The bitmap as bytes (uint8, bit ``n`` of the disk is bit ``n % 8`` of byte ``n // 8``)."""
        e = self.entry
        _refuse_in_use(e)
        return load_bits(self.image, e)

    def dirty_extents(self) -> Iterator[tuple[int, int]]:
        """Yield ``(offset, length)`` in guest bytes of every dirty run, merged, in order.

        Reads one bitmap cluster at a time; cost O(bitmap size).
        """
        e = self.entry
        _refuse_in_use(e)
        img, cs = self.image, self.image.header.cluster_size
        g, disk = e.granularity, img.header.size
        table = img.bitmap_table(e)
        bits_per_cluster = cs * 8
        total = self.nbits
        run_start: int | None = None
        pos = 0  # bit index at the start of the current table entry
        for entry in table.tolist():
            n = min(bits_per_cluster, total - pos)
            if n <= 0:
                break
            off = entry & bm.TE_OFFSET_MASK
            if not off:
                if entry & bm.TE_ALL_ONES:
                    if run_start is None:
                        run_start = pos
                elif run_start is not None:
                    yield run_start * g, min(pos * g, disk) - run_start * g
                    run_start = None
                pos += n
                continue
            chunk = np.unpackbits(img.reader.array(off, -(-n // 8), "u1"), bitorder="little")[:n].astype(np.int8)
            edges = np.diff(chunk, prepend=np.int8(0 if run_start is None else 1))
            starts = (np.nonzero(edges == 1)[0] + pos).tolist()
            ends = (np.nonzero(edges == -1)[0] + pos).tolist()
            if run_start is not None and ends:
                yield run_start * g, min(ends[0] * g, disk) - run_start * g
                ends = ends[1:]
                run_start = None
            if run_start is None:
                for s, t in zip(starts, ends):
                    yield s * g, min(t * g, disk) - s * g
                if len(starts) > len(ends):
                    run_start = starts[-1]
            pos += n
        if run_start is not None:
            yield run_start * g, disk - run_start * g

    def __repr__(self) -> str:
        e = self.entry
        return f"<Bitmap {e.name!r} granularity={e.granularity} flags={e.flags:#x}>"


def _refuse_in_use(e: bm.DirectoryEntry) -> None:
    if e.in_use:
        raise BitmapError(f"bitmap {e.name!r} is in use (left inconsistent by a crash); "
                          "repair it with 'qjournal bitmap --repair' or remove it")


def load_bits(img: "Image", e: bm.DirectoryEntry) -> np.ndarray:
    cs = img.header.cluster_size
    nbytes = -(-(-(-img.header.size // e.granularity)) // 8)
    table = img.bitmap_table(e)
    out = np.zeros(len(table) * cs, dtype=np.uint8)
    offs = table & np.uint64(bm.TE_OFFSET_MASK)
    for i in np.nonzero(offs)[0].tolist():
        out[i * cs:(i + 1) * cs] = img.reader.array(int(offs[i]), cs, "u1")
    for i in np.nonzero((offs == 0) & ((table & np.uint64(bm.TE_ALL_ONES)) != 0))[0].tolist():
        out[i * cs:(i + 1) * cs] = 0xFF
    out = out[:nbytes]
    _mask_tail(out, -(-img.header.size // e.granularity))
    return out


def _mask_tail(bits: np.ndarray, nbits: int) -> None:
    """Clear the bits past the end of the disk in the last byte."""
    if nbits % 8 and len(bits):
        bits[-1] &= (1 << (nbits % 8)) - 1


def store_bits(img: "Image", bits: np.ndarray | None, gbits: int, all_ones: bool = False,
               disk_size: int | None = None) -> tuple[int, int]:
    """Stage ``bits`` as a new table and data clusters for a disk of ``disk_size`` bytes
    (the image's size by default) in the open transaction; returns (table_offset, table_size)."""
    tx = img.require_transaction()
    cs = img.header.cluster_size
    tsize = bm.table_size_for(img.header.size if disk_size is None else disk_size, gbits, cs)
    if tsize == 0:
        return 0, 0
    table = np.zeros(tsize, dtype=np.uint64)
    if all_ones:
        table[:] = bm.TE_ALL_ONES
    elif bits is not None:
        padded = np.zeros(tsize * cs, dtype=np.uint8)
        padded[:len(bits)] = bits
        chunks = padded.reshape(tsize, cs)
        used = np.nonzero(chunks.any(axis=1))[0]
        if len(used):
            start = tx.alloc.alloc(len(used))
            tx.write_new(start, chunks[used].tobytes())
            table[used] = np.uint64(start) + np.arange(len(used), dtype=np.uint64) * np.uint64(cs)
    tclusters = -(-tsize * 8 // cs)
    toff = tx.alloc.alloc(tclusters)
    raw = table.astype(">u8").tobytes()
    tx.write_new(toff, raw + bytes(tclusters * cs - len(raw)))
    return toff, tsize


def free_bitmap(img: "Image", e: bm.DirectoryEntry) -> None:
    """Stage the release of a bitmap's table and data clusters (applied last)."""
    if not e.table_size:
        return
    tx = img.require_transaction()
    offs = img.bitmap_table(e) & np.uint64(bm.TE_OFFSET_MASK)
    for off in offs[offs != 0].tolist():
        tx.alloc.free(int(off), 1)
    tx.alloc.free_clusters_of([(e.table_offset, e.table_size * 8)])


class Bitmaps(Mapping[str, Bitmap]):
    """The persistent bitmaps of an image, by name, in directory order."""

    def __init__(self, image: "Image") -> None:
        self.image = image

    def __repr__(self) -> str:
        return f"<qjournal Bitmaps of {self.image.path!r}: {list(self)!r}>"

    def _entries(self) -> list[bm.DirectoryEntry]:
        return self.image.staged.entries if self.image.staged else self.image.entries

    def __getitem__(self, name: str) -> Bitmap:
        if not any(e.name == name for e in self._entries()):
            raise KeyError(name)
        return Bitmap(self.image, name)

    def __iter__(self) -> Iterator[str]:
        return iter([e.name for e in self._entries()])

    def __len__(self) -> int:
        return len(self._entries())

    def _get(self, name: str) -> tuple[int, bm.DirectoryEntry]:
        for i, e in enumerate(self._entries()):
            if e.name == name:
                return i, e
        raise BitmapError(f"bitmap {name!r} not found in {self.image.path}")

    # -- operations -----------------------------------------------------------
    def add(self, name: str, granularity: int = 65536, *, disabled: bool = False) -> Bitmap:
        """Add an empty persistent bitmap (enabled unless ``disabled``)."""
        img = self.image
        if img.header.version < 3:
            raise BitmapError(f"{img.path}: a qcow2 v2 image (compat=0.10) cannot hold persistent bitmaps; "
                              "upgrade it with qemu-img amend -o compat=1.1")
        _check_name(name)
        gbits = _granularity_bits(granularity)
        if bm.table_size_for(img.header.size, gbits, img.header.cluster_size) == 0:
            raise BitmapError(f"{img.path}: a zero-size disk cannot hold a persistent bitmap "
                              "(QEMU refuses a bitmap table of 0 entries)")
        nbits = -(-img.header.size // (1 << gbits))
        if -(-nbits // 8) > bm.MAX_BITMAP_BYTES:
            raise BitmapError(f"bitmap {name!r} with granularity {granularity} would take "
                              f"{-(-nbits // 8)} bytes, more than QEMU's limit of {bm.MAX_BITMAP_BYTES}")
        with img.transaction(f"bitmap add {name}") as tx:
            if any(e.name == name for e in tx.entries):
                raise BitmapError(f"bitmap {name!r} already exists in {img.path}")
            if len(tx.entries) >= bm.MAX_BITMAPS:
                raise BitmapError(f"{img.path} already has {bm.MAX_BITMAPS} bitmaps, QEMU's limit")
            toff, tsize = store_bits(img, None, gbits)
            entry = bm.DirectoryEntry(name, toff, tsize, 0 if disabled else bm.FLAG_AUTO, gbits)
            if sum(e.packed_size for e in tx.entries) + entry.packed_size > bm.MAX_DIRECTORY_SIZE:
                raise BitmapError(f"bitmap directory would exceed QEMU's limit of {bm.MAX_DIRECTORY_SIZE} bytes")
            tx.entries.append(entry)
        return Bitmap(img, name)

    def remove(self, name: str) -> None:
        """Remove a bitmap (also one left in use) and free its clusters."""
        img = self.image
        with img.transaction(f"bitmap remove {name}") as tx:
            i, e = self._get(name)
            free_bitmap(img, e)
            del tx.entries[i]

    def _replace(self, name: str, what: str, bits: np.ndarray | None, *, all_ones: bool = False,
                 flags: int | None = None) -> None:
        img = self.image
        with img.transaction(f"bitmap {what} {name}") as tx:
            i, e = self._get(name)
            free_bitmap(img, e)
            toff, tsize = store_bits(img, bits, e.granularity_bits, all_ones)
            tx.entries[i] = attrs.evolve(e, table_offset=toff, table_size=tsize,
                                         flags=e.flags if flags is None else flags)

    def clear(self, name: str) -> None:
        """Make every bit clean."""
        _refuse_in_use(self._get(name)[1])
        self._replace(name, "clear", None)

    def _set_flags(self, name: str, what: str, flags: int) -> None:
        img = self.image
        with img.transaction(f"bitmap {what} {name}") as tx:
            i, e = self._get(name)
            if e.flags != flags:
                tx.entries[i] = attrs.evolve(e, flags=flags)

    def enable(self, name: str) -> None:
        """Track guest writes in this bitmap again (the ``auto`` flag)."""
        e = self._get(name)[1]
        _refuse_in_use(e)
        self._set_flags(name, "enable", e.flags | bm.FLAG_AUTO)

    def disable(self, name: str) -> None:
        """Stop tracking guest writes in this bitmap."""
        e = self._get(name)[1]
        _refuse_in_use(e)
        self._set_flags(name, "disable", e.flags & ~bm.FLAG_AUTO)

    def set_in_use(self, name: str, in_use: bool) -> None:
        """Set or clear ``in_use`` in place under the seed protocol (what QEMU does at open).

        Clearing it does not make stale bits true: use :meth:`repair` for that.
        """
        img = self.image
        with img.transaction(f"bitmap in_use={int(in_use)} {name}") as tx:
            i, e = self._get(name)
            flags = (e.flags | bm.FLAG_IN_USE) if in_use else (e.flags & ~bm.FLAG_IN_USE)
            if e.flags != flags:
                tx.entries[i] = attrs.evolve(e, flags=flags)
                tx.rewrite_directory_in_place()

    def merge(self, name: str, source: str, source_image: "Image | None" = None) -> None:
        """Set in ``name`` every bit set in ``source`` (of ``source_image``, default this image)."""
        img = self.image
        src_img = source_image or img
        dst_e = self._get(name)[1]
        _refuse_in_use(dst_e)
        src_bm = Bitmaps(src_img)
        src_e = src_bm._get(source)[1]
        _refuse_in_use(src_e)
        if src_img.header.size != img.header.size:
            raise BitmapError(f"cannot merge bitmap {source!r} of a {src_img.header.size}-byte disk into "
                              f"{name!r} of a {img.header.size}-byte disk")
        if src_e.granularity_bits == dst_e.granularity_bits and \
                src_img.header.cluster_size == img.header.cluster_size:
            self._merge_by_cluster(name, src_img, src_e)
            return
        src_bits = load_bits(src_img, src_e)
        dst_bits = load_bits(img, dst_e)
        if src_e.granularity_bits == dst_e.granularity_bits:
            merged = dst_bits | src_bits
        else:
            merged = dst_bits | _resample(src_bits, src_e.granularity, dst_e.granularity, img.header.size)
        if np.array_equal(merged, dst_bits):
            return
        self._replace(name, "merge", merged)

    def _merge_by_cluster(self, name: str, src_img: "Image", src_e: bm.DirectoryEntry) -> None:
        """Merge table entry by table entry; clusters that do not change are kept as they are.

        A kept data cluster moves from the old table to the new one: its single reference
        switches with the header, so its refcount stays 1 throughout.
        """
        img = self.image
        cs = img.header.cluster_size
        mask, ones = np.uint64(bm.TE_OFFSET_MASK), np.uint64(bm.TE_ALL_ONES)
        with img.transaction(f"bitmap merge {name}") as tx:
            i, e = self._get(name)
            old = img.bitmap_table(e)
            src = src_img.bitmap_table(src_e)
            new = old.copy()
            src_ones = ((src & mask) == 0) & ((src & ones) != 0)
            new[src_ones & ((old & mask) == 0) & ((old & ones) == 0)] = ones
            new[src_ones & ((old & mask) != 0)] = ones
            todo = np.nonzero(((src & mask) != 0) & ~(((old & mask) == 0) & ((old & ones) != 0)))[0]
            out = np.empty((len(todo), cs), dtype=np.uint8)
            idx: list[int] = []
            for k in todo.tolist():
                merged = out[len(idx)]
                merged[:] = src_img.reader.array(int(src[k] & mask), cs, "u1")
                doff = int(old[k] & mask)
                if doff:
                    dchunk = img.reader.array(doff, cs, "u1")
                    merged |= dchunk
                    if np.array_equal(merged, dchunk):
                        continue
                idx.append(k)
            if idx:
                start = tx.alloc.alloc(len(idx))
                tx.write_new(start, out[:len(idx)].reshape(-1))
                new[idx] = np.uint64(start) + np.arange(len(idx), dtype=np.uint64) * np.uint64(cs)
            if np.array_equal(new, old):
                return
            for off in (old[((old & mask) != 0) & (new != old)] & mask).tolist():
                tx.alloc.free(int(off), 1)
            tx.alloc.free_clusters_of([(e.table_offset, e.table_size * 8)])
            tclusters = -(-e.table_size * 8 // cs)
            toff = tx.alloc.alloc(tclusters)
            raw = new.astype(">u8").tobytes()
            tx.write_new(toff, raw + bytes(tclusters * cs - len(raw)))
            tx.entries[i] = attrs.evolve(e, table_offset=toff)

    def repair(self, name: str) -> bool:
        """Make a bitmap left ``in_use`` all-dirty and consistent again.

        Every bit is set, so the next incremental backup built on it copies the whole
        disk: a full backup, which is always correct. Returns False (and changes
        nothing) when the bitmap was not in use.
        """
        e = self._get(name)[1]
        if not e.in_use:
            return False
        self._replace(name, "repair", None, all_ones=True, flags=e.flags & ~bm.FLAG_IN_USE)
        return True


def _resample(bits: np.ndarray, g_src: int, g_dst: int, disk: int) -> np.ndarray:
    """Bits of granularity ``g_src`` as bits of granularity ``g_dst`` (a dirty byte stays dirty)."""
    n_dst = -(-disk // g_dst)
    out = np.zeros(-(-n_dst // 8), dtype=np.uint8)
    n_src = -(-disk // g_src)
    step = 1 << 20  # source bits per chunk, a multiple of every ratio we can meet below
    for lo in range(0, n_src, step):
        hi = min(n_src, lo + step)
        chunk = np.unpackbits(bits[lo // 8:-(-hi // 8)], bitorder="little")[:hi - lo]
        idx = np.nonzero(chunk)[0]
        if not len(idx):
            continue
        idx = idx.astype(np.int64) + lo
        if g_src > g_dst:
            r = g_src // g_dst
            dst_idx = (idx[:, None] * r + np.arange(r)[None, :]).reshape(-1)
        else:
            dst_idx = np.unique(idx * g_src // g_dst)
        dst_idx = dst_idx[dst_idx < n_dst]
        np.bitwise_or.at(out, dst_idx // 8, (1 << (dst_idx % 8)).astype(np.uint8))
    return out

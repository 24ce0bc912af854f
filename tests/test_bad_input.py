"""Hostile images: every damage is refused with one line, exit code 1, and no write.

Each case damages a copy of a qemu-made image in one precise way and runs the
commands a user would (`info`, `info --output=json`, `bitmap --add`, `bitmap
--remove`, `bitmap --dump`). Each must exit 1 with exactly one line on stderr,
``qjournal: STRUCTURE at offset 0x..: RULE``, leave the image byte-identical and
leave no ``IMAGE.qjournal`` sidecar behind.

Oracle: ``qemu-img info``. Where QEMU also refuses the damaged image (the default)
the test asserts that it fails; where QEMU accepts it (``qemu_refuses=False``) the test
asserts that too, so that the cases where qjournal is stricter than QEMU stay listed.
"""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Callable, NamedTuple

import pytest

import qemu
from qjournal.cli import main

EXT_BITMAPS = 0x23852875
EXT_FEATURES = 0x6803F857
ERROR_LINE = re.compile(r"^qjournal: (?P<structure>.+?) at offset (?P<offset>0x[0-9a-f]+): (?P<rule>.+)$")


def qj(*args: object) -> int:
    return main([str(a) for a in args])


def put(raw: bytearray, off: int, fmt: str, value: int) -> None:
    struct.pack_into(">" + fmt, raw, off, value)


class DirEntry(NamedTuple):
    at: int  # where the entry starts in the file
    table_offset: int
    table_size: int
    flags: int
    name: bytes
    table: tuple[int, ...]


class Layout:
    """Where things are in a qemu-made image, read with nothing but struct."""

    def __init__(self, raw: bytes) -> None:
        (self.version, self.backing_offset, self.backing_size, cluster_bits, self.size, _, self.l1_size,
         self.l1_offset, self.rt_offset, self.rt_clusters, self.nb_snapshots,
         self.snapshots_offset) = struct.unpack_from(">IQIIQIIQQIIQ", raw, 4)
        self.cs = 1 << cluster_bits
        self.header_length = struct.unpack_from(">I", raw, 100)[0] if self.version == 3 else 72
        self.exts: dict[int, int] = {}  # type -> offset of its type field
        off = self.header_length
        while True:
            etype, length = struct.unpack_from(">II", raw, off)
            if etype == 0:
                self.ext_end = off  # the end marker
                break
            self.exts[etype] = off
            off += 8 + (length + 7 & ~7)
        self.entries: list[DirEntry] = []
        if EXT_BITMAPS in self.exts:
            self.bm_ext = self.exts[EXT_BITMAPS] + 8  # the extension's data
            nb, _, self.dir_size, self.dir_offset = struct.unpack_from(">IIQQ", raw, self.bm_ext)
            pos = self.dir_offset
            for _ in range(nb):
                toff, tsize, flags, _, _, nsize = struct.unpack_from(">QIIBBH", raw, pos)
                table = struct.unpack_from(f">{tsize}Q", raw, toff)
                self.entries.append(DirEntry(pos, toff, tsize, flags, bytes(raw[pos + 24:pos + 24 + nsize]), table))
                pos += 24 + nsize + 7 & ~7

    def past_eof(self, raw: bytes) -> int:
        """A cluster-aligned offset a few clusters past the end of the file."""
        return (len(raw) // self.cs + 4) * self.cs


Damage = Callable[[bytearray, Layout], "bytes | None"]


class Case(NamedTuple):
    damage: Damage
    base: str  # which qemu-made image it starts from
    structure: str  # the structure the error must name
    words: tuple[str, ...]  # words the rule must contain
    qemu_refuses: bool  # does qemu-img info refuse the damaged image too?


CASES: list[object] = []


def case(name: str, structure: str, *words: str, base: str = "full",
         qemu_refuses: bool = True) -> Callable[[Damage], Damage]:
    def register(fn: Damage) -> Damage:
        CASES.append(pytest.param(Case(fn, base, structure, words, qemu_refuses), id=name))
        return fn
    return register


# -- the file as a whole -------------------------------------------------------------
@case("empty-file", "qcow2 header", "0 bytes", "shorter")
def _empty(raw: bytearray, lay: Layout) -> bytes:
    """An empty file."""
    return b""


@case("truncated-to-50-bytes", "qcow2 header", "50 bytes", "shorter")
def _trunc50(raw: bytearray, lay: Layout) -> bytes:
    """Truncated inside the v2 part of the header."""
    return bytes(raw[:50])


@case("truncated-inside-v3-header", "qcow2 header", "inside the v3 header")
def _trunc_v3(raw: bytearray, lay: Layout) -> bytes:
    """Truncated to 100 bytes: the middle of the v3 header fields."""
    return bytes(raw[:100])


@case("truncated-to-cluster-0", "qcow2 header", "refcount table", "past the end")
def _trunc_c0(raw: bytearray, lay: Layout) -> bytes:
    """Only cluster 0 is left: the refcount table is gone."""
    return bytes(raw[:lay.cs])


@case("truncated-before-snapshot-table", "qcow2 header", "snapshot", "past the end")
def _trunc_snap(raw: bytearray, lay: Layout) -> bytes:
    """Cut where the snapshot table starts."""
    return bytes(raw[:lay.snapshots_offset])


@case("truncated-inside-bitmap-directory", "bitmaps extension", "directory", "past the end")
def _trunc_dir(raw: bytearray, lay: Layout) -> bytes:
    """Cut in the middle of the bitmap directory (the last thing qemu-img wrote)."""
    return bytes(raw[:lay.dir_offset + 16])


# -- the header ----------------------------------------------------------------------
@case("bad-magic", "qcow2 header", "magic")
def _magic(raw: bytearray, lay: Layout) -> None:
    """The magic is 'QFI\\xfa'."""
    raw[3] = 0xFA


@case("version-4", "qcow2 header", "version 4")
def _v4(raw: bytearray, lay: Layout) -> None:
    """Version 4, which does not exist."""
    put(raw, 4, "I", 4)


@case("version-1", "qcow2 header", "version 1")
def _v1(raw: bytearray, lay: Layout) -> None:
    """Version 1 (qcow, not qcow2)."""
    put(raw, 4, "I", 1)


@case("header-length-100", "qcow2 header", "header_length 100", "at least 104")
def _hl100(raw: bytearray, lay: Layout) -> None:
    """header_length 100, shorter than a v3 header."""
    put(raw, 100, "I", 100)


@case("header-length-105", "qcow2 header", "header_length 105", "multiple of 8", qemu_refuses=False)
def _hl105(raw: bytearray, lay: Layout) -> None:
    """header_length 105, not a multiple of 8."""
    put(raw, 100, "I", 105)


@case("header-length-past-cluster", "qcow2 header", "header_length", "cluster size")
def _hl_big(raw: bytearray, lay: Layout) -> None:
    """header_length larger than the cluster."""
    put(raw, 100, "I", 2 * lay.cs)


@case("refcount-order-7", "qcow2 header", "refcount_order 7", "0..6")
def _ro7(raw: bytearray, lay: Layout) -> None:
    """refcount_order 7 (128-bit refcounts)."""
    put(raw, 96, "I", 7)


@case("cluster-bits-8", "qcow2 header", "cluster_bits 8")
def _cb8(raw: bytearray, lay: Layout) -> None:
    """cluster_bits 8: 256-byte clusters."""
    put(raw, 20, "I", 8)


@case("cluster-bits-22", "qcow2 header", "cluster_bits 22")
def _cb22(raw: bytearray, lay: Layout) -> None:
    """cluster_bits 22: 4 MiB clusters."""
    put(raw, 20, "I", 22)


@case("unknown-incompatible-bit", "qcow2 header", "unknown incompatible feature")
def _incompat(raw: bytearray, lay: Layout) -> None:
    """Incompatible feature bit 10, which nobody knows."""
    put(raw, 72, "Q", 1 << 10)


@case("compression-type-without-bit", "qcow2 header", "compression")
def _zstd_nobit(raw: bytearray, lay: Layout) -> None:
    """compression_type zstd but the incompatible compression bit clear."""
    raw[104] = 1


@case("crypt-method-3", "qcow2 header", "crypt_method 3")
def _crypt3(raw: bytearray, lay: Layout) -> None:
    """crypt_method 3, which does not exist."""
    put(raw, 32, "I", 3)


@case("data-file-bit-without-name", "qcow2 header", "data file", qemu_refuses=False)
def _datafile(raw: bytearray, lay: Layout) -> None:
    """The external data file bit set, with no data file name extension."""
    put(raw, 72, "Q", 1 << 2)


@case("refcount-table-past-eof", "qcow2 header", "refcount table", "past the end", qemu_refuses=False)
def _rt_eof(raw: bytearray, lay: Layout) -> None:
    """The refcount table offset lies past the end of the file."""
    put(raw, 48, "Q", lay.past_eof(raw))


@case("refcount-table-unaligned", "qcow2 header", "refcount_table_offset", "aligned")
def _rt_unaligned(raw: bytearray, lay: Layout) -> None:
    """The refcount table offset is not cluster aligned."""
    put(raw, 48, "Q", lay.rt_offset + 512)


@case("refcount-table-clusters-larger-than-file", "qcow2 header", "refcount table", "past the end")
def _rt_big(raw: bytearray, lay: Layout) -> None:
    """refcount_table_clusters runs the table far past the end of the file."""
    put(raw, 56, "I", 1 << 20)


@case("no-refcount-table", "qcow2 header", "no refcount table")
def _rt_none(raw: bytearray, lay: Layout) -> None:
    """refcount_table_clusters 0."""
    put(raw, 56, "I", 0)


@case("l1-size-larger-than-file", "qcow2 header", "L1 table", "past the end", qemu_refuses=False)
def _l1_big(raw: bytearray, lay: Layout) -> None:
    """l1_size runs the L1 table past the end of the file (under QEMU's limit)."""
    put(raw, 36, "I", 0x300000)


@case("l1-size-over-limit", "qcow2 header", "l1_size", "limit")
def _l1_limit(raw: bytearray, lay: Layout) -> None:
    """l1_size above QEMU's limit of 32 MiB of entries."""
    put(raw, 36, "I", 0x2000001)


@case("l1-size-too-small", "qcow2 header", "l1_size", "too small")
def _l1_small(raw: bytearray, lay: Layout) -> None:
    """A virtual size that needs more L1 entries than l1_size gives."""
    put(raw, 24, "Q", lay.size * 64)


@case("l1-table-unaligned", "qcow2 header", "l1_table_offset", "aligned")
def _l1_unaligned(raw: bytearray, lay: Layout) -> None:
    """The L1 table offset is not cluster aligned."""
    put(raw, 40, "Q", lay.l1_offset + 8)


@case("l1-table-past-eof", "qcow2 header", "L1 table", "past the end", qemu_refuses=False)
def _l1_eof(raw: bytearray, lay: Layout) -> None:
    """The L1 table offset lies past the end of the file."""
    put(raw, 40, "Q", lay.past_eof(raw))


@case("l1-table-overlapping-refcount-table", "L1 table", "overlaps", "refcount table", qemu_refuses=False)
def _l1_on_rt(raw: bytearray, lay: Layout) -> None:
    """The L1 table placed on the refcount table."""
    put(raw, 40, "Q", lay.rt_offset)


@case("l1-table-overlapping-header", "L1 table", "overlaps", "header cluster", qemu_refuses=False)
def _l1_on_header(raw: bytearray, lay: Layout) -> None:
    """The L1 table placed at offset 0, on the header."""
    put(raw, 40, "Q", 0)


# -- snapshots -----------------------------------------------------------------------
@case("snapshot-table-past-eof", "qcow2 header", "snapshot table", "past the end", qemu_refuses=False)
def _snap_eof(raw: bytearray, lay: Layout) -> None:
    """The snapshot table offset lies past the end of the file."""
    put(raw, 64, "Q", lay.past_eof(raw))


@case("snapshot-table-unaligned", "qcow2 header", "snapshots_offset", "aligned")
def _snap_unaligned(raw: bytearray, lay: Layout) -> None:
    """The snapshot table offset is not cluster aligned."""
    put(raw, 64, "Q", lay.snapshots_offset + 8)


@case("nb-snapshots-larger-than-file", "qcow2 header", "snapshot table", "past the end")
def _snap_count(raw: bytearray, lay: Layout) -> None:
    """nb_snapshots 65536: the table would run past the end of the file."""
    put(raw, 60, "I", 65536)


@case("nb-snapshots-over-limit", "qcow2 header", "snapshots", "limit")
def _snap_limit(raw: bytearray, lay: Layout) -> None:
    """nb_snapshots 65537, above QEMU's limit."""
    put(raw, 60, "I", 65537)


@case("snapshot-l1-past-eof", "snapshot table", "L1", "past the end", qemu_refuses=False)
def _snap_l1_eof(raw: bytearray, lay: Layout) -> None:
    """Snapshot 0's L1 table lies past the end of the file."""
    put(raw, lay.snapshots_offset, "Q", lay.past_eof(raw))


@case("snapshot-l1-unaligned", "snapshot table", "L1", "aligned", qemu_refuses=False)
def _snap_l1_unaligned(raw: bytearray, lay: Layout) -> None:
    """Snapshot 0's L1 table offset is not cluster aligned."""
    put(raw, lay.snapshots_offset, "Q", struct.unpack_from(">Q", raw, lay.snapshots_offset)[0] + 8)


@case("snapshot-extra-data-too-large", "snapshot table", "extra data", "exceeds")
def _snap_extra(raw: bytearray, lay: Layout) -> None:
    """Snapshot 0 claims 2000 bytes of extra data (QEMU's limit is 1024)."""
    put(raw, lay.snapshots_offset + 36, "I", 2000)


@case("snapshot-table-overlapping-refcount-table", "snapshot table", "overlaps", "refcount table", qemu_refuses=False)
def _snap_on_rt(raw: bytearray, lay: Layout) -> None:
    """The snapshot table placed on the refcount table (which parses as one empty snapshot)."""
    put(raw, 64, "Q", lay.rt_offset)


# -- header extensions and the backing file name ---------------------------------------
@case("extension-past-cluster-0", "header extension", "runs past")
def _ext_long(raw: bytearray, lay: Layout) -> None:
    """The feature name table claims a length that runs past cluster 0."""
    put(raw, lay.exts[EXT_FEATURES] + 4, "I", lay.cs)


@case("duplicate-extension", "header extension", "twice", qemu_refuses=False)
def _ext_dup(raw: bytearray, lay: Layout) -> None:
    """The bitmaps extension appears twice."""
    ext = bytes(raw[lay.exts[EXT_BITMAPS]:lay.ext_end])
    raw[lay.ext_end:lay.ext_end + len(ext) + 8] = ext + bytes(8)


@case("no-extension-end-marker", "header extension", "without an end marker", qemu_refuses=False)
def _ext_noend(raw: bytearray, lay: Layout) -> None:
    """Unknown empty extensions fill cluster 0 to its end: no end marker."""
    for i, off in enumerate(range(lay.ext_end, lay.cs, 8)):
        raw[off:off + 8] = struct.pack(">II", 0x10000000 + i, 0)


@case("bitmaps-extension-length-16", "bitmaps extension", "length 16")
def _bmext_len(raw: bytearray, lay: Layout) -> None:
    """The bitmaps extension is 16 bytes long instead of 24."""
    put(raw, lay.exts[EXT_BITMAPS] + 4, "I", 16)


@case("backing-name-past-cluster-0", "qcow2 header", "backing file", "cluster 0", base="backing")
def _backing_far(raw: bytearray, lay: Layout) -> None:
    """The backing file name starts near the end of cluster 0 and runs past it."""
    put(raw, 8, "Q", lay.cs - 4)


@case("backing-name-1024-bytes", "qcow2 header", "backing file", "1023", base="backing")
def _backing_long(raw: bytearray, lay: Layout) -> None:
    """A backing file name of 1024 bytes."""
    put(raw, 16, "I", 1024)


@case("backing-name-overlapping-extensions", "qcow2 header", "backing file", "overlaps", base="backing",
      qemu_refuses=False)
def _backing_on_exts(raw: bytearray, lay: Layout) -> None:
    """The backing file name placed on the header extensions."""
    put(raw, 8, "Q", lay.header_length)


# -- the bitmaps extension and the bitmap directory ----------------------------------
@case("nb-bitmaps-zero", "bitmaps extension", "nb_bitmaps 0")
def _nb0(raw: bytearray, lay: Layout) -> None:
    """nb_bitmaps 0 with the extension present."""
    put(raw, lay.bm_ext, "I", 0)


@case("nb-bitmaps-larger-than-directory", "bitmaps extension", "directory size", "impossible")
def _nb_big(raw: bytearray, lay: Layout) -> None:
    """nb_bitmaps 3 while the directory holds two entries."""
    put(raw, lay.bm_ext, "I", 3)


@case("nb-bitmaps-smaller-than-directory", "bitmap directory", "does not match")
def _nb_small(raw: bytearray, lay: Layout) -> None:
    """nb_bitmaps 1 while the directory holds two entries."""
    put(raw, lay.bm_ext, "I", 1)


@case("bitmaps-extension-reserved", "bitmaps extension", "reserved")
def _bmext_reserved(raw: bytearray, lay: Layout) -> None:
    """The reserved u32 of the bitmaps extension is not zero."""
    put(raw, lay.bm_ext + 4, "I", 1)


@case("directory-size-larger-than-file", "bitmaps extension", "directory", "past the end")
def _dir_big(raw: bytearray, lay: Layout) -> None:
    """directory size runs the directory past the end of the file."""
    put(raw, lay.bm_ext + 8, "Q", 1 << 20)


@case("directory-size-over-limit", "bitmaps extension", "directory size")
def _dir_limit(raw: bytearray, lay: Layout) -> None:
    """directory size above QEMU's limit of 1024 * 65535."""
    put(raw, lay.bm_ext + 8, "Q", 1024 * 65535 + 8)


@case("directory-past-eof", "bitmaps extension", "directory", "past the end")
def _dir_eof(raw: bytearray, lay: Layout) -> None:
    """The directory offset lies past the end of the file."""
    put(raw, lay.bm_ext + 16, "Q", lay.past_eof(raw))


@case("directory-unaligned", "bitmaps extension", "directory offset", "multiple of the cluster size")
def _dir_unaligned(raw: bytearray, lay: Layout) -> None:
    """The directory offset is not cluster aligned (the entries are copied along)."""
    raw[lay.dir_offset + 8:lay.dir_offset + 8 + lay.dir_size] = raw[lay.dir_offset:lay.dir_offset + lay.dir_size]
    put(raw, lay.bm_ext + 16, "Q", lay.dir_offset + 8)


@case("directory-offset-zero", "bitmaps extension", "directory offset 0x0")
def _dir_zero(raw: bytearray, lay: Layout) -> None:
    """The directory offset is 0: the header cluster."""
    put(raw, lay.bm_ext + 16, "Q", 0)


@case("directory-on-snapshot-table", "bitmap directory", "extra data")
def _dir_on_snap(raw: bytearray, lay: Layout) -> None:
    """The directory offset points at the snapshot table, which does not parse as entries."""
    put(raw, lay.bm_ext + 16, "Q", lay.snapshots_offset)


@case("directory-overlapping-l1-table", "bitmap directory", "overlaps", "L1 table", qemu_refuses=False)
def _dir_on_l1(raw: bytearray, lay: Layout) -> None:
    """The L1 table moved onto the bitmap directory's cluster."""
    put(raw, 40, "Q", lay.dir_offset)


@case("directory-entry-reserved-flag", "bitmap directory", "reserved flag")
def _flag_bit2(raw: bytearray, lay: Layout) -> None:
    """bitmap directory entry 0: reserved flag bit 2."""
    put(raw, lay.entries[0].at + 12, "I", lay.entries[0].flags | 4)


@case("directory-entry-type-2", "bitmap directory", "type 2")
def _type2(raw: bytearray, lay: Layout) -> None:
    """bitmap directory entry 1: type 2."""
    raw[lay.entries[1].at + 16] = 2


@case("directory-entry-granularity-8", "bitmap directory", "granularity_bits 8")
def _gran8(raw: bytearray, lay: Layout) -> None:
    """bitmap directory entry 0: granularity_bits 8 (256 bytes)."""
    raw[lay.entries[0].at + 17] = 8


@case("directory-entry-granularity-32", "bitmap directory", "granularity_bits 32")
def _gran32(raw: bytearray, lay: Layout) -> None:
    """bitmap directory entry 0: granularity_bits 32."""
    raw[lay.entries[0].at + 17] = 32


@case("directory-entry-extra-data", "bitmap directory", "extra data")
def _extra(raw: bytearray, lay: Layout) -> None:
    """bitmap directory entry 0: 8 bytes of extra data."""
    put(raw, lay.entries[0].at + 20, "I", 8)


@case("directory-entry-empty-name", "bitmap directory", "name size 0")
def _name0(raw: bytearray, lay: Layout) -> None:
    """bitmap directory entry 0: name_size 0."""
    put(raw, lay.entries[0].at + 18, "H", 0)


@case("directory-entry-name-past-directory", "bitmap directory", "past the directory")
def _name_long(raw: bytearray, lay: Layout) -> None:
    """bitmap directory entry 1: a name that runs past the directory's size."""
    put(raw, lay.entries[1].at + 18, "H", 1000)


@case("directory-entry-name-not-utf8", "bitmap directory", "UTF-8", qemu_refuses=False)
def _name_utf8(raw: bytearray, lay: Layout) -> None:
    """bitmap directory entry 0: a name that is not UTF-8."""
    raw[lay.entries[0].at + 24:lay.entries[0].at + 26] = b"\xff\xfe"


@case("duplicate-bitmap-names", "bitmap directory", "'b0'", "twice")
def _dup_name(raw: bytearray, lay: Layout) -> None:
    """Two bitmaps named alike: b1 renamed to b0."""
    raw[lay.entries[1].at + 24:lay.entries[1].at + 26] = b"b0"


@case("bitmap-table-offset-unaligned", "bitmap directory", "table offset", "aligned")
def _tab_unaligned(raw: bytearray, lay: Layout) -> None:
    """bitmap directory entry 0: table offset not cluster aligned."""
    put(raw, lay.entries[0].at, "Q", lay.entries[0].table_offset + 512)


@case("bitmap-table-offset-zero", "bitmap directory", "table offset is 0x0")
def _tab_zero(raw: bytearray, lay: Layout) -> None:
    """bitmap directory entry 0: table offset 0 (the header cluster)."""
    put(raw, lay.entries[0].at, "Q", 0)


@case("bitmap-table-past-eof", "bitmap directory", "table", "past the end", qemu_refuses=False)
def _tab_eof(raw: bytearray, lay: Layout) -> None:
    """bitmap directory entry 0: table offset past the end of the file."""
    put(raw, lay.entries[0].at, "Q", lay.past_eof(raw))


@case("bitmap-table-size-larger-than-file", "bitmap directory", "table", "past the end")
def _tab_big(raw: bytearray, lay: Layout) -> None:
    """bitmap directory entry 0: table_size of 2^26 entries (512 MiB), past the end of the file."""
    put(raw, lay.entries[0].at + 8, "I", 1 << 26)


@case("bitmap-table-size-over-limit", "bitmap directory", "table", "exceeds")
def _tab_limit(raw: bytearray, lay: Layout) -> None:
    """bitmap directory entry 0: table_size above QEMU's 0x8000000 entries."""
    put(raw, lay.entries[0].at + 8, "I", 0x8000001)


@case("bitmap-table-size-zero", "bitmap directory", "table_size is 0")
def _tab_size0(raw: bytearray, lay: Layout) -> None:
    """bitmap directory entry 0: table_size 0 for a bitmap that needs one cluster."""
    put(raw, lay.entries[0].at + 8, "I", 0)


@case("in-use-bitmap-table-size-zero", "bitmap directory", "table_size is 0")
def _tab_size0_in_use(raw: bytearray, lay: Layout) -> None:
    """bitmap directory entry 0: in use (so its size may be stale) but table_size 0."""
    put(raw, lay.entries[0].at + 8, "I", 0)
    put(raw, lay.entries[0].at + 12, "I", lay.entries[0].flags | 1)


@case("bitmap-table-size-larger-than-needed", "bitmap directory", "2 entries", "needs 1")
def _tab_size2(raw: bytearray, lay: Layout) -> None:
    """bitmap directory entry 0: table_size 2 where the disk needs 1 (QEMU refuses it at load)."""
    put(raw, lay.entries[0].at + 8, "I", 2)


@case("bitmap-table-overlapping-other-table", "bitmap table of 'b1'", "overlaps", "bitmap table of 'b0'",
      qemu_refuses=False)
def _tab_shared(raw: bytearray, lay: Layout) -> None:
    """b1's table offset points at b0's table."""
    put(raw, lay.entries[1].at, "Q", lay.entries[0].table_offset)


@case("bitmap-table-overlapping-l1-table", "bitmap table of 'b0'", "overlaps", "L1 table", qemu_refuses=False)
def _tab_on_l1(raw: bytearray, lay: Layout) -> None:
    """The L1 table moved onto b0's bitmap table (so the table's entries still parse)."""
    put(raw, 40, "Q", lay.entries[0].table_offset)


# -- bitmap table entries ------------------------------------------------------------
@case("table-entry-reserved-low-bit", "bitmap table of 'b0'", "entry 0", "reserved")
def _te_low(raw: bytearray, lay: Layout) -> None:
    """b0's table entry 0: reserved bit 1."""
    put(raw, lay.entries[0].table_offset, "Q", lay.entries[0].table[0] | 2)


@case("table-entry-reserved-high-bit", "bitmap table of 'b1'", "entry 0", "reserved")
def _te_high(raw: bytearray, lay: Layout) -> None:
    """b1's table entry 0: reserved bit 56."""
    put(raw, lay.entries[1].table_offset, "Q", lay.entries[1].table[0] | 1 << 56)


@case("table-entry-offset-and-all-ones", "bitmap table of 'b0'", "entry 0", "all-ones")
def _te_ones(raw: bytearray, lay: Layout) -> None:
    """b0's table entry 0: a data offset and the all-ones bit together."""
    put(raw, lay.entries[0].table_offset, "Q", lay.entries[0].table[0] | 1)


@case("table-entry-unaligned", "bitmap table of 'b0'", "entry 0", "aligned")
def _te_unaligned(raw: bytearray, lay: Layout) -> None:
    """b0's table entry 0: data offset 512 bytes into a cluster."""
    put(raw, lay.entries[0].table_offset, "Q", lay.entries[0].table[0] + 512)


@case("table-entry-past-eof", "bitmap table of 'b1'", "entry 0", "past the end", qemu_refuses=False)
def _te_eof(raw: bytearray, lay: Layout) -> None:
    """b1's table entry 0: data offset past the end of the file."""
    put(raw, lay.entries[1].table_offset, "Q", lay.past_eof(raw))


@case("table-entry-data-used-twice", "bitmap table of 'b1'", "used twice", qemu_refuses=False)
def _te_twice(raw: bytearray, lay: Layout) -> None:
    """b1's table entries 0 and 1 point at the same data cluster."""
    put(raw, lay.entries[1].table_offset + 8, "Q", lay.entries[1].table[0])


@case("in-use-bitmap-table-reserved-bit", "bitmap table of 'b0'", "entry 0", "reserved", qemu_refuses=False)
def _te_in_use(raw: bytearray, lay: Layout) -> None:
    """b0 is in use (QEMU never reads its table) and its table entry 0 has reserved bit 1."""
    put(raw, lay.entries[0].at + 12, "I", lay.entries[0].flags | 1)
    put(raw, lay.entries[0].table_offset, "Q", lay.entries[0].table[0] | 2)


@case("table-entry-data-shared", "bitmap table of 'b1'", "overlaps", "bitmap data of 'b0'", qemu_refuses=False)
def _te_shared(raw: bytearray, lay: Layout) -> None:
    """b1's data cluster is b0's data cluster."""
    put(raw, lay.entries[1].table_offset, "Q", lay.entries[0].table[0])


@case("table-entry-data-on-l1-table", "bitmap table of 'b0'", "overlaps", "L1 table", qemu_refuses=False)
def _te_on_l1(raw: bytearray, lay: Layout) -> None:
    """b0's data cluster is the L1 table's cluster."""
    put(raw, lay.entries[0].table_offset, "Q", lay.l1_offset)


# -- running it ----------------------------------------------------------------------
COMMANDS: list[tuple[str, ...]] = [
    ("info",),
    ("info", "--output=json"),
    ("bitmap", "--add"),
    ("bitmap", "--remove"),
    ("bitmap", "--dump"),
]


def _argv(cmd: tuple[str, ...], img: Path) -> list[object]:
    if cmd[0] == "bitmap":
        return [*cmd, img, "new" if cmd[1] == "--add" else "b0"]
    return [*cmd, img]


def _assert_refused(c: Case, cmd: tuple[str, ...], img: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``cmd`` exits 1 with one line ``qjournal: STRUCTURE at offset 0x..: RULE`` and no traceback."""
    what = f"{c.damage.__doc__}: {' '.join(cmd)}"
    capsys.readouterr()
    code = qj(*_argv(cmd, img))  # an exception other than the exit code would be a traceback
    err = capsys.readouterr().err
    assert code == 1, f"{what} exited {code}: {err}"
    lines = err.splitlines()
    assert len(lines) == 1, f"{what}: stderr is not one line: {err!r}"
    m = ERROR_LINE.match(lines[0])
    assert m, f"{what}: not 'qjournal: STRUCTURE at offset 0x..: RULE': {lines[0]!r}"
    assert m["structure"] == c.structure, f"{what}: {lines[0]!r}"
    for w in c.words:
        assert w in m["rule"], f"{what}: {w!r} missing from the rule: {lines[0]!r}"


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The qemu-made images the cases damage."""
    d = tmp_path_factory.mktemp("bases")
    full = qemu.create(d / "full.qcow2", "1G")
    qemu.qemu_img("bitmap", "--add", str(full), "b0")
    qemu.qemu_img("bitmap", "--add", "-g", "512", str(full), "b1")  # 4 table entries, 2 with data
    qemu.qemu_io(full, "write -P 0x5a 0 1M", "write 100M 64k", "write 300M 64k")
    qemu.qemu_img("snapshot", "-c", "s1", str(full))
    qemu.qemu_io(full, "write 200M 64k")
    qemu.create(d / "backing-base.qcow2", "64M")
    backing = d / "backing.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", "backing-base.qcow2", "-F", "qcow2", str(backing))
    qemu.qemu_img("bitmap", "--add", str(backing), "b0")
    qemu.qemu_io(backing, "write 1M 64k")
    return {"full": full, "backing": backing}


@pytest.mark.parametrize("c", CASES)
def test_refused(c: Case, bases: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = bytearray(bases[c.base].read_bytes())
    damaged = c.damage(raw, Layout(raw))
    data = bytes(raw if damaged is None else damaged)
    img = tmp_path / "disk.qcow2"
    img.write_bytes(data)
    if c.base == "backing":
        shutil.copy(bases[c.base].parent / "backing-base.qcow2", tmp_path)
    sidecar = Path(str(img) + ".qjournal")
    what = c.damage.__doc__
    for cmd in COMMANDS:
        _assert_refused(c, cmd, img, capsys)
        assert img.read_bytes() == data, f"{what}: {' '.join(cmd)} changed the image"
        assert not sidecar.exists(), f"{what}: {' '.join(cmd)} left {sidecar.name} behind"
    # Bytes, not text: a damaged header can hand qemu-img a backing name that is not UTF-8.
    res = subprocess.run(["qemu-img", "info", "-f", "qcow2", "-U", str(img)], capture_output=True)
    if c.qemu_refuses:
        assert res.returncode != 0, f"{what}: qemu-img info accepts it:\n{res.stdout!r}"
    else:
        # qjournal is stricter than qemu-img info here: QEMU reads past the end of the
        # file as zeros, checks overlaps only before it writes, checks snapshot L1 tables
        # only in qemu-img check, never reads the table of an in-use bitmap, and lets a
        # second extension of one type replace the first.
        assert res.returncode == 0, f"{what}: qemu-img info refuses it too: drop qemu_refuses=False: {res.stderr!r}"
    assert img.read_bytes() == data


# -- damage that only a write finds ------------------------------------------------------
# Refcounts are read only to allocate and free clusters: `info` and `bitmap --dump` read
# these images as qemu-img info does, and every command that would write refuses.
WRITE_CASES: list[object] = []


def write_case(name: str, structure: str, *words: str) -> Callable[[Damage], Damage]:
    def register(fn: Damage) -> Damage:
        WRITE_CASES.append(pytest.param(Case(fn, "full", structure, words, False), id=name))
        return fn
    return register


def _refcount_entry(raw: bytes, lay: Layout, offset: int) -> int:
    """Where the 16-bit refcount of the cluster at ``offset`` sits (qemu-made images: one block)."""
    block = struct.unpack_from(">Q", raw, lay.rt_offset)[0]
    return block + 2 * (offset // lay.cs)


@write_case("refcount-table-entry-past-eof", "refcount table", "past the end")
def _rte_eof(raw: bytearray, lay: Layout) -> None:
    """Refcount table entry 0 points past the end of the file."""
    put(raw, lay.rt_offset, "Q", lay.past_eof(raw))


@write_case("refcount-table-entry-unaligned", "refcount table", "unaligned")
def _rte_unaligned(raw: bytearray, lay: Layout) -> None:
    """Refcount table entry 0 is not cluster aligned."""
    put(raw, lay.rt_offset, "Q", struct.unpack_from(">Q", raw, lay.rt_offset)[0] + 512)


@write_case("refcount-table-entry-reserved", "refcount table", "reserved")
def _rte_reserved(raw: bytearray, lay: Layout) -> None:
    """Refcount table entry 0 has reserved bit 0 set."""
    put(raw, lay.rt_offset, "Q", struct.unpack_from(">Q", raw, lay.rt_offset)[0] | 1)


@write_case("directory-refcount-zero", "refcount block", "below zero")
def _dir_refcount0(raw: bytearray, lay: Layout) -> None:
    """The bitmap directory's cluster has refcount 0: freeing it would go below zero."""
    put(raw, _refcount_entry(raw, lay, lay.dir_offset), "H", 0)


@pytest.mark.parametrize("c", WRITE_CASES)
def test_write_refused(c: Case, bases: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = bytearray(bases[c.base].read_bytes())
    c.damage(raw, Layout(raw))
    data = bytes(raw)
    img = tmp_path / "disk.qcow2"
    img.write_bytes(data)
    sidecar = Path(str(img) + ".qjournal")
    what = c.damage.__doc__
    for cmd in COMMANDS:
        if cmd[-1] in ("--add", "--remove"):
            _assert_refused(c, cmd, img, capsys)
        else:
            capsys.readouterr()
            code = qj(*_argv(cmd, img))
            assert code == 0, f"{what}: {' '.join(cmd)} exited {code}: {capsys.readouterr().err}"
        assert img.read_bytes() == data, f"{what}: {' '.join(cmd)} changed the image"
        assert not sidecar.exists(), f"{what}: {' '.join(cmd)} left {sidecar.name} behind"
    assert qemu.qemu_img("info", "-f", "qcow2", "-U", str(img), check=False).returncode == 0


# -- not too strict ----------------------------------------------------------------------
def test_long_header_is_accepted(bases: dict[str, Path], tmp_path: Path) -> None:
    """header_length 8192 (QEMU reads it: the fields past byte 112 are unknown ones)."""
    raw = bytearray(bases["full"].read_bytes())
    lay = Layout(raw)
    exts = bytes(raw[lay.header_length:lay.ext_end + 8])
    raw[lay.header_length:lay.ext_end + 8] = bytes(len(exts))
    raw[8192:8192 + len(exts)] = exts
    put(raw, 100, "I", 8192)
    img = tmp_path / "disk.qcow2"
    img.write_bytes(bytes(raw))
    assert [b["name"] for b in qemu.bitmaps(img)] == ["b0", "b1"]
    assert qj("info", img) == 0
    assert qj("bitmap", "--add", img, "new") == 0
    assert [b["name"] for b in qemu.bitmaps(img)] == ["b0", "b1", "new"]
    qemu.assert_clean(img)

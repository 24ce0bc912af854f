"""Persistent dirty bitmaps: the header extension, the directory and the tables.

Bitmaps extension data (24 bytes)::

    0   u32 nb_bitmaps            1..65535
    4   u32 reserved              0
    8   u64 bitmap_directory_size at most 1024 * 65535
    16  u64 bitmap_directory_offset  cluster aligned

Directory entry (each padded to 8 bytes)::

    0   u64 bitmap_table_offset   cluster aligned
    8   u32 bitmap_table_size     entries
    12  u32 flags                 bit 0 in_use, bit 1 auto, others reserved
    16  u8  type                  1 (dirty tracking)
    17  u8  granularity_bits      9..31
    18  u16 name_size             1..1023
    20  u32 extra_data_size       0 (QEMU refuses extra data)
    24  extra data, name (no NUL), padding to 8

Table entry (u64): bits 9..55 data cluster offset; with offset 0, bit 0 set means
"all ones", clear means "all zeros". Reserved: 0xff000000000001fe. Bit n of the data
covers guest bytes n*g .. (n+1)*g-1, least significant bit first.
"""
from __future__ import annotations

import struct

import attrs

from .lazy import np
from ..errors import FormatError
from .extensions import EXT_HEADER

# The bitmaps extension's data: (field, struct code, offset). The one declaration of its layout.
EXT_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("nb_bitmaps", "I", 0),
    ("reserved", "I", 4),
    ("directory_size", "Q", 8),
    ("directory_offset", "Q", 16),
)
EXT_FIELD_OFFSET = {name: off for name, _, off in EXT_FIELDS}
_EXT = struct.Struct(">" + "".join(code for _, code, _ in EXT_FIELDS))
EXT_SIZE = _EXT.size    # 24
ENTRY_FIXED = 24
FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
FLAGS_KNOWN = FLAG_IN_USE | FLAG_AUTO
TYPE_DIRTY_TRACKING = 1
MAX_BITMAPS = 65535
MAX_NAME = 1023
MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_TABLE_ENTRIES = 0x8000000
MAX_BITMAP_BYTES = 512 << 20  # QEMU refuses a bitmap larger than 512 MiB

TABLE_ENTRY_SIZE = 8
TE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TE_RESERVED_MASK = 0xFF000000000001FE
TE_ALL_ONES = 1


@attrs.frozen
class BitmapsExtension:
    nb_bitmaps: int
    directory_size: int
    directory_offset: int

    @classmethod
    def parse(cls, data: bytes, ext_offset: int, cluster_size: int, file_size: int) -> "BitmapsExtension":
        where = ext_offset + EXT_HEADER.size
        at = {name: where + off for name, off in EXT_FIELD_OFFSET.items()}
        if len(data) != EXT_SIZE:
            raise FormatError("bitmaps extension", ext_offset, f"length {len(data)} is not {EXT_SIZE}")
        nb, reserved, dsize, doff = _EXT.unpack(data)
        if reserved:
            raise FormatError("bitmaps extension", at["reserved"], "reserved field is not zero")
        if not 1 <= nb <= MAX_BITMAPS:
            raise FormatError("bitmaps extension", at["nb_bitmaps"], f"nb_bitmaps {nb} outside 1..{MAX_BITMAPS}")
        if dsize > MAX_DIRECTORY_SIZE or dsize < nb * ENTRY_FIXED:
            raise FormatError("bitmaps extension", at["directory_size"],
                              f"directory size {dsize} is impossible for {nb} bitmaps (at most {MAX_DIRECTORY_SIZE})")
        if doff % cluster_size or doff == 0:
            raise FormatError("bitmaps extension", at["directory_offset"],
                              f"directory offset {doff:#x} is not a non-zero multiple of the cluster size")
        if doff + dsize > file_size:
            raise FormatError("bitmaps extension", at["directory_offset"],
                              f"directory ({dsize} bytes at {doff:#x}) runs past the end of the file ({file_size:#x})")
        return cls(nb, dsize, doff)

    def pack(self) -> bytes:
        return _EXT.pack(self.nb_bitmaps, 0, self.directory_size, self.directory_offset)


@attrs.frozen
class DirectoryEntry:
    name: str
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    type: int = TYPE_DIRTY_TRACKING

    @property
    def in_use(self) -> bool:
        return bool(self.flags & FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & FLAG_AUTO)

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def packed_size(self) -> int:
        return (ENTRY_FIXED + len(self.name.encode()) + 7) & ~7

    def pack(self) -> bytes:
        name = self.name.encode()
        raw = struct.pack(">QIIBBHI", self.table_offset, self.table_size, self.flags, self.type,
                          self.granularity_bits, len(name), 0) + name
        return raw + bytes(self.packed_size - len(raw))


def table_size_for(disk_size: int, granularity_bits: int, cluster_size: int) -> int:
    """Entries of the bitmap table of a disk of ``disk_size`` bytes."""
    bits = -(-disk_size // (1 << granularity_bits))
    bytes_ = -(-bits // 8)
    return -(-bytes_ // cluster_size)


def parse_directory(buf: bytes, offset: int, nb: int, cluster_size: int, file_size: int,
                    disk_size: int) -> tuple[DirectoryEntry, ...]:
    """Parse and validate ``nb`` entries from ``buf`` (the directory read at ``offset``)."""
    entries: list[DirectoryEntry] = []
    names: set[str] = set()
    pos = 0
    for i in range(nb):
        at = offset + pos
        if pos + ENTRY_FIXED > len(buf):
            raise FormatError("bitmap directory", at, f"entry {i} runs past the directory size {len(buf)}")
        toff, tsize, flags, btype, gbits, nsize, extra = struct.unpack_from(">QIIBBHI", buf, pos)
        if extra:
            raise FormatError("bitmap directory", at + 20, f"entry {i} has {extra} bytes of extra data (unsupported)")
        if btype != TYPE_DIRTY_TRACKING:
            raise FormatError("bitmap directory", at + 16, f"entry {i} has type {btype}, not 1 (dirty tracking)")
        if flags & ~FLAGS_KNOWN:
            raise FormatError("bitmap directory", at + 12, f"entry {i} has reserved flag bits {flags & ~FLAGS_KNOWN:#x} set")
        if not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS:
            raise FormatError("bitmap directory", at + 17,
                              f"entry {i} granularity_bits {gbits} outside {MIN_GRANULARITY_BITS}..{MAX_GRANULARITY_BITS}")
        if not 1 <= nsize <= MAX_NAME:
            raise FormatError("bitmap directory", at + 18, f"entry {i} name size {nsize} outside 1..{MAX_NAME}")
        end = pos + ((ENTRY_FIXED + nsize + 7) & ~7)
        if pos + ENTRY_FIXED + nsize > len(buf):
            raise FormatError("bitmap directory", at, f"entry {i} name runs past the directory size {len(buf)}")
        try:
            name = bytes(buf[pos + ENTRY_FIXED:pos + ENTRY_FIXED + nsize]).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError("bitmap directory", at + ENTRY_FIXED, f"entry {i} name is not UTF-8") from None
        if name in names:
            raise FormatError("bitmap directory", at, f"bitmap name {name!r} appears twice")
        names.add(name)
        if toff % cluster_size:
            raise FormatError("bitmap directory", at, f"bitmap {name!r} table offset {toff:#x} is not cluster aligned")
        if tsize > MAX_TABLE_ENTRIES:
            raise FormatError("bitmap directory", at + 8, f"bitmap {name!r} table of {tsize} entries exceeds {MAX_TABLE_ENTRIES}")
        if tsize == 0:
            raise FormatError("bitmap directory", at + 8, f"bitmap {name!r} table_size is 0 (QEMU refuses an empty table)")
        # Bounds before sizes: a hostile size is refused for what it is, past the end of the file.
        if toff == 0:
            raise FormatError("bitmap directory", at, f"bitmap {name!r} table offset is 0x0 (the header cluster)")
        if toff + tsize * TABLE_ENTRY_SIZE > file_size:
            raise FormatError("bitmap directory", at, f"bitmap {name!r} table ({tsize} entries at {toff:#x}) "
                              f"runs past the end of the file ({file_size:#x})")
        expected = table_size_for(disk_size, gbits, cluster_size)
        if not flags & FLAG_IN_USE and tsize != expected:
            raise FormatError("bitmap directory", at + 8,
                              f"bitmap {name!r} table has {tsize} entries, the disk needs {expected}")
        if -(-disk_size // (1 << gbits)) > MAX_BITMAP_BYTES * 8:
            raise FormatError("bitmap directory", at + 17, f"bitmap {name!r} is larger than 512 MiB")
        entries.append(DirectoryEntry(name, toff, tsize, flags, gbits, btype))
        pos = end
    if pos != len(buf):
        raise FormatError("bitmap directory", offset + pos,
                          f"directory size {len(buf)} does not match its {nb} entries ({pos} bytes)")
    return tuple(entries)


def pack_directory(entries: tuple[DirectoryEntry, ...] | list[DirectoryEntry]) -> bytes:
    return b"".join(e.pack() for e in entries)


def validate_table(table: np.ndarray, name: str, offset: int, cluster_size: int, file_size: int) -> None:
    """Check the reserved bits and offsets of a bitmap table (big-endian u64 array)."""
    t = table.astype(np.uint64)
    bad = np.nonzero(t & np.uint64(TE_RESERVED_MASK))[0]
    if len(bad):
        i = int(bad[0])
        raise FormatError(f"bitmap table of {name!r}", offset + 8 * i,
                          f"entry {i} ({int(t[i]):#x}) has reserved bits set")
    offs = t & np.uint64(TE_OFFSET_MASK)
    bad = np.nonzero((offs != 0) & ((t & np.uint64(TE_ALL_ONES)) != 0))[0]
    if len(bad):
        i = int(bad[0])
        raise FormatError(f"bitmap table of {name!r}", offset + 8 * i,
                          f"entry {i} has a data offset and the all-ones bit")
    bad = np.nonzero((offs % np.uint64(cluster_size)) != 0)[0]
    if len(bad):
        i = int(bad[0])
        raise FormatError(f"bitmap table of {name!r}", offset + 8 * i,
                          f"entry {i} data offset {int(offs[i]):#x} is not cluster aligned")
    bad = np.nonzero(offs + np.uint64(cluster_size) > np.uint64(file_size))[0]
    bad = bad[offs[bad] != 0]
    if len(bad):
        i = int(bad[0])
        raise FormatError(f"bitmap table of {name!r}", offset + 8 * i,
                          f"entry {i} data cluster {int(offs[i]):#x} runs past the end of the file ({file_size:#x})")

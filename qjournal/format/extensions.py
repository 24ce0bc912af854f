"""Header extensions: ``{u32 type, u32 length, data padded to 8}`` after the header.

The list starts at ``header_length`` (byte 72 on v2) and ends with a type-0 entry.
Each known type appears at most once. Unknown types are kept byte for byte. The
backing file name follows the list, inside cluster 0, at ``backing_file_offset``.
"""
from __future__ import annotations

import struct

import attrs

from ..errors import FormatError

EXT_HEADER = struct.Struct(">II")   # type, length of the data that follows
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441
KNOWN = {
    EXT_BACKING_FORMAT: "backing format",
    EXT_FEATURE_TABLE: "feature name table",
    EXT_CRYPTO: "full disk encryption",
    EXT_BITMAPS: "bitmaps",
    EXT_DATA_FILE: "external data file name",
}
# The order QEMU writes them in; unknown ones go after the known ones.
QEMU_ORDER = (EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_CRYPTO, EXT_FEATURE_TABLE, EXT_BITMAPS)
# QEMU writes the feature name table only into header clusters larger than 4 KiB
# (qcow2_update_header), so that small clusters keep room for names.
FEATURE_TABLE_MIN_CLUSTER_SIZE = 8192
# The full disk encryption extension's data: u64 offset and u64 length of the LUKS
# header clusters.
CRYPTO_HEADER = struct.Struct(">QQ")


def crypto_header_span(data: bytes) -> tuple[int, int] | None:
    """(offset, length) of the LUKS header that a full disk encryption extension's
    ``data`` names; None when ``data`` is too short to name one.

    >>> crypto_header_span(bytes.fromhex("0000000000030000" "0000000000100000"))
    (196608, 1048576)
    """
    if len(data) < CRYPTO_HEADER.size:
        return None
    offset, length = CRYPTO_HEADER.unpack_from(data)
    return offset, length


def padded(n: int) -> int:
    return (n + 7) & ~7


@attrs.frozen
class Extension:
    """One header extension as found on disk (``offset`` is where its type field sits)."""

    type: int
    data: bytes
    offset: int = 0

    @property
    def name(self) -> str:
        return KNOWN.get(self.type, f"unknown extension {self.type:#010x}")

    @property
    def packed_size(self) -> int:
        return EXT_HEADER.size + padded(len(self.data))

    def pack(self) -> bytes:
        return EXT_HEADER.pack(self.type, len(self.data)) + self.data + bytes(padded(len(self.data)) - len(self.data))


def parse_extensions(cluster0: bytes, start: int, end: int) -> tuple[Extension, ...]:
    """Parse the extension list at ``start``; it may not run past ``end``."""
    exts: list[Extension] = []
    seen: set[int] = set()
    off = start
    while True:
        if off + EXT_HEADER.size > end:
            raise FormatError("header extension", off, f"extension list runs past {end:#x} without an end marker")
        etype, length = EXT_HEADER.unpack_from(cluster0, off)
        data = off + EXT_HEADER.size
        if etype == EXT_END:
            return tuple(exts)
        if data + length > end:
            raise FormatError("header extension", off,
                              f"{KNOWN.get(etype, hex(etype))} of {length} bytes runs past {end:#x}")
        if etype in seen:
            raise FormatError("header extension", off, f"{KNOWN.get(etype, hex(etype))} appears twice")
        seen.add(etype)
        exts.append(Extension(etype, bytes(cluster0[data:data + length]), off))
        off = data + padded(length)


def pack_extensions(exts: tuple[Extension, ...] | list[Extension]) -> bytes:
    """The extension list with its end marker."""
    return b"".join(e.pack() for e in exts) + EXT_HEADER.pack(EXT_END, 0)


@attrs.frozen
class FeatureName:
    type: int  # 0 incompatible, 1 compatible, 2 autoclear
    bit: int
    name: str


FEATURE_TYPES = {0: "incompatible", 1: "compatible", 2: "autoclear"}
QEMU_FEATURES = (
    FeatureName(0, 0, "dirty bit"),
    FeatureName(0, 1, "corrupt bit"),
    FeatureName(0, 2, "external data file"),
    FeatureName(0, 3, "compression type"),
    FeatureName(0, 4, "extended L2 entries"),
    FeatureName(1, 0, "lazy refcounts"),
    FeatureName(2, 0, "bitmaps"),
    FeatureName(2, 1, "raw external data"),
)


def pack_feature_table(features: tuple[FeatureName, ...] = QEMU_FEATURES) -> bytes:
    out = bytearray()
    for f in features:
        out += struct.pack(">BB46s", f.type, f.bit, f.name.encode())
    return bytes(out)


def parse_feature_table(data: bytes) -> tuple[FeatureName, ...]:
    out = []
    for i in range(len(data) // 48):
        t, bit, name = struct.unpack_from(">BB46s", data, i * 48)
        out.append(FeatureName(t, bit, name.rstrip(b"\0").decode("utf-8", "replace")))
    return tuple(out)

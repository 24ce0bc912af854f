"""The qcow2 header (cluster 0, byte 0) and its feature bits.

Byte layout (big-endian), after docs/interop/qcow2.txt:

=======  ====  ===========================  =====
offset   size  field                        since
=======  ====  ===========================  =====
0        4     magic ``QFI\\xfb``            v2
4        4     version (2 or 3)             v2
8        8     backing_file_offset          v2
16       4     backing_file_size            v2
20       4     cluster_bits                 v2
24       8     size (virtual, bytes)        v2
32       4     crypt_method                 v2
36       4     l1_size (entries)            v2
40       8     l1_table_offset              v2
48       8     refcount_table_offset        v2
56       4     refcount_table_clusters      v2
60       4     nb_snapshots                 v2
64       8     snapshots_offset             v2
72       8     incompatible_features        v3
80       8     compatible_features          v3
88       8     autoclear_features           v3
96       4     refcount_order               v3
100      4     header_length                v3
104      1     compression_type             v3, header_length > 104
105      ...   (padding, or fields of later QEMU versions, kept as they are)
=======  ====  ===========================  =====

A v2 header is 72 bytes and implies refcount_order 4. The declaration below is the
only place these offsets are written; parsing, packing and validation all use it, and
so does every other module that reads or patches a header field in place
(:func:`field_span`, :func:`read_field`, :func:`pack_field`).
"""
from __future__ import annotations

import struct
from typing import Any

import attrs

from ..errors import FormatError
from .snapshots import FIXED as SNAPSHOT_ENTRY_MIN, MAX_SNAPSHOTS
from .tables import L1_ENTRY_SIZE, size_to_l1

MAGIC = b"QFI\xfb"
V2_LENGTH = 72
V3_LENGTH = 104
QEMU_V3_LENGTH = 112  # what QEMU writes: 104 + compression_type + padding

# cluster_bits: 512 B .. 2 MiB, at least 16 KiB with extended L2 (32 subclusters of 512 B).
MIN_CLUSTER_BITS = 9
MIN_CLUSTER_BITS_EXTL2 = 14
MAX_CLUSTER_BITS = 21
MAX_REFCOUNT_ORDER = 6           # 64-bit refcounts
REFCOUNT_ORDER_V2 = 4            # a v2 header has no refcount_order: 16-bit refcounts
MAX_SIZE = (1 << 63) - 1         # QEMU reads the size field as a signed 64-bit number
MAX_BACKING_FILE_NAME = 1023     # bytes, QEMU's limit on backing_file_size
# crypt_method values.
CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2
# What ``qemu-img create -f qcow2`` writes when no option says otherwise.
DEFAULT_CLUSTER_BITS = 16        # 64 KiB clusters
DEFAULT_REFCOUNT_ORDER = REFCOUNT_ORDER_V2

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                  | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)
# Compatible feature bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0
# Autoclear feature bits.
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

MAX_L1_ENTRIES = (32 << 20) // L1_ENTRY_SIZE  # QEMU's QCOW_MAX_L1_SIZE is 32 MiB

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# (field, struct code, offset, first version). The one declaration of the layout.
FIELDS: tuple[tuple[str, str, int, int], ...] = (
    ("version", "I", 4, 2),
    ("backing_file_offset", "Q", 8, 2),
    ("backing_file_size", "I", 16, 2),
    ("cluster_bits", "I", 20, 2),
    ("size", "Q", 24, 2),
    ("crypt_method", "I", 32, 2),
    ("l1_size", "I", 36, 2),
    ("l1_table_offset", "Q", 40, 2),
    ("refcount_table_offset", "Q", 48, 2),
    ("refcount_table_clusters", "I", 56, 2),
    ("nb_snapshots", "I", 60, 2),
    ("snapshots_offset", "Q", 64, 2),
    ("incompatible_features", "Q", 72, 3),
    ("compatible_features", "Q", 80, 3),
    ("autoclear_features", "Q", 88, 3),
    ("refcount_order", "I", 96, 3),
    ("header_length", "I", 100, 3),
)
FIELD_OFFSET = {name: off for name, _, off, _ in FIELDS}
FIELD_SIZE = {name: struct.calcsize(code) for name, code, _, _ in FIELDS}
COMPRESSION_TYPE_OFFSET = 104
TAIL_OFFSET = COMPRESSION_TYPE_OFFSET + 1   # where the bytes a v3 header keeps uninterpreted start


def field_span(name: str) -> tuple[int, int]:
    """(offset, end) of the header field ``name`` in cluster 0.

    >>> field_span("autoclear_features")
    (88, 96)
    """
    off = FIELD_OFFSET[name]
    return off, off + FIELD_SIZE[name]


def read_field(buf: bytes | bytearray | memoryview, name: str) -> int:
    """The value of the header field ``name`` in ``buf`` (cluster 0 or a prefix of it),
    without parsing or validating the rest. The caller checks that ``buf`` is long enough
    and that the version has the field."""
    off, end = field_span(name)
    return int.from_bytes(buf[off:end], "big")


def pack_field(name: str, value: int) -> bytes:
    """The bytes of the header field ``name`` holding ``value``, to write at ``FIELD_OFFSET[name]``.

    >>> pack_field("header_length", 112).hex()
    '00000070'
    """
    return value.to_bytes(FIELD_SIZE[name], "big")


def _fail(rule: str, offset: int | None = 0) -> FormatError:
    return FormatError("qcow2 header", offset, rule)


def _within_file(file_size: int, what: str, start: int, length: int, offset_field: str, size_field: str) -> None:
    """Refuse a table that runs past the end of the file, blaming its offset field if it
    starts there and its size field otherwise."""
    if start + length > file_size:
        field = offset_field if start >= file_size else size_field
        raise _fail(f"{what} at {start:#x} runs past the end of the file ({file_size:#x})", FIELD_OFFSET[field])


@attrs.frozen
class Header:
    """A parsed, validated qcow2 header. ``pack()`` gives back the bytes."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = REFCOUNT_ORDER_V2
    header_length: int = V2_LENGTH
    compression_type: int = COMPRESSION_ZLIB

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE)

    @property
    def bitmaps_consistent(self) -> bool:
        return bool(self.autoclear_features & AUTOCLEAR_BITMAPS)

    @classmethod
    def parse(cls, buf: bytes, file_size: int | None = None) -> "Header":
        """Parse and validate the header at the start of ``buf``.

        ``file_size``, when given, bounds every offset and count read from it.
        """
        if len(buf) < V2_LENGTH:
            raise _fail(f"file is {len(buf)} bytes, shorter than the {V2_LENGTH}-byte header")
        if buf[:4] != MAGIC:
            raise _fail(f"bad magic {buf[:4].hex()}, expected {MAGIC.hex()} (not a qcow2 image)")
        version = read_field(buf, "version")
        if version not in (2, 3):
            raise _fail(f"version {version} is not 2 or 3", FIELD_OFFSET["version"])
        values: dict[str, Any] = {}
        for name, code, off, since in FIELDS:
            if since <= version:
                if off + struct.calcsize(code) > len(buf):
                    raise _fail(f"file ends at {len(buf):#x} inside the v3 header", off)
                values[name] = struct.unpack_from(">" + code, buf, off)[0]
        if version == 3:
            hl = values["header_length"]
            if hl < V3_LENGTH or hl % 8:
                raise _fail(f"header_length {hl} must be a multiple of 8 and at least {V3_LENGTH}",
                            FIELD_OFFSET["header_length"])
            # ``buf`` may be a prefix of the file: only ``file_size`` says where the file ends.
            if file_size is not None and hl > file_size:
                raise _fail(f"header_length {hl} runs past the end of the file ({file_size:#x})",
                            FIELD_OFFSET["header_length"])
            if hl > COMPRESSION_TYPE_OFFSET:
                if len(buf) <= COMPRESSION_TYPE_OFFSET:
                    raise _fail(f"file ends at {len(buf):#x} inside the v3 header", COMPRESSION_TYPE_OFFSET)
                values["compression_type"] = buf[COMPRESSION_TYPE_OFFSET]
        header = cls(**values)
        header.validate(file_size)
        return header

    def validate(self, file_size: int | None = None) -> None:
        """Check every rule that does not need the rest of the image."""
        cb = self.cluster_bits
        min_bits = MIN_CLUSTER_BITS_EXTL2 if self.extended_l2 else MIN_CLUSTER_BITS
        if not min_bits <= cb <= MAX_CLUSTER_BITS:
            raise _fail(f"cluster_bits {cb} outside {min_bits}..{MAX_CLUSTER_BITS}", FIELD_OFFSET["cluster_bits"])
        if not 0 <= self.refcount_order <= MAX_REFCOUNT_ORDER:
            raise _fail(f"refcount_order {self.refcount_order} outside 0..{MAX_REFCOUNT_ORDER}",
                        FIELD_OFFSET["refcount_order"])
        if self.version == 2 and self.refcount_order != REFCOUNT_ORDER_V2:
            raise _fail("a v2 image has 16-bit refcounts", FIELD_OFFSET["refcount_order"])
        if self.crypt_method not in (CRYPT_NONE, CRYPT_AES, CRYPT_LUKS):
            raise _fail(f"crypt_method {self.crypt_method} unknown", FIELD_OFFSET["crypt_method"])
        cs = self.cluster_size
        if self.header_length > cs:
            raise _fail(f"header_length {self.header_length} exceeds the cluster size {cs}",
                        FIELD_OFFSET["header_length"])
        if self.compression_type not in COMPRESSION_NAMES:
            raise _fail(f"compression_type {self.compression_type} unknown", COMPRESSION_TYPE_OFFSET)
        if (self.compression_type != COMPRESSION_ZLIB) != bool(self.incompatible_features & INCOMPAT_COMPRESSION):
            raise _fail("compression_type and the incompatible compression bit disagree",
                        FIELD_OFFSET["incompatible_features"])
        for name in ("l1_table_offset", "refcount_table_offset", "snapshots_offset"):
            if getattr(self, name) % cs:
                raise _fail(f"{name} {getattr(self, name):#x} is not aligned to the cluster size {cs:#x}",
                            FIELD_OFFSET[name])
        if self.refcount_table_offset == 0 or self.refcount_table_clusters == 0:
            raise _fail("the image has no refcount table", FIELD_OFFSET["refcount_table_offset"])
        if self.backing_file_offset:
            if self.backing_file_size > MAX_BACKING_FILE_NAME or \
                    self.backing_file_offset + self.backing_file_size > cs:
                raise _fail(f"backing file name must lie in cluster 0 and be at most {MAX_BACKING_FILE_NAME} bytes",
                            FIELD_OFFSET["backing_file_offset"])
        if self.size > MAX_SIZE:
            raise _fail("virtual size too large", FIELD_OFFSET["size"])
        if self.nb_snapshots > MAX_SNAPSHOTS:
            raise _fail(f"{self.nb_snapshots} snapshots exceed the limit of {MAX_SNAPSHOTS}",
                        FIELD_OFFSET["nb_snapshots"])
        needed_l1 = size_to_l1(self.size, cs, self.extended_l2)
        if self.l1_size < needed_l1:
            raise _fail(f"l1_size {self.l1_size} is too small for a disk of {self.size} bytes "
                        f"(needs {needed_l1})", FIELD_OFFSET["l1_size"])
        if self.l1_size > MAX_L1_ENTRIES:
            raise _fail(f"l1_size {self.l1_size} exceeds QEMU's limit of a 32 MiB L1 table "
                        f"({MAX_L1_ENTRIES} entries)",
                        FIELD_OFFSET["l1_size"])
        if file_size is not None:
            # Bound every table by the file before anyone reads it.
            _within_file(file_size, f"refcount table ({self.refcount_table_clusters} clusters)",
                         self.refcount_table_offset, self.refcount_table_clusters * cs,
                         "refcount_table_offset", "refcount_table_clusters")
            if self.l1_size:
                _within_file(file_size, f"L1 table ({self.l1_size} entries)", self.l1_table_offset,
                             self.l1_size * L1_ENTRY_SIZE, "l1_table_offset", "l1_size")
            if self.nb_snapshots:
                # Each snapshot entry takes at least SNAPSHOT_ENTRY_MIN bytes.
                _within_file(file_size, f"snapshot table ({self.nb_snapshots} entries of at least "
                             f"{SNAPSHOT_ENTRY_MIN} bytes)", self.snapshots_offset,
                             self.nb_snapshots * SNAPSHOT_ENTRY_MIN, "snapshots_offset", "nb_snapshots")

    @property
    def length(self) -> int:
        """Bytes the fixed header occupies (72 for v2, header_length for v3)."""
        return V2_LENGTH if self.version == 2 else self.header_length

    def pack(self) -> bytes:
        buf = bytearray(self.length)
        buf[:4] = MAGIC
        for name, code, off, since in FIELDS:
            if since <= self.version:
                struct.pack_into(">" + code, buf, off, getattr(self, name))
        if self.version == 3 and self.header_length > COMPRESSION_TYPE_OFFSET:
            buf[COMPRESSION_TYPE_OFFSET] = self.compression_type
        return bytes(buf)

    def replace(self, **changes: Any) -> "Header":
        return attrs.evolve(self, **changes)

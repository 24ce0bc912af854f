"""Refcount table and refcount blocks.

The refcount table (``refcount_table_clusters`` clusters at ``refcount_table_offset``)
is an array of u64 big-endian entries, each the offset of a refcount block or 0. A
refcount block is one cluster of ``cluster_size * 8 / refcount_bits`` entries. Widths
below 8 bits are packed least significant bit first (cluster ``i``'s count sits at bit
``i * refcount_bits``); 8 bits and above are big-endian integers.
Reserved bits of a table entry: 0..8.
"""
from __future__ import annotations

from .lazy import np

RT_ENTRY_SIZE = 8
RT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
RT_RESERVED_MASK = 0x1FF

_WIDE = {3: ">u1", 4: ">u2", 5: ">u4", 6: ">u8"}


def entries_per_block(cluster_size: int, refcount_order: int) -> int:
    """Refcounts one block holds.

    >>> entries_per_block(65536, 4), entries_per_block(512, 0)
    (32768, 4096)
    """
    return cluster_size * 8 >> refcount_order


def metadata_clusters(clusters: int, cluster_size: int, refcount_order: int,
                      generous: bool = False) -> tuple[int, int]:
    """Refcount blocks and table clusters that count ``clusters`` clusters and themselves
    (QEMU's ``qcow2_refcount_metadata_size`` fixed point; ``generous`` adds room for a
    table 1.5 times as large, as image creation does).

    >>> metadata_clusters(16386, 65536, 4)
    (1, 1)
    """
    per_table_cluster = cluster_size // RT_ENTRY_SIZE
    per_block = entries_per_block(cluster_size, refcount_order)
    table = blocks = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous:
            clusters += -(-table // 2)
            n = 0
            generous = False
        if n == last:
            return blocks, table


def max_refcount(refcount_order: int) -> int:
    """The largest refcount an entry of ``1 << refcount_order`` bits holds.

    >>> max_refcount(0), max_refcount(4)
    (1, 65535)
    """
    return (1 << (1 << refcount_order)) - 1


def unpack_block(buf: bytes | bytearray | memoryview, refcount_order: int) -> np.ndarray:
    """Every count of a refcount block, as uint64."""
    if refcount_order >= 3:
        return np.frombuffer(buf, dtype=_WIDE[refcount_order]).astype(np.uint64)
    width = 1 << refcount_order
    raw = np.frombuffer(buf, dtype=np.uint8)
    per_byte = 8 // width
    shifts = (np.arange(per_byte, dtype=np.uint8) * width)
    vals = (raw[:, None] >> shifts[None, :]) & ((1 << width) - 1)
    return vals.reshape(-1).astype(np.uint64)


COUNT_CEILING = (1 << 63) - 1  # int64's largest: every count above it is held as this


def unpack_counts(buf: bytes | bytearray | memoryview, refcount_order: int,
                  at: np.ndarray | None = None) -> np.ndarray:
    """Every count of a refcount block (or only entries ``at``) as int64, for arithmetic
    with reference counts.

    Counts are unsigned: a 64-bit count above 2^63 - 1 (QEMU's maximum is 2^64 - 1) is
    held as :data:`COUNT_CEILING`, never wrapped to a negative number. No image holds
    that many references, so every comparison with a reference count stays right; a
    repair that needs the exact count reads it with :func:`unpack_entries`.

    >>> unpack_counts(b'\\xff' * 8 + b'\\x00' * 7 + b'\\x02', 6).tolist()
    [9223372036854775807, 2]
    >>> unpack_counts(b'\\x8d', 0, np.array([7, 1, 0])).tolist()
    [1, 0, 1]
    """
    counts = unpack_block(buf, refcount_order) if at is None else _unpack_at(buf, refcount_order, at)
    return np.minimum(counts, np.uint64(COUNT_CEILING)).astype(np.int64)


def _unpack_at(buf: bytes | bytearray | memoryview, refcount_order: int, at: np.ndarray) -> np.ndarray:
    """Counts at entries ``at`` of a refcount block, as uint64 (only those are decoded)."""
    if refcount_order >= 3:
        return np.frombuffer(buf, dtype=_WIDE[refcount_order])[at].astype(np.uint64)
    bit = at.astype(np.int64) << refcount_order
    raw = np.frombuffer(buf, dtype=np.uint8)[bit >> 3]
    return ((raw >> (bit & 7).astype(np.uint8)) & ((1 << (1 << refcount_order)) - 1)).astype(np.uint64)


def byte_span(lo: int, hi: int, refcount_order: int) -> tuple[int, int]:
    """The whole bytes of a block that hold entries ``lo .. hi-1``: (first byte, end byte).

    >>> byte_span(3, 5, 0), byte_span(3, 5, 4)
    ((0, 1), (6, 10))
    """
    return (lo << refcount_order) // 8, -(-(hi << refcount_order) // 8)


def unpack_entries(buf: bytes | bytearray | memoryview, refcount_order: int, lo: int, hi: int) -> np.ndarray:
    """Counts ``lo .. hi-1`` of a refcount block, as uint64 (only their bytes are decoded)."""
    a, b = byte_span(lo, hi, refcount_order)
    first = (a * 8) >> refcount_order
    return unpack_block(memoryview(buf)[a:b], refcount_order)[lo - first:hi - first]


def pack_block(counts: np.ndarray, refcount_order: int) -> bytes:
    """The bytes of a refcount block holding ``counts``.

    Narrow widths pack least significant bits first; wide ones are big-endian:

    >>> pack_block(np.array([1, 0, 1, 1, 0, 0, 0, 1]), 0)
    b'\\x8d'
    >>> pack_block(np.array([1, 258]), 4)
    b'\\x00\\x01\\x01\\x02'
    >>> unpack_block(b'\\x8d', 0).tolist()
    [1, 0, 1, 1, 0, 0, 0, 1]
    """
    if refcount_order >= 3:
        return counts.astype(_WIDE[refcount_order]).tobytes()
    width = 1 << refcount_order
    per_byte = 8 // width
    vals = counts.astype(np.uint8).reshape(-1, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * width)
    return np.bitwise_or.reduce(vals << shifts[None, :], axis=1).astype(np.uint8).tobytes()


def entry_span(index: int, refcount_order: int) -> tuple[int, int]:
    """Byte range inside a block that holds entry ``index`` (whole bytes)."""
    bit = index << refcount_order
    width = 1 << refcount_order
    start = bit // 8
    return start, max(1, width // 8)

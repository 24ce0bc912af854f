"""L1 and L2 table entries (u64 big-endian; extended L2 adds a u64 bitmap per entry).

L1 entry: bits 9..55 offset of the L2 table, bit 63 COPIED (refcount is exactly 1);
reserved 0x7f000000000001ff.
Standard L2 entry: bit 62 compressed, bit 63 COPIED; bit 0 reads as zeros (v3);
bits 9..55 host cluster offset; reserved 0x3f000000000001fe.
Compressed L2 entry: with ``x = 62 - (cluster_bits - 8)``, bits 0..x-1 host offset
and bits x..61 the number of additional 512-byte sectors.
Extended L2 entry: the standard entry, then a u64 whose low 32 bits say "allocated"
and high 32 bits say "reads as zeros" for each of 32 subclusters.
"""
from __future__ import annotations

from .geometry import SECTOR

L1_ENTRY_SIZE = 8
L2_ENTRY_SIZE = 8
EXTL2_ENTRY_SIZE = 16   # the standard entry, then the subcluster bitmap
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_RESERVED_MASK = 0x3F000000000001FE
HOST_OFFSET_LIMIT = 1 << 56                      # host offsets are bits 9..55
COMPRESSED_DESCRIPTOR_MASK = OFLAG_COMPRESSED - 1  # bits 0..61 of a compressed entry: offset and sectors
SUBCLUSTERS = 32  # per cluster with extended L2: the bitmap's low half "allocated", high half "reads as zeros"


def l2_entries(cluster_size: int, extended_l2: bool) -> int:
    """Entries of one L2 table (an extended entry takes 16 bytes, a standard one 8).

    >>> l2_entries(65536, False), l2_entries(65536, True)
    (8192, 4096)
    """
    return cluster_size // (EXTL2_ENTRY_SIZE if extended_l2 else L2_ENTRY_SIZE)


def size_to_l1(size: int, cluster_size: int, extended_l2: bool) -> int:
    """L1 entries a disk of ``size`` bytes needs (QEMU's ``size_to_l1``).

    One L2 table of 64 KiB clusters maps 512 MiB (256 MiB with extended L2):

    >>> size_to_l1(1 << 30, 65536, False), size_to_l1(1 << 30, 65536, True), size_to_l1(1, 65536, False)
    (2, 4, 1)
    """
    return -(-size // (l2_entries(cluster_size, extended_l2) * cluster_size))


def compressed_geometry(cluster_bits: int) -> tuple[int, int, int]:
    """(offset mask, size shift, size mask) of a compressed L2 entry.

    >>> [hex(v) for v in compressed_geometry(16)]
    ['0x3fffffffffffff', '0x36', '0xff']
    """
    csize_shift = 62 - (cluster_bits - 8)
    csize_mask = (1 << (cluster_bits - 8)) - 1
    offset_mask = (1 << csize_shift) - 1
    return offset_mask, csize_shift, csize_mask


def compressed_span(entry: int, cluster_bits: int) -> tuple[int, int]:
    """Host (offset, length) of the compressed data an L2 entry describes.

    The length runs to the end of the entry's last 512-byte sector:

    >>> entry = OFLAG_COMPRESSED | (1 << 54) | 0x10100   # 64 KiB clusters: 2 sectors, from 0x10100
    >>> compressed_span(entry, 16)
    (65792, 768)
    """
    offset_mask, shift, mask = compressed_geometry(cluster_bits)
    off = entry & offset_mask
    nb_sectors = ((entry >> shift) & mask) + 1
    return off, nb_sectors * SECTOR - (off & (SECTOR - 1))

"""Damaging a qemu-made image on purpose: where each structure sits, and byte pokes.

Every damaged-image case in the suite starts from an image qemu-img and qemu-io made
and breaks one thing with these helpers, so that each case says what it breaks.
"""
from __future__ import annotations

import struct
from pathlib import Path

import qemu

CS = 4096


def fresh(d: Path, *opts: str, size: str = "16M") -> Path:
    """Data in four L2 tables' ranges: 0x11 at 0, 0x22 at 2M, 0x33 at 4M, 0x44 at 14M."""
    p = qemu.create(d / "img.qcow2", size, f"cluster_size={CS}", *opts)
    qemu.qemu_io(p, "write -P 0x11 0 64k", "write -P 0x22 2M 64k", "write -P 0x33 4M 16k",
                 "write -P 0x44 14M 8k")
    return p


def u64(p: Path, off: int) -> int:
    with open(p, "rb") as f:
        f.seek(off)
        return struct.unpack(">Q", f.read(8))[0]


def poke(p: Path, off: int, data: bytes) -> None:
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(data)


def poke64(p: Path, off: int, value: int) -> None:
    poke(p, off, struct.pack(">Q", value))


def l1_pos(p: Path, index: int) -> int:
    """Where L1 entry ``index`` sits in the file."""
    return u64(p, 40) + 8 * index


def geometry(p: Path) -> tuple[int, int]:
    """(cluster size, bytes per L2 entry) of the image."""
    cs = 1 << struct.unpack(">I", p.read_bytes()[20:24])[0]
    extended = u64(p, 72) & (1 << 4) if struct.unpack(">I", p.read_bytes()[4:8])[0] >= 3 else 0
    return cs, 16 if extended else 8


def l2_pos(p: Path, guest: int) -> int:
    """Where the L2 entry mapping guest offset ``guest`` sits in the file."""
    cs, width = geometry(p)
    per = cs // width
    l2 = u64(p, l1_pos(p, guest // (per * cs))) & 0x00FFFFFFFFFFFE00
    return l2 + width * (guest // cs % per)


def data_offset(p: Path, guest: int) -> int:
    return u64(p, l2_pos(p, guest)) & 0x00FFFFFFFFFFFE00


def reftable_pos(p: Path, index: int) -> int:
    return u64(p, 48) + 8 * index


def refcount_pos(p: Path, cluster: int) -> int:
    """Where the 16-bit refcount of ``cluster`` sits (first refcount block)."""
    return u64(p, reftable_pos(p, 0)) + 2 * cluster


def set_refcount(p: Path, cluster: int, value: int) -> None:
    poke(p, refcount_pos(p, cluster), struct.pack(">H", value))

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


def set_refcount_of(p: Path, cluster: int, value: int) -> None:
    """Set the refcount of ``cluster`` (first refcount block) at the image's own width."""
    order = struct.unpack(">I", p.read_bytes()[96:100])[0]
    bits = 1 << order
    block = u64(p, reftable_pos(p, 0))
    if bits >= 8:
        poke(p, block + cluster * bits // 8, value.to_bytes(bits // 8, "big"))
        return
    at = block + cluster * bits // 8
    shift = cluster * bits % 8
    old = p.read_bytes()[at]
    poke(p, at, bytes([old & ~(((1 << bits) - 1) << shift) | value << shift]))


def with_backing(d: Path) -> Path:
    """An overlay over a qcow2 backing file full of 0x5a, with data (0x11 at 0, 0x22 at
    2M), zeroed clusters (64k at 64k) and the rest read from the backing file."""
    base = qemu.create(d / "base.qcow2", "16M", f"cluster_size={CS}")
    qemu.qemu_io(base, "write -P 0x5a 0 16M")
    p = d / "img.qcow2"
    qemu.qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={CS}", "-b", "base.qcow2", "-F", "qcow2", str(p))
    qemu.qemu_io(p, "write -P 0x11 0 64k", "write -z 64k 64k", "write -P 0x22 2M 64k")
    return p


def snapshot_entries(p: Path) -> list[tuple[bytes, bytes, bytes]]:
    """The snapshot table as (fixed 40-byte part, extra data, id and name) per entry."""
    data = p.read_bytes()
    nb, pos = struct.unpack(">I", data[60:64])[0], u64(p, 64)
    out = []
    for _ in range(nb):
        pos = (pos + 7) & ~7
        fixed = data[pos:pos + 40]
        ids, names = struct.unpack(">HH", fixed[12:16])
        extra = struct.unpack(">I", fixed[36:40])[0]
        out.append((fixed, data[pos + 40:pos + 40 + extra], data[pos + 40 + extra:pos + 40 + extra + ids + names]))
        pos += 40 + extra + ids + names
    return out


def write_snapshot_table(p: Path, entries: list[tuple[bytes, bytes, bytes]]) -> None:
    """Write ``entries`` over the snapshot table in place, each extra_data_size set to its
    extra data's length (the table must still fit its clusters)."""
    parts = []
    for fixed, extra, names in entries:
        e = fixed[:36] + struct.pack(">I", len(extra)) + extra + names
        parts.append(e + bytes(-len(e) % 8))
    poke(p, u64(p, 64), b"".join(parts))

"""A corpus of damaged images, after what QEMU's iotests 060, 108 and 138 damage.

Oracle: qemu-img check and qemu-img convert. Every case starts from an image qemu-img
and qemu-io made (4 KiB clusters, 16 MiB disk, so that each L2 table covers 2 MiB and
a case can damage one of them and leave the rest alone), then pokes bytes. For each:

* ``qjournal check --output=json`` gives qemu-img's counters and exit code;
* ``qjournal check -r all`` leaves an image qemu-img finds clean, and every guest byte
  outside the damaged range reads as it did before (``qemu-img convert -O raw``);
* where qemu-img refuses to open the image, qjournal refuses too: one line, exit 1,
  the file untouched. Where the two differ on purpose, the case says why.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest

import qemu
import qjournal
from damage import (CS, data_offset, fresh, l1_pos, l2_pos, poke, poke64, reftable_pos, set_refcount,
                    set_refcount_of, snapshot_entries, u64, with_backing, write_snapshot_table)
from qjournal.cli import main
from qjournal.errors import UsageError

KEYS = ("corruptions", "leaks", "check-errors", "total-clusters", "allocated-clusters", "fragmented-clusters",
        "compressed-clusters", "image-end-offset")
MiB = 1 << 20
COPIED = 1 << 63
Damage = list[tuple[int, int]]  # guest (offset, length) ranges the damage makes unreadable or changes


# -- building: see damage.py ---------------------------------------------------------
# -- the cases ----------------------------------------------------------------------
# 060: overlapping and misplaced references.
def l2_table_unaligned(d: Path) -> tuple[Path, Damage]:
    """060: an L1 entry whose L2 table offset is not cluster aligned (0x2a00 into it)."""
    p = fresh(d)
    poke64(p, l1_pos(p, 0), u64(p, l1_pos(p, 0)) + 0x200 * 5)
    return p, [(0, 2 * MiB)]


def l2_table_past_eof(d: Path) -> tuple[Path, Damage]:
    """An L1 entry whose L2 table lies past the end of the file (QEMU reads zeros)."""
    p = fresh(d)
    poke64(p, l1_pos(p, 1), COPIED | 64 * MiB)
    return p, [(2 * MiB, 2 * MiB)]


def l2_table_is_l1_table(d: Path) -> tuple[Path, Damage]:
    """060: an L1 entry pointing at the L1 table itself (L2 table overlapping L1)."""
    p = fresh(d)
    poke64(p, l1_pos(p, 0), COPIED | u64(p, 40))
    return p, [(0, 2 * MiB)]


def l2_table_is_refcount_block(d: Path) -> tuple[Path, Damage]:
    """An L1 entry pointing at the refcount block (L2 table overlapping a refcount block)."""
    p = fresh(d)
    poke64(p, l1_pos(p, 2), COPIED | u64(p, reftable_pos(p, 0)))
    return p, [(4 * MiB, 2 * MiB)]


def l1_entry_reserved_bits(d: Path) -> tuple[Path, Damage]:
    """An L1 entry with reserved bits (56..62) set."""
    p = fresh(d)
    poke64(p, l1_pos(p, 1), u64(p, l1_pos(p, 1)) | (1 << 60))
    return p, []


def data_in_refcount_block(d: Path) -> tuple[Path, Damage]:
    """060: a data cluster mapped onto the refcount block (QEMU rebuilds the refcounts
    elsewhere; the guest keeps reading the old block's bytes)."""
    p = fresh(d)
    poke64(p, l2_pos(p, 0), COPIED | u64(p, reftable_pos(p, 0)))
    return p, []


def data_in_l1_table(d: Path) -> tuple[Path, Damage]:
    """A data cluster mapped onto the L1 table."""
    p = fresh(d)
    poke64(p, l2_pos(p, 4096), COPIED | u64(p, 40))
    return p, [(4096, 4096)]


def data_in_inactive_l2(d: Path) -> tuple[Path, Damage]:
    """060: after a snapshot, an active data cluster mapped onto the snapshot's L2 table."""
    p = fresh(d)
    old_l2 = u64(p, l1_pos(p, 0)) & 0x00FFFFFFFFFFFE00
    qemu.qemu_img("snapshot", "-c", "s1", str(p))
    qemu.qemu_io(p, "write -P 0x55 0 4k")
    poke64(p, l2_pos(p, 0), COPIED | old_l2)
    return p, [(0, 4096)]


def data_unaligned(d: Path) -> tuple[Path, Damage]:
    """060: an L2 entry whose data cluster offset is not cluster aligned."""
    p = fresh(d)
    poke64(p, l2_pos(p, 8192), u64(p, l2_pos(p, 8192)) + 0xa00)
    return p, [(8192, 4096)]


def zero_cluster_unaligned(d: Path) -> tuple[Path, Damage]:
    """060: a preallocated zero cluster whose offset is not cluster aligned."""
    p = fresh(d)
    poke64(p, l2_pos(p, 2 * MiB), u64(p, l2_pos(p, 2 * MiB)) + 0xa00 | 1)
    return p, [(2 * MiB, 4096)]


def data_past_eof(d: Path) -> tuple[Path, Damage]:
    """An L2 entry whose data cluster lies past the end of the file (QEMU reads zeros)."""
    p = fresh(d)
    poke64(p, l2_pos(p, 2 * MiB + 4096), COPIED | 32 * MiB)
    return p, [(2 * MiB + 4096, 4096)]


def data_referenced_twice(d: Path) -> tuple[Path, Damage]:
    """Two L2 entries mapping the same data cluster, both claiming COPIED."""
    p = fresh(d)
    poke64(p, l2_pos(p, 4096), COPIED | data_offset(p, 0))
    return p, []


def l2_entry_reserved_bits(d: Path) -> tuple[Path, Damage]:
    """A standard L2 entry with a reserved bit set."""
    p = fresh(d)
    poke64(p, l2_pos(p, 4 * MiB), u64(p, l2_pos(p, 4 * MiB)) | 2)
    return p, []


# Refcounts wrong, structure sound.
def refcount_data_zeroed(d: Path) -> tuple[Path, Damage]:
    """The refcount of a data cluster zeroed (QEMU wants a rebuild)."""
    p = fresh(d)
    set_refcount(p, data_offset(p, 2 * MiB) // CS, 0)
    return p, []


def refcount_l2_too_low(d: Path) -> tuple[Path, Damage]:
    """After a snapshot, a shared L2 table's refcount lowered from 2 to 1."""
    p = fresh(d)
    qemu.qemu_img("snapshot", "-c", "s1", str(p))
    set_refcount(p, (u64(p, l1_pos(p, 7)) & 0x00FFFFFFFFFFFE00) // CS, 1)
    return p, []


def refcount_l1_too_high(d: Path) -> tuple[Path, Damage]:
    """The refcount of the L1 table raised to 2: a leak, and no COPIED flag involved."""
    p = fresh(d)
    set_refcount(p, u64(p, 40) // CS, 2)
    return p, []


def copied_set_on_shared(d: Path) -> tuple[Path, Damage]:
    """After a snapshot, COPIED set on an L2 entry whose cluster the snapshot shares."""
    p = fresh(d)
    qemu.qemu_img("snapshot", "-c", "s1", str(p))
    poke64(p, l2_pos(p, 14 * MiB), u64(p, l2_pos(p, 14 * MiB)) | COPIED)
    return p, []


def compressed(d: Path) -> tuple[Path, Damage]:
    """Clean, with compressed clusters (counted as compressed and fragmented)."""
    p = fresh(d)
    qemu.qemu_io(p, "write -c -P 0x66 6M 16k", "write -c -P 0x67 8M 4k")
    return p, []


def compressed_copied(d: Path) -> tuple[Path, Damage]:
    """A compressed cluster with the COPIED flag set (never allowed)."""
    p = fresh(d)
    qemu.qemu_io(p, "write -c -P 0x66 6M 4k")
    poke64(p, l2_pos(p, 6 * MiB), u64(p, l2_pos(p, 6 * MiB)) | COPIED)
    return p, []


def snapshot_shared(d: Path) -> tuple[Path, Damage]:
    """Clean: clusters shared by two snapshots and the active layer."""
    p = fresh(d)
    qemu.qemu_img("snapshot", "-c", "s1", str(p))
    qemu.qemu_io(p, "write -P 0x77 0 4k")
    qemu.qemu_img("snapshot", "-c", "s2", str(p))
    qemu.qemu_io(p, "write -P 0x78 2M 4k")
    return p, []


# 108: refcount structures that must be rebuilt.
def refblock_entry_unaligned(d: Path) -> tuple[Path, Damage]:
    """060: a refcount table entry that is not cluster aligned (every refcount unreadable)."""
    p = fresh(d)
    poke64(p, reftable_pos(p, 0), u64(p, reftable_pos(p, 0)) + 0xa00)
    return p, []


def refblock_entry_reserved(d: Path) -> tuple[Path, Damage]:
    """A refcount table entry with reserved bits set."""
    p = fresh(d)
    poke64(p, reftable_pos(p, 0), u64(p, reftable_pos(p, 0)) | 0x100)
    return p, []


def refblock_entry_zeroed(d: Path) -> tuple[Path, Damage]:
    """060: the refcount table entry of the only refcount block zeroed (all refcounts 0)."""
    p = fresh(d)
    poke64(p, reftable_pos(p, 0), 0)
    return p, []


def refblock_zeroed(d: Path) -> tuple[Path, Damage]:
    """060: the refcount block itself zeroed."""
    p = fresh(d)
    poke(p, u64(p, reftable_pos(p, 0)), bytes(CS))
    return p, []


def refblock_is_l1_table(d: Path) -> tuple[Path, Damage]:
    """A refcount table entry pointing at the L1 table (refcount block overlapping L1)."""
    p = fresh(d)
    poke64(p, reftable_pos(p, 0), u64(p, 40))
    return p, []


def refblock_past_eof(d: Path) -> tuple[Path, Damage]:
    """108: an (empty) second refcount block past the end of the file, itself counted."""
    p = fresh(d)
    poke64(p, reftable_pos(p, 1), 64 * MiB)
    return p, []


def refblock_overflow(d: Path) -> tuple[Path, Damage]:
    """108: a refcount block offset near 2^63 (signed overflow after it)."""
    p = fresh(d)
    poke64(p, reftable_pos(p, 1), 0x7FFFFFFFFFFF0000 & ~(CS - 1))
    return p, []


def refblock_shared_twice(d: Path) -> tuple[Path, Damage]:
    """Two refcount table entries pointing at the same block."""
    p = fresh(d)
    poke64(p, reftable_pos(p, 1), u64(p, reftable_pos(p, 0)))
    return p, []


def lazy_dirty_v3_refbits1(d: Path) -> tuple[Path, Damage]:
    """refcount_bits=1, lazy refcounts, a crashed writer: the dirty bit and no counts."""
    p = qemu.create(d / "img.qcow2", "16M", f"cluster_size={CS}", "refcount_bits=1", "lazy_refcounts=on")
    qemu.qemu_io(p, "write -P 0x11 0 64k", "write -P 0x22 2M 64k")
    qemu.run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 4M 64k", "-c", "abort", str(p), check=False)
    return p, []


def huge_data_offset(d: Path) -> tuple[Path, Damage]:
    """138: 512-byte clusters, a 512-byte disk, its data cluster moved to 32 PB (QEMU 7.2
    counts the reference as past the end of the file instead of growing its table)."""
    p = qemu.create(d / "img.qcow2", "512", "cluster_size=512")
    qemu.qemu_io(p, "write -P 0x11 0 512")
    poke64(p, l2_pos(p, 0), COPIED | 1 << 55)
    return p, [(0, 512)]


def extended_l2_damage(d: Path) -> tuple[Path, Damage]:
    """Extended L2 entries (64 KiB clusters): one data cluster past the end of the file,
    one unaligned, and the refcount of a third zeroed."""
    p = qemu.create(d / "img.qcow2", "16M", "cluster_size=64k", "extended_l2=on")
    qemu.qemu_io(p, "write -P 0x11 0 256k", "write -P 0x22 8M 64k")
    poke64(p, l2_pos(p, 0), COPIED | 64 * MiB)
    poke64(p, l2_pos(p, 65536), u64(p, l2_pos(p, 65536)) + 0x200)
    cluster = data_offset(p, 8 * MiB) // 65536
    poke(p, u64(p, reftable_pos(p, 0)) + 2 * cluster, bytes(2))
    return p, [(0, 128 * 1024)]


def v2_damage(d: Path) -> tuple[Path, Damage]:
    """compat=0.10 (no zero clusters): a data cluster unaligned, another in the L1 table."""
    p = fresh(d, "compat=0.10")
    poke64(p, l2_pos(p, 8192), u64(p, l2_pos(p, 8192)) + 0xa00)
    poke64(p, l2_pos(p, 2 * MiB), COPIED | u64(p, 40))
    return p, [(8192, 4096), (2 * MiB, 4096)]


def bitmaps_and_rebuild(d: Path) -> tuple[Path, Damage]:
    """A persistent bitmap with dirty bits, and the refcount block entry unaligned."""
    p = fresh(d)
    qemu.qemu_img("bitmap", "--add", str(p), "b0")
    qemu.qemu_io(p, "write -P 0x99 6M 64k")
    poke64(p, reftable_pos(p, 0), u64(p, reftable_pos(p, 0)) + 0xa00)
    return p, []


def refcount_at_maximum(bits: int) -> Callable[[Path], tuple[Path, Damage]]:
    """A data cluster's refcount at the maximum of its width: a leak, and its COPIED
    flag wrong (qemu-img: "Leaked cluster 5 refcount=65535 reference=1" and the
    OFLAG_COPIED error). A 64-bit count of 2^64 - 1 must be read unsigned."""
    def build(d: Path) -> tuple[Path, Damage]:
        p = fresh(d, f"refcount_bits={bits}")
        set_refcount_of(p, data_offset(p, 0) // CS, (1 << bits) - 1)
        return p, []
    build.__name__ = f"refcount_at_maximum_{bits}"
    return build


# Extended L2 subcluster bitmaps (64 KiB clusters, 2 KiB subclusters).
def _extended(d: Path, *writes: str) -> Path:
    p = qemu.create(d / "img.qcow2", "16M", "cluster_size=64k", "extended_l2=on")
    qemu.qemu_io(p, "write -P 0x11 0 256k", *writes)
    return p


def subcluster_allocated_and_zero(d: Path) -> tuple[Path, Damage]:
    """A subcluster both allocated and zero (QEMU fails every read of that cluster)."""
    p = _extended(d, "write -P 0x22 8M 6k")
    pos = l2_pos(p, 8 * MiB) + 8
    poke64(p, pos, u64(p, pos) | (0b10 << 32))
    return p, [(8 * MiB, 64 * 1024)]


def compressed_with_bitmap(d: Path) -> tuple[Path, Damage]:
    """Bits set in a compressed entry's subcluster bitmap (QEMU neither counts nor reads it)."""
    p = _extended(d, "write -c -P 0x22 8M 64k")
    poke64(p, l2_pos(p, 8 * MiB) + 8, 0b11)
    return p, [(8 * MiB, 64 * 1024)]


def unallocated_with_bitmap(d: Path) -> tuple[Path, Damage]:
    """Allocation bits in the bitmap of an unallocated (zeroed) cluster."""
    p = _extended(d, "write -z 8M 64k")
    pos = l2_pos(p, 8 * MiB) + 8
    poke64(p, pos, u64(p, pos) | 0b101)
    return p, [(8 * MiB, 64 * 1024)]


def l2_table_unaligned_backing(d: Path) -> tuple[Path, Damage]:
    """060's unaligned L2 table in an overlay. QEMU fails every read of its 2 MiB, and its
    repair leaves it so. qjournal drops the L1 entry: the overlay's own clusters there
    (data at 0, zeros at 64k: the damage) are lost either way, and every cluster that
    read from the backing file before the damage reads from it again, where a table of
    zero clusters would have hidden the backing data."""
    p = with_backing(d)
    poke64(p, l1_pos(p, 0), u64(p, l1_pos(p, 0)) + 0x200 * 5)
    return p, [(0, 128 * 1024)]


def snapshot_incomplete(size: int) -> Callable[[Path], tuple[Path, Damage]]:
    """A version 3 snapshot entry with ``size`` (< 16) bytes of extra data: no disk_size.
    qemu-img: "snapshot table entry 0 is incomplete"; -r all writes the table anew."""
    def build(d: Path) -> tuple[Path, Damage]:
        p = _snapshots(d)
        entries = snapshot_entries(p)
        fixed, extra, names = entries[0]
        write_snapshot_table(p, [(fixed, extra[:size], names), *entries[1:]])
        return p, []
    build.__name__ = f"snapshot_incomplete_{size}"
    return build


def _snapshots(d: Path) -> Path:
    p = fresh(d)
    qemu.qemu_img("snapshot", "-c", "s1", str(p))
    qemu.qemu_io(p, "write -P 0x55 0 4k")
    qemu.qemu_img("snapshot", "-c", "s2", str(p))
    return p


CASES: dict[str, Callable[[Path], tuple[Path, Damage]]] = {f.__name__: f for f in (
    l2_table_unaligned, l2_table_past_eof, l2_table_is_l1_table, l2_table_is_refcount_block,
    l1_entry_reserved_bits, data_in_refcount_block, data_in_l1_table, data_in_inactive_l2, data_unaligned,
    zero_cluster_unaligned, data_past_eof, data_referenced_twice, l2_entry_reserved_bits, refcount_data_zeroed,
    refcount_l2_too_low, refcount_l1_too_high, copied_set_on_shared, compressed, compressed_copied,
    snapshot_shared, refblock_entry_unaligned, refblock_entry_reserved, refblock_entry_zeroed, refblock_zeroed,
    refblock_is_l1_table, refblock_past_eof, refblock_overflow, refblock_shared_twice, lazy_dirty_v3_refbits1,
    huge_data_offset, extended_l2_damage, v2_damage, bitmaps_and_rebuild,
    *(refcount_at_maximum(bits) for bits in (2, 4, 8, 16, 32, 64)), subcluster_allocated_and_zero,
    compressed_with_bitmap, unallocated_with_bitmap, l2_table_unaligned_backing,
    *(snapshot_incomplete(size) for size in (0, 8, 12)))}


# -- running ------------------------------------------------------------------------
def ours(path: Path, *args: str) -> tuple[int, str, str]:
    """qjournal check in-process; any exception but a one-line refusal fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check", *args, str(path)])
    return code, out.getvalue(), err.getvalue()


def counters(d: dict) -> dict:
    return {k: d.get(k, 0) for k in KEYS}


def raw(path: Path, dest: Path) -> bytes | None:
    """The guest disk as qemu-img convert reads it (None when the read fails)."""
    res = qemu.qemu_img("convert", "-U", "-f", "qcow2", "-O", "raw", str(path), str(dest), check=False)
    return dest.read_bytes() if res.returncode == 0 else None


def masked(data: bytes, damage: Damage) -> bytes:
    buf = bytearray(data)
    for off, n in damage:
        buf[off:off + n] = bytes(n)
    return bytes(buf)


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_and_repair(case: str, tmp_path: Path) -> None:
    healthy = tmp_path / "healthy"
    healthy.mkdir()
    p, damage = CASES[case](tmp_path)
    # The reference: the disk after the damage if qemu-img can read all of it, else before.
    before = raw(p, tmp_path / "before.raw")
    assert before is not None or damage, "qemu-img cannot read the damaged disk, but the case names no damage"
    if before is None:
        before = _undamaged_reference(case, healthy)
    mine = tmp_path / "ours.qcow2"
    shutil.copy(p, mine)
    res = qemu.qemu_img("check", "--output=json", str(p), check=False)
    code, out, err = ours(mine, "--output=json")
    assert mine.read_bytes() == p.read_bytes(), "a check without -r changed the image"
    if not res.stdout.strip():
        # qemu-img refuses the image: so do we, in one line, and leave it alone.
        assert res.returncode == 1 and code == 1 and out == "" and len(err.strip().splitlines()) == 1, (res, err)
        return
    assert counters(json.loads(out)) == counters(json.loads(res.stdout)), (out, res.stdout, res.stderr)
    assert code == res.returncode

    code, out, err = ours(mine, "-r", "all")
    assert code == 0, out + err
    qemu.assert_clean(mine)
    after = raw(mine, tmp_path / "after.raw")
    assert after is not None
    assert masked(after, damage) == masked(before, damage)
    # Every byte qemu-img's own repair keeps readable is kept (outside the damage).
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(p, theirs)
    qemu.qemu_img("check", "-r", "all", str(theirs), check=False)
    kept = raw(theirs, tmp_path / "theirs.raw")
    if kept is not None:
        assert masked(after, damage) == masked(kept, damage)
    assert qemu.info(mine)["dirty-flag"] is False
    # A second check finds nothing left to do.
    code, out, err = ours(mine, "--output=json")
    assert code == 0 and not json.loads(out).get("corruptions") and not json.loads(out).get("leaks")


def _undamaged_reference(case: str, d: Path) -> bytes:
    """The disk of the same case's image before its damage (builders are deterministic)."""
    from unittest import mock
    with mock.patch(f"{__name__}.poke", lambda *a: None), mock.patch("damage.poke", lambda *a: None):
        p, _ = CASES[case](d)
    data = raw(p, d / "reference.raw")
    assert data is not None
    return data


@pytest.mark.parametrize("field,value,what", [
    (40, 0x3200, "L1 table offset unaligned"),
    (48, 0x1200, "refcount table offset unaligned"),
])
def test_refused_as_qemu_img_refuses(field: int, value: int, what: str, tmp_path: Path) -> None:
    """Header damage qemu-img will not open the image with: qjournal refuses in one line."""
    p = fresh(tmp_path)
    poke64(p, field, value)
    snapshot = p.read_bytes()
    res = qemu.qemu_img("check", "--output=json", str(p), check=False)
    assert res.returncode == 1 and not res.stdout.strip(), what
    for args in ((), ("-r", "all")):
        code, out, err = ours(p, *args)
        assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (what, err)
        assert p.read_bytes() == snapshot


@pytest.mark.parametrize("what", ["no refcount table", "L1 table past the end of the file"])
def test_refused_where_qemu_img_goes_on(what: str, tmp_path: Path) -> None:
    """Where the two differ on purpose: header fields qemu-img opens the image with and
    qjournal's header validation (qjournal/format/header.py) refuses, so that no table is
    trusted before it is bounded by the file. 108's first case zeroes refcount_table_offset
    and _clusters: qemu-img check -r all builds a refcount table from nothing. An L1 table
    past the end of the file: qemu-img reads zeros there. qjournal refuses in one line and
    leaves the file as it is, with or without -r."""
    p = fresh(tmp_path)
    if what == "no refcount table":
        poke64(p, 48, 0)
        poke(p, 56, bytes(4))
    else:
        poke64(p, 40, 1 << 40)
    snapshot = p.read_bytes()
    assert qemu.qemu_img("check", "--output=json", str(p), check=False).stdout.strip()
    for args in ((), ("-r", "all")):
        code, out, err = ours(p, *args)
        assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert p.read_bytes() == snapshot


@pytest.mark.parametrize("bits", [1, 2, 8, 32, 64])
def test_every_refcount_width(bits: int, tmp_path: Path) -> None:
    """Clean images of every refcount width (with a snapshot where a count of 2 fits)."""
    p = fresh(tmp_path, f"refcount_bits={bits}")
    if bits > 1:
        qemu.qemu_img("snapshot", "-c", "s1", str(p))
    res = qemu.qemu_img("check", "--output=json", str(p), check=False)
    code, out, err = ours(p, "--output=json")
    assert counters(json.loads(out)) == counters(json.loads(res.stdout)) and code == res.returncode == 0, err


# -- images qemu-img will not open ------------------------------------------------
def data_file_raw_alone(d: Path) -> Path:
    """The data-file-raw autoclear bit without an external data file."""
    p = fresh(d)
    poke64(p, 88, u64(p, 88) | 2)
    return p


def backing_file_missing(d: Path) -> Path:
    """An overlay whose backing file was moved away."""
    p = with_backing(d)
    (d / "base.qcow2").rename(d / "moved.qcow2")
    return p


def snapshot_extra_too_large(d: Path) -> Path:
    """A snapshot entry with 1025 bytes of extra data (QEMU's limit is 1024)."""
    p = _snapshots(d)
    entries = snapshot_entries(p)
    fixed, extra, names = entries[0]
    write_snapshot_table(p, [(fixed, extra + bytes(1025 - len(extra)), names), *entries[1:]])
    return p


def snapshots_too_many(d: Path) -> Path:
    """nb_snapshots one over QEMU's limit of 65536."""
    p = _snapshots(d)
    poke(p, 60, (65537).to_bytes(4, "big"))
    return p


def snapshot_table_too_large(d: Path) -> Path:
    """A snapshot table past QEMU's 64 MiB: 1025 entries with 65535-byte names (sparse)."""
    p = _snapshots(d)
    fixed, extra, _ = snapshot_entries(p)[0]
    fixed = fixed[:12] + struct.pack(">HH", 0, 0xFFFF) + fixed[16:]
    with open(p, "r+b") as f:
        f.truncate(u64(p, 64) + 1025 * 65616 + CS)
    write_snapshot_table(p, [(fixed, extra, bytes(0xFFFF))] * 1025)
    poke(p, 60, (1025).to_bytes(4, "big"))
    return p


REFUSED = {f.__name__: f for f in (data_file_raw_alone, backing_file_missing, snapshot_extra_too_large,
                                   snapshots_too_many, snapshot_table_too_large)}
# qemu-img check -r all rewrites these, dropping snapshot data (the extra data past 1024
# bytes; the snapshots past 65536, after which it still finds 65536 garbage entries and
# exits 1). qjournal refuses them with or without -r, on purpose: it validates the
# snapshot table before it trusts anything in it, and does not rewrite it.
QEMU_REPAIRS = {"snapshot_extra_too_large", "snapshots_too_many", "snapshot_table_too_large"}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_as_qemu_img_refuses_to_open(case: str, tmp_path: Path) -> None:
    """qemu-img check cannot open these images (exit 1, no report): qjournal check refuses
    them too, in one line, exit 1, and leaves the file byte for byte as it was."""
    p = REFUSED[case](tmp_path)
    snapshot = p.read_bytes()
    res = qemu.qemu_img("check", "--output=json", str(p), check=False)
    assert res.returncode == 1 and not res.stdout.strip(), res
    for args in (("--output=json",), ("-r", "all")):
        code, out, err = ours(p, *args)
        assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert p.read_bytes() == snapshot
    if case == "snapshots_too_many":
        return   # qemu-img's repair walks 65536 garbage entries for seconds (see QEMU_REPAIRS)
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(p, theirs)
    qemu.qemu_img("check", "-r", "all", str(theirs), check=False)
    assert (theirs.read_bytes() != snapshot) == (case in QEMU_REPAIRS)


@pytest.mark.parametrize("bits", [1, 2])
def test_refcount_overflow(bits: int, tmp_path: Path) -> None:
    """More references to a cluster than its refcount width holds (one data cluster mapped
    by 2**bits L2 entries): qemu-img reports one "overflow cluster" error per reference
    past the maximum, and its -r all cannot fix them (only the width can: qemu-img amend).
    qjournal reports the same counts, and after -r all leaves what qemu-img's repair
    leaves: the same counters and exit code, the same guest bytes."""
    p = fresh(tmp_path, f"refcount_bits={bits}")
    for k in range(1, 1 << bits):
        poke64(p, l2_pos(p, 4096 * k), COPIED | data_offset(p, 0))
    mine, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    shutil.copy(p, mine)
    shutil.copy(p, theirs)
    res = qemu.qemu_img("check", "--output=json", str(p), check=False)
    assert "overflow cluster" in res.stderr
    code, out, err = ours(mine, "--output=json")
    assert counters(json.loads(out)) == counters(json.loads(res.stdout)) and code == res.returncode == 2
    ours(mine, "-r", "all")
    qemu.qemu_img("check", "-r", "all", str(theirs), check=False)
    after = qemu.qemu_img("check", "--output=json", str(mine), check=False)
    expected = qemu.qemu_img("check", "--output=json", str(theirs), check=False)
    assert counters(json.loads(after.stdout)) == counters(json.loads(expected.stdout))
    assert after.returncode == expected.returncode == 2
    assert raw(mine, tmp_path / "a.raw") == raw(theirs, tmp_path / "b.raw") is not None


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_write_at_refcount_maximum(bits: int, tmp_path: Path) -> None:
    """A guest write over a cluster whose refcount is at its maximum (1-bit: two
    references to one cluster, both COPIED): qjournal writes what qemu-io writes on a
    copy, and never raises a refcount past its width (the write refuses instead, as
    QEMU's update_refcount does). Oracle: qemu-io, qemu-img compare and check."""
    p = fresh(tmp_path, f"refcount_bits={bits}")
    if bits == 1:
        poke64(p, l2_pos(p, 4096), COPIED | data_offset(p, 0))
    else:
        set_refcount_of(p, data_offset(p, 0) // CS, (1 << bits) - 1)
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(p, theirs)
    qemu.qemu_io(theirs, "write -P 0x99 0 4k", "write -P 0x98 2M 4k")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        codes = [main(["write", str(p), "0", "-P", "0x99", "4k"]), main(["write", str(p), "2M", "-P", "0x98", "4k"])]
    assert codes == [0, 0], err.getvalue()
    assert qemu.qemu_img("compare", "-U", str(p), str(theirs), check=False).returncode == 0
    mine_res = qemu.qemu_img("check", "--output=json", str(p), check=False)
    their_res = qemu.qemu_img("check", "--output=json", str(theirs), check=False)
    assert counters(json.loads(mine_res.stdout)) == counters(json.loads(their_res.stdout))


@pytest.mark.parametrize("damage", ["unaligned", "past the end of the file"])
def test_inactive_snapshot_damage_refused(damage: str, tmp_path: Path) -> None:
    """Stricter than qemu-img on purpose: a snapshot whose L1 table is unaligned or lies
    past the end of the file. qemu-img check reports one corruption and the snapshot's
    clusters as leaks, and its -r all frees them, leaving the snapshot's entry pointing
    at nothing (still a corruption, exit 2): a snapshot that can never be restored.
    qjournal validates every snapshot entry when it opens an image and refuses it, in
    one line, exit 1, with or without -r, leaving the file as it is, so that the
    snapshot's data is not freed under it."""
    p = _snapshots(tmp_path)
    entries = snapshot_entries(p)
    fixed, extra, names = entries[0]
    l1 = struct.unpack(">Q", fixed[:8])[0] + 0x200 if damage == "unaligned" else 1 << 30
    write_snapshot_table(p, [(struct.pack(">Q", l1) + fixed[8:], extra, names), *entries[1:]])
    snapshot = p.read_bytes()
    res = qemu.qemu_img("check", "--output=json", str(p), check=False)
    assert res.returncode == 2 and json.loads(res.stdout)["corruptions"] == 1
    for args in (("--output=json",), ("-r", "all")):
        code, out, err = ours(p, *args)
        assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and "snapshot" in err, err
        assert p.read_bytes() == snapshot


@pytest.mark.parametrize("bits", [1, 16, 64])
def test_refcount_never_raised_past_maximum(bits: int, tmp_path: Path) -> None:
    """A transaction that would raise a refcount at its width's maximum by one is refused
    before anything is written, as QEMU's update_refcount refuses (-ERANGE): one error
    naming the cluster and the width, the file byte for byte as it was."""
    p = fresh(tmp_path, f"refcount_bits={bits}")
    cluster = data_offset(p, 0) // CS
    set_refcount_of(p, cluster, (1 << bits) - 1)
    snapshot = p.read_bytes()
    with qjournal.open(p, "r+") as img:
        with pytest.raises(UsageError, match=re.escape(f"cluster {cluster:#x} would exceed {(1 << bits) - 1} (refcount_bits={bits})")):
            with img.transaction() as tx:
                tx.alloc.reserve([cluster])
                tx.alloc.deltas[cluster] = 1
    assert p.read_bytes() == snapshot

"""Guest writes through qjournal, read back by qemu-io and compared by qemu-img.

Oracle: `qemu-io -c "read -P ..."` for what was written, `qemu-img compare` against a raw
reference file kept in step by the test, `qemu-img check` after every operation, and
qemu-nbd -B for the bitmap bits the writes set.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import qemu
import qjournal
from qjournal.cli import main

KiB, MiB = 1 << 10, 1 << 20


def _compare(img: Path, ref: Path) -> None:
    res = qemu.qemu_img("compare", "-f", "qcow2", "-F", "raw", str(img), str(ref), check=False)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=512", "cluster_size=4096,refcount_bits=1",
                                  "cluster_size=2097152,refcount_bits=64", "compat=0.10",
                                  "cluster_size=4096,lazy_refcounts=on,refcount_bits=8"])
def test_random_writes_match_a_raw_reference(tmp_path: Path, opts: str) -> None:
    size = 24 * MiB
    img = qemu.create(tmp_path / "w.qcow2", str(size), *opts.split(","))
    ref = tmp_path / "ref.raw"
    ref.write_bytes(bytes(size))
    rng = random.Random(opts)
    shadow = bytearray(size)
    with qjournal.open(img, "r+") as q:
        for i in range(12):
            off = rng.randrange(size - 1)
            n = min(size - off, rng.choice([1, 511, 4 * KiB, 70 * KiB, 3 * MiB]))
            data = bytes([(i * 37 + 11) & 0xFF]) * n
            q.write(off, data)
            shadow[off:off + n] = data
            assert q.read(off, n) == data
    ref.write_bytes(bytes(shadow))
    qemu.assert_clean(img)
    _compare(img, ref)


def test_overwrite_in_place_and_unaligned(tmp_path: Path) -> None:
    img = qemu.create(tmp_path / "w.qcow2", "8M", "cluster_size=4096")
    qemu.qemu_io(img, "write -P 0x11 0 1M")
    with qjournal.open(img, "r+") as q:
        q.write(4095, b"\x22" * 3)
        q.write(100 * KiB + 7, b"\x33" * 10000)
    qemu.qemu_io(img, "read -P 0x11 0 4095", "read -P 0x22 4095 3", "read -P 0x11 4098 98309",
                 f"read -P 0x33 {100 * KiB + 7} 10000")
    qemu.assert_clean(img)


def test_copy_on_write_from_a_backing_file(tmp_path: Path) -> None:
    base = qemu.create(tmp_path / "base.qcow2", "4M")
    qemu.qemu_io(base, "write -P 0x44 0 4M")
    top = tmp_path / "top.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    with qjournal.open(top, "r+") as q:
        q.write(70 * KiB, b"\x55" * 100)
    qemu.qemu_io(top, "read -P 0x44 0 70k", "read -P 0x55 70k 100", f"read -P 0x44 {70 * KiB + 100} 1M")
    qemu.assert_clean(top)


def test_snapshot_keeps_its_data(tmp_path: Path) -> None:
    img = qemu.create(tmp_path / "s.qcow2", "4M", "cluster_size=4096")
    qemu.qemu_io(img, "write -P 0x66 0 256k")
    qemu.qemu_img("snapshot", "-c", "before", str(img))
    with qjournal.open(img, "r+") as q:
        q.write(8 * KiB, b"\x77" * 8 * KiB)
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0x66 0 8k", "read -P 0x77 8k 8k", "read -P 0x66 16k 240k")
    snap = tmp_path / "snap.raw"
    qemu.qemu_img("convert", "-l", "snapshot.name=before", "-O", "raw", str(img), str(snap))
    assert snap.read_bytes()[:256 * KiB] == b"\x66" * 256 * KiB


def test_compressed_cluster_is_copied_out(tmp_path: Path) -> None:
    img = qemu.create(tmp_path / "c.qcow2", "4M")
    qemu.qemu_io(img, "write -c -P 0x12 0 64k")
    with qjournal.open(img, "r+") as q:
        q.write(10, b"\x34" * 10)
    qemu.qemu_io(img, "read -P 0x12 0 10", "read -P 0x34 10 10", "read -P 0x12 20 65516")
    qemu.assert_clean(img)


def test_enabled_bitmaps_record_every_write(tmp_path: Path) -> None:
    img = qemu.create(tmp_path / "b.qcow2", "64M")
    qemu.qemu_io(img, "write 1M 64k")  # before the bitmaps exist: allocated, not dirty
    qemu.qemu_img("bitmap", "--add", str(img), "on")
    qemu.qemu_img("bitmap", "--add", "-g", "4096", str(img), "fine")
    qemu.qemu_img("bitmap", "--add", "--disable", str(img), "off")
    with qjournal.open(img, "r+") as q:
        q.write(3 * MiB + 5, b"x" * 10)        # allocates
        q.write(1 * MiB + 100, b"y" * 5000)    # in place: bits first, then data
    assert qemu.nbd_dirty_extents(img, "on") == [(1 * MiB, 64 * KiB), (3 * MiB, 64 * KiB)]
    assert qemu.nbd_dirty_extents(img, "fine") == [(1 * MiB, 8 * KiB), (3 * MiB, 4 * KiB)]
    assert qemu.nbd_dirty_extents(img, "off") == []
    qemu.assert_clean(img)


def test_cli_write_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = qemu.create(tmp_path / "c.qcow2", "16M")
    assert main(["write", str(img), "1M", "-P", "0xab", "128k"]) == 0
    assert main(["write", str(img), "0", "-P", "0x1ff", "1"]) == 1
    qemu.qemu_io(img, "read -P 0xab 1M 128k")
    src = tmp_path / "in.bin"
    src.write_bytes(bytes(range(256)) * 16)
    assert main(["write", str(img), "5000", "--input", str(src)]) == 0
    assert main(["zero", str(img), "1M", "64k"]) == 0
    qemu.qemu_io(img, "read -P 0 1M 64k", "read -P 0xab 1088k 64k")
    with qjournal.open(img) as q:
        assert q.read(5000, 4096) == src.read_bytes()
    qemu.assert_clean(img)


class TestZeroes:
    def test_whole_clusters_become_zero_clusters(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "z.qcow2", "8M")
        qemu.qemu_io(img, "write -P 0x11 0 2M")
        qemu.qemu_img("bitmap", "--add", str(img), "b0")
        before = qemu.check(img)[1]["allocated-clusters"]
        with qjournal.open(img, "r+") as q:
            q.write_zeroes(100, 300 * KiB)      # a partial head, three whole clusters, a partial tail
        qemu.qemu_io(img, "read -P 0x11 0 100", "read -P 0 100 300k", f"read -P 0x11 {100 + 300 * KiB} 1M")
        out = qemu.assert_clean(img)              # the freed clusters are not leaked
        assert out["allocated-clusters"] == before - 3
        zeros = [e for e in json.loads(qemu.qemu_img("map", "--output=json", str(img)).stdout)
                 if e["zero"] and not e["data"] and e["start"] < 2 * MiB]
        assert zeros and zeros[0]["start"] == 64 * KiB and zeros[0]["length"] == 192 * KiB
        assert qemu.nbd_dirty_extents(img, "b0") == [(0, 320 * KiB)]

    def test_zero_clusters_hide_the_backing_file(self, tmp_path: Path) -> None:
        base = qemu.create(tmp_path / "base.qcow2", "4M")
        qemu.qemu_io(base, "write -P 0x44 0 4M")
        top = tmp_path / "top.qcow2"
        qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
        qemu.qemu_io(top, "write -P 0x55 0 64k")
        with qjournal.open(top, "r+") as q:
            q.discard(0, 256 * KiB)
        qemu.qemu_io(top, "read -P 0 0 256k", "read -P 0x44 256k 1M")
        qemu.assert_clean(top)

    def test_v2_writes_zero_data(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "v2.qcow2", "4M", "compat=0.10")
        qemu.qemu_io(img, "write -P 0x11 0 1M")
        assert main(["discard", str(img), "0", "128k"]) == 0
        qemu.qemu_io(img, "read -P 0 0 128k", "read -P 0x11 128k 896k")
        qemu.assert_clean(img)

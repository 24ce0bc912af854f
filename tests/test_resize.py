"""qjournal resize against qemu-img resize (QEMU 7.2) on identical copies.

Oracle: qemu-img resize on a copy (virtual size, L1 size and offset), qemu-io read -P
for the data, qemu-img check for the structure. The crash test runs through crashsim
(``crashsim.harness``: a crash after every write, in order, and right after every
barrier): old-or-new with recovery; without the journal, no corruption (qjournal check and
qemu-img check, leaks allowed) and the old or new state, or the bitmaps dropped.
"""
from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

import qemu
from crashsim import harness
from crashsim.workloads import IMG, Base, Workload, qemu_img_cmd, qemu_io_cmd
from qjournal.cli import main
from qjournal import Image
from qjournal.ops.resize import resize

KiB, MiB = 1 << 10, 1 << 20


def header_fields(path: Path) -> tuple[int, int, int]:
    """(size, l1_size, l1_table_offset) as the header holds them."""
    raw = path.read_bytes()[:48]
    return struct.unpack(">Q", raw[24:32])[0], *struct.unpack(">IQ", raw[36:48])


def both(tmp_path: Path, make: list[tuple[str, ...]], size: str, *opts: str) -> tuple[Path, Path]:
    """Two identical images: one for qjournal, one for qemu-img."""
    ours = qemu.create(tmp_path / "ours.qcow2", size, *opts)
    for cmd in make:
        qemu.run(*[str(ours) if a == "IMG" else a for a in cmd])
    theirs = tmp_path / "theirs.qcow2"
    shutil.copyfile(ours, theirs)
    return ours, theirs


class TestGrow:
    @pytest.mark.parametrize("opts,size,new", [
        (("cluster_size=65536",), "1M", "+1M"),                 # no L1 growth
        (("cluster_size=512",), "1M", "3M"),                     # L1 grows past one cluster
        (("cluster_size=4096",), "64M", "+1G"),                  # L1 grows from 256 B to two clusters
        (("cluster_size=4096", "compat=0.10"), "16M", "600M"),   # v2
    ])
    def test_like_qemu_img(self, tmp_path: Path, opts: tuple[str, ...], size: str, new: str) -> None:
        ours, theirs = both(tmp_path, [("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", "-c",
                                         "write -P 0x33 900k 100k", "IMG")], size, *opts)
        old = qemu.info(ours)["virtual-size"]
        assert main(["resize", str(ours), new]) == 0
        qemu.qemu_img("resize", str(theirs), new)
        assert qemu.info(ours)["virtual-size"] == qemu.info(theirs)["virtual-size"]
        assert header_fields(ours) == header_fields(theirs)
        qemu.assert_clean(ours)
        vsize = qemu.info(ours)["virtual-size"]
        qemu.qemu_io(ours, "read -P 0x5a 0 64k", "read -P 0x33 900k 100k", "read -P 0 1000k 24k")
        tail = min(vsize - old, 4 * MiB)
        qemu.qemu_io(ours, f"read -P 0 {vsize - tail} {tail}")

    def test_l1_grows_beyond_one_cluster(self, tmp_path: Path) -> None:
        ours, theirs = both(tmp_path, [("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 32k", "IMG")],
                            "1M", "cluster_size=512")
        before = header_fields(ours)
        with Image(ours, "r+") as img:
            img.resize(8 * MiB)                  # the library method
        after = header_fields(ours)
        assert after[1] * 8 > 512 and after[2] != before[2], (before, after)
        qemu.qemu_img("resize", str(theirs), "8M")
        assert after == header_fields(theirs)
        qemu.assert_clean(ours)
        qemu.qemu_io(ours, "read -P 0x11 0 32k", "read -P 0 32k 8160k")

    def test_write_after_grow(self, tmp_path: Path) -> None:
        img_path = qemu.create(tmp_path / "g.qcow2", "1M", "cluster_size=512")
        assert main(["resize", str(img_path), "+2M"]) == 0
        qemu.qemu_io(img_path, "write -P 0x77 2M 64k")
        qemu.assert_clean(img_path)
        qemu.qemu_io(img_path, "read -P 0x77 2M 64k")

    def test_with_bitmaps(self, tmp_path: Path) -> None:
        """QEMU 7.2 resizes persistent bitmaps: the grown area is clean, old bits stay."""
        ours, theirs = both(tmp_path, [("qemu-img", "bitmap", "--add", "-g", "4096", "IMG", "b0"),
                                       ("qemu-img", "bitmap", "--add", "--disable", "IMG", "b1"),
                                       ("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 64k 8k", "IMG")],
                            "1M", "cluster_size=512")
        assert main(["resize", str(ours), "20M"]) == 0
        qemu.qemu_img("resize", str(theirs), "20M")
        assert qemu.bitmaps(ours) == qemu.bitmaps(theirs)
        qemu.assert_clean(ours)
        assert qemu.nbd_dirty_extents(ours, "b0") == qemu.nbd_dirty_extents(theirs, "b0") == [(64 * KiB, 8 * KiB)]
        with Image(ours) as img:
            assert list(img.bitmaps["b1"].dirty_extents()) == []
            assert img.bitmaps["b0"].entry.table_size > 1
        # and it still records writes to the new area
        qemu.qemu_io(ours, "write 19M 4k")
        assert qemu.nbd_dirty_extents(ours, "b0") == [(64 * KiB, 8 * KiB), (19 * MiB, 4 * KiB)]

    def test_with_snapshot_v3(self, tmp_path: Path) -> None:
        ours, theirs = both(tmp_path, [("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", "IMG"),
                                       ("qemu-img", "snapshot", "-c", "s1", "IMG"),
                                       ("qemu-io", "-f", "qcow2", "-c", "write -P 0x66 0 4k", "IMG")],
                            "1M", "cluster_size=512")
        assert main(["resize", str(ours), "4M"]) == 0
        qemu.qemu_img("resize", str(theirs), "4M")
        assert header_fields(ours) == header_fields(theirs)
        qemu.assert_clean(ours)
        qemu.qemu_io(ours, "read -P 0x66 0 4k", "read -P 0x5a 4k 60k", "read -P 0 1M 3M")
        qemu.qemu_img("snapshot", "-a", "s1", str(ours))
        qemu.qemu_io(ours, "read -P 0x5a 0 64k")


class TestShrink:
    @pytest.mark.parametrize("opts,new", [(("cluster_size=512",), "300k"), (("cluster_size=65536",), "-700k"),
                                          (("cluster_size=4096",), "400384")])
    def test_like_qemu_img(self, tmp_path: Path, opts: tuple[str, ...], new: str) -> None:
        ours, theirs = both(tmp_path, [("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", "-c",
                                         "write -P 0x33 200k 600k", "-c", "write -c -P 0x44 960k 64k", "IMG")],
                            "1M", *opts)
        assert main(["resize", "--shrink", str(ours), new]) == 0
        qemu.qemu_img("resize", "--shrink", str(theirs), new)
        assert header_fields(ours) == header_fields(theirs)
        out = qemu.assert_clean(ours)
        size = qemu.info(ours)["virtual-size"]
        qemu.qemu_io(ours, "read -P 0x5a 0 64k", f"read -P 0x33 200k {size - 200 * KiB}")
        # the discarded clusters are free: as many allocated as qemu-img leaves
        assert out.get("allocated-clusters") == qemu.assert_clean(theirs).get("allocated-clusters")
        # growing again shows zeros, not the old data
        assert main(["resize", str(ours), "1M"]) == 0
        qemu.qemu_io(ours, f"read -P 0 {-(-size // 65536) * 65536} {1 * MiB - -(-size // 65536) * 65536}")

    def test_bitmap_bits_past_the_end_dropped(self, tmp_path: Path) -> None:
        ours, theirs = both(tmp_path, [("qemu-img", "bitmap", "--add", "-g", "512", "IMG", "b0"),
                                       ("qemu-io", "-f", "qcow2", "-c", "write 0 4k", "-c", "write 600k 4k", "IMG")],
                            "1M", "cluster_size=512")
        assert main(["resize", "--shrink", str(ours), "512k"]) == 0
        qemu.qemu_img("resize", "--shrink", str(theirs), "512k")
        assert qemu.nbd_dirty_extents(ours, "b0") == qemu.nbd_dirty_extents(theirs, "b0") == [(0, 4 * KiB)]
        assert main(["resize", str(ours), "1M"]) == 0
        qemu.assert_clean(ours)
        assert qemu.nbd_dirty_extents(ours, "b0") == [(0, 4 * KiB)]


class TestRefusals:
    @pytest.mark.parametrize("args,make,text", [
        (["IMG", "512k"], [], "--shrink"),
        (["IMG", "-2M"], [], "must be positive"),
        (["--shrink", "IMG", "0"], [], "must be positive"),
        (["IMG", "2000000"], [], "multiple of 512"),
        (["IMG", "4P"], [("qemu-img", "bitmap", "--remove", "IMG", "b0")], "Failed to grow the L1 table"),
        (["IMG", "1P"], [], "more than QEMU's limit"),   # QEMU resizes, then drops the bitmap at close
        (["IMG", "abc"], [], "not a size"),
        (["IMG", "--preallocation=sparse", "2M"], [], "Invalid preallocation mode"),
        (["--shrink", "IMG", "--preallocation=full", "512k"], [], "only be used for growing"),
        (["IMG", "2M"], [("qemu-io", "-f", "qcow2", "-c", "write 0 4k", "-c", "abort", "IMG")], "inconsistent"),
        (["--shrink", "IMG", "512k"], [("qemu-img", "snapshot", "-c", "s", "IMG")], "snapshots"),
    ])
    def test_refused_unchanged(self, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                               make: list[tuple[str, ...]], text: str) -> None:
        path = qemu.create(tmp_path / "r.qcow2", "1M")
        qemu.qemu_img("bitmap", "--add", str(path), "b0")
        for cmd in make:
            qemu.run(*[str(path) if a == "IMG" else a for a in cmd], check=False)
        before = path.read_bytes()
        assert main(["resize", *[str(path) if a == "IMG" else a for a in args]]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and text in err, err
        assert path.read_bytes() == before

    def test_v2_with_snapshot(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        path = qemu.create(tmp_path / "v2.qcow2", "1M", "compat=0.10")
        qemu.qemu_img("snapshot", "-c", "s", str(path))
        before = path.read_bytes()
        assert main(["resize", str(path), "2M"]) == 1
        assert "v2 image which has snapshots" in capsys.readouterr().err
        assert path.read_bytes() == before
        assert "v2 image which has snapshots" in qemu.qemu_img("resize", str(path), "2M", check=False).stderr


# -- crashes ------------------------------------------------------------------------------
def crash_base(bitmap: bool) -> Base:
    """1M, 512 B clusters, data at 0 and at 500k-800k (past a 300k shrink), and (``bitmap``) an
    enabled bitmap with 512 B granularity."""
    return Base(f"test-resize{'-bitmap' if bitmap else ''}", (
        qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", IMG, "1M"),
        *([qemu_img_cmd("bitmap", "--add", "-g", "512", IMG, "b0")] if bitmap else []),
        qemu_io_cmd("write -P 0x5a 0 64k", "write -P 0x33 500k 300k"),
    ))


@pytest.mark.parametrize("new,bitmap", [(8 * MiB, False), (8 * MiB, True), (300 * KiB, True)])
def test_crash_after_every_write(new: int, bitmap: bool) -> None:
    """A crash after each write of a resize (crashsim's states and judge): after recovery the
    old or the new size, data and bitmaps exactly; without the journal no corruption (qemu-img
    check) and the old or new state, or the bitmaps dropped."""
    w = harness.check(Workload(f"resize-{new}", f"resize 1M -> {new} (512 B clusters)",
                               lambda img: resize(img, new, shrink=True), base=crash_base(bitmap)))
    harness.assert_passes(w, qjournal=("old", "new"), plain=("old", "new"))

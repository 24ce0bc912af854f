"""Bitmap operations through the `qjournal bitmap` command, verified by real QEMU.

Oracle: qemu-img info/check for the directory and refcounts, qemu-nbd -B (read with
qemu-img map) for the bits themselves.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

import qemu
from qjournal.cli import main

MiB = 1 << 20


def qj(*args: str) -> int:
    return main([str(a) for a in args])


def dump(capsys: pytest.CaptureFixture[str], img: Path, name: str) -> list[tuple[int, int]]:
    capsys.readouterr()
    assert qj("bitmap", "--dump", "--output=json", img, name) == 0
    return [(e["start"], e["length"]) for e in json.loads(capsys.readouterr().out) if e["dirty"]]


@pytest.fixture
def img(tmp_path: Path) -> Path:
    return qemu.create(tmp_path / "disk.qcow2", "1G")


class TestAdd:
    def test_add_shows_in_qemu_info(self, img: Path) -> None:
        assert qj("bitmap", "--add", img, "b0") == 0
        assert qemu.bitmaps(img) == [{"flags": ["auto"], "name": "b0", "granularity": 65536}]
        qemu.assert_clean(img)

    def test_add_disabled_with_granularity(self, img: Path) -> None:
        assert qj("bitmap", "--add", "-g", "512", "--disable", img, "b0") == 0
        assert qemu.bitmaps(img) == [{"flags": [], "name": "b0", "granularity": 512}]
        qemu.assert_clean(img)

    def test_many_bitmaps_keep_order(self, img: Path) -> None:
        for i in range(20):
            assert qj("bitmap", "--add", "-g", str(512 << (i % 8)), img, f"bitmap-{i}") == 0
        assert [b["name"] for b in qemu.bitmaps(img)] == [f"bitmap-{i}" for i in range(20)]
        assert [b["granularity"] for b in qemu.bitmaps(img)] == [512 << (i % 8) for i in range(20)]
        qemu.assert_clean(img)

    def test_qemu_adds_after_us(self, img: Path) -> None:
        assert qj("bitmap", "--add", img, "ours") == 0
        qemu.qemu_img("bitmap", "--add", str(img), "theirs")
        assert [b["name"] for b in qemu.bitmaps(img)] == ["ours", "theirs"]
        qemu.assert_clean(img)

    def test_new_bitmap_tracks_qemu_writes(self, img: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert qj("bitmap", "--add", img, "b0") == 0
        qemu.qemu_io(img, "write -P 0x5a 1M 64k", "write 5M 1k")
        assert dump(capsys, img, "b0") == [(MiB, 64 << 10), (5 * MiB, 64 << 10)]
        assert qemu.nbd_dirty_extents(img, "b0") == [(MiB, 64 << 10), (5 * MiB, 64 << 10)]


class TestRefusals:
    def test_duplicate_name(self, img: Path, capsys: pytest.CaptureFixture[str]) -> None:
        qemu.qemu_img("bitmap", "--add", str(img), "b0")
        before = img.read_bytes()
        assert qj("bitmap", "--add", img, "b0") == 1
        assert "already exists" in capsys.readouterr().err
        assert img.read_bytes() == before

    @pytest.mark.parametrize("gran", ["256", "3000", "4G"])
    def test_bad_granularity(self, img: Path, gran: str, capsys: pytest.CaptureFixture[str]) -> None:
        before = img.read_bytes()
        assert qj("bitmap", "--add", "-g", gran, img, "b0") == 1
        assert "granularity" in capsys.readouterr().err
        assert img.read_bytes() == before

    def test_name_too_long(self, img: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert qj("bitmap", "--add", img, "x" * 1024) == 1
        assert "1 to 1023 bytes" in capsys.readouterr().err
        assert qj("bitmap", "--add", img, "x" * 1023) == 0
        assert qemu.bitmaps(img)[0]["name"] == "x" * 1023

    def test_v2_image(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        img = qemu.create(tmp_path / "v2.qcow2", "1G", "compat=0.10")
        before = img.read_bytes()
        assert qj("bitmap", "--add", img, "b0") == 1
        assert "v2" in capsys.readouterr().err
        assert img.read_bytes() == before

    def test_missing_bitmap(self, img: Path, capsys: pytest.CaptureFixture[str]) -> None:
        before = img.read_bytes()
        assert qj("bitmap", "--remove", img, "nope") == 1
        assert "not found" in capsys.readouterr().err
        assert img.read_bytes() == before

    def test_failed_action_rolls_back_the_whole_call(self, img: Path) -> None:
        """Actions of one call are one transaction: a refusal leaves the image as it was."""
        qemu.qemu_img("bitmap", "--add", str(img), "b0")
        before = img.read_bytes()
        assert qj("bitmap", "--add", "--clear", "--merge", "nope", img, "b1") == 1
        assert img.read_bytes() == before


class TestRemoveClear:
    def test_remove_frees_everything(self, img: Path) -> None:
        qemu.qemu_img("bitmap", "--add", str(img), "b0")
        qemu.qemu_img("bitmap", "--add", str(img), "b1")
        qemu.qemu_io(img, "write 0 4M")
        assert qj("bitmap", "--remove", img, "b0") == 0
        assert [b["name"] for b in qemu.bitmaps(img)] == ["b1"]
        qemu.assert_clean(img)
        assert qj("bitmap", "--remove", img, "b1") == 0
        assert qemu.bitmaps(img) == []
        qemu.assert_clean(img)
        qemu.qemu_img("bitmap", "--add", str(img), "again")
        qemu.assert_clean(img)

    def test_clear(self, img: Path, capsys: pytest.CaptureFixture[str]) -> None:
        qemu.qemu_img("bitmap", "--add", str(img), "b0")
        qemu.qemu_io(img, "write 0 4M", "write 100M 1M")
        assert qemu.nbd_dirty_extents(img, "b0") == [(0, 4 * MiB), (100 * MiB, MiB)]
        assert qj("bitmap", "--clear", img, "b0") == 0
        assert qemu.nbd_dirty_extents(img, "b0") == []
        assert dump(capsys, img, "b0") == []
        qemu.assert_clean(img)


class TestEnableDisable:
    def test_flags_follow(self, img: Path) -> None:
        qemu.qemu_img("bitmap", "--add", str(img), "b0")
        assert qj("bitmap", "--disable", img, "b0") == 0
        assert qemu.bitmaps(img)[0]["flags"] == []
        qemu.qemu_io(img, "write 0 1M")
        assert qemu.nbd_dirty_extents(img, "b0") == []
        assert qj("bitmap", "--enable", img, "b0") == 0
        assert qemu.bitmaps(img)[0]["flags"] == ["auto"]
        qemu.qemu_io(img, "write 2M 1M")
        assert qemu.nbd_dirty_extents(img, "b0") == [(2 * MiB, MiB)]
        qemu.assert_clean(img)


class TestMerge:
    def test_merge_same_image(self, img: Path, capsys: pytest.CaptureFixture[str]) -> None:
        qemu.qemu_img("bitmap", "--add", str(img), "a")
        qemu.qemu_io(img, "write 0 1M")
        qemu.qemu_img("bitmap", "--disable", str(img), "a")
        qemu.qemu_img("bitmap", "--add", "-g", "4096", str(img), "b")
        qemu.qemu_io(img, "write 10M 8k", "write 1M 4k")
        assert qj("bitmap", "--merge", "b", img, "a") == 0
        # a has 64 KiB granularity: b's 4 KiB at 1M dirties a's cluster at 1M.
        expected = [(0, MiB + (64 << 10)), (10 * MiB, 64 << 10)]
        assert qemu.nbd_dirty_extents(img, "a") == expected
        assert dump(capsys, img, "a") == expected
        qemu.assert_clean(img)

    def test_merge_from_other_file(self, tmp_path: Path, img: Path) -> None:
        other = qemu.create(tmp_path / "other.qcow2", "1G")
        qemu.qemu_img("bitmap", "--add", str(other), "src")
        qemu.qemu_io(other, "write 300M 3M")
        qemu.qemu_img("bitmap", "--add", str(img), "dst")
        assert qj("bitmap", "--merge", "src", "-b", other, img, "dst") == 0
        assert qemu.nbd_dirty_extents(img, "dst") == [(300 * MiB, 3 * MiB)]
        qemu.assert_clean(img)

    def test_add_and_merge_in_one_call(self, img: Path) -> None:
        qemu.qemu_img("bitmap", "--add", str(img), "src")
        qemu.qemu_io(img, "write 7M 64k")
        assert qj("bitmap", "--add", "--merge", "src", "--disable", img, "copy") == 0
        assert qemu.bitmaps(img)[1] == {"flags": [], "name": "copy", "granularity": 65536}
        assert qemu.nbd_dirty_extents(img, "copy") == [(7 * MiB, 64 << 10)]
        qemu.assert_clean(img)


class TestRepair:
    def test_repair_in_use_bitmap(self, img: Path, capsys: pytest.CaptureFixture[str]) -> None:
        qemu.qemu_img("bitmap", "--add", str(img), "b0")
        qemu.run("qemu-io", "-f", "qcow2", "-c", "write 0 64k", "-c", "abort", str(img), check=False)
        assert qemu.bitmaps(img)[0]["flags"] == ["in-use", "auto"]
        assert qj("bitmap", "--dump", img, "b0") == 1
        assert "in use" in capsys.readouterr().err
        assert qj("bitmap", "--repair", img, "b0") == 0
        assert qemu.bitmaps(img)[0]["flags"] == ["auto"]
        assert qemu.nbd_dirty_extents(img, "b0") == [(0, 1 << 30)]
        qemu.assert_clean(img)

    def test_check_repair_all_drops_damaged_directory(self, img: Path, capsys: pytest.CaptureFixture[str]) -> None:
        qemu.qemu_img("bitmap", "--add", str(img), "b0")
        qemu.qemu_io(img, "write 0 1M")
        info = qemu.info(img)
        assert info["format-specific"]["data"]["bitmaps"]
        raw = bytearray(img.read_bytes())
        # Find the directory through the bitmaps extension and set a reserved flag bit.
        ext = raw.find(bytes.fromhex("23852875"))
        doff = struct.unpack_from(">Q", raw, ext + 8 + 16)[0]
        raw[doff + 12:doff + 16] = (0x80).to_bytes(4, "big")
        img.write_bytes(bytes(raw))
        assert qemu.qemu_img("info", str(img), check=False).returncode != 0
        assert qj("info", img) == 1
        assert "reserved flag" in capsys.readouterr().err
        assert qj("check", "-r", "all", img) == 0
        out = capsys.readouterr().out
        assert "Dropped the damaged bitmaps extension" in out
        assert qemu.bitmaps(img) == []
        qemu.assert_clean(img)
        qemu.qemu_io(img, "read 0 1M")


def test_dump_matches_qemu_nbd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = qemu.create(tmp_path / "d.qcow2", "64M", "cluster_size=4096")
    qemu.qemu_img("bitmap", "--add", "-g", "512", str(img), "fine")
    qemu.qemu_io(img, *[f"write {off} {n}" for off, n in
                        [(0, 512), (4096, 1024), (1 << 20, 7 * 512), (33 << 20, 1 << 20), ((64 << 20) - 512, 512)]])
    assert dump(capsys, img, "fine") == qemu.nbd_dirty_extents(img, "fine")
    shutil.copy(img, tmp_path / "copy.qcow2")

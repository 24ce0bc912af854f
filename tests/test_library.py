"""`import qjournal`: the library a backup tool or forensics script uses, without traps.

Oracle: qemu-img (info, check, map) on what the library made or changed.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import qjournal
from qjournal.errors import FormatError, LockError, QcowError
from qemu import check, info, qemu_img


class TestCreate:
    def test_works_any_number_of_times_per_process(self, tmp_path: Path) -> None:
        for i in range(3):
            with qjournal.create(tmp_path / f"d{i}.qcow2", (i + 1) << 20, cluster_size=4096) as img:
                assert img.size == (i + 1) << 20
            assert info(tmp_path / f"d{i}.qcow2")["virtual-size"] == (i + 1) << 20


class TestOpen:
    def test_missing_file_is_file_not_found(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError) as e:
            qjournal.open(tmp_path / "nope.qcow2")
        assert isinstance(e.value, QcowError)
        assert e.value.path == str(tmp_path / "nope.qcow2")

    def test_closed_image_raises_value_error(self, tmp_path: Path) -> None:
        qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "a.qcow2"), "1M")
        img = qjournal.open(tmp_path / "a.qcow2", "r+")
        img.close()
        img.close()   # closing twice does nothing
        for call in (lambda: img.read(0, 1), lambda: img.write(0, b"x"), lambda: img.bitmaps,
                     lambda: img.check(), lambda: img.map(), lambda: img.info(), lambda: img.disk(),
                     lambda: img.transaction().__enter__()):
            with pytest.raises(ValueError, match="closed"):
                call()


class TestRecords:
    def test_size_check_and_map(self, tmp_path: Path) -> None:
        p = tmp_path / "a.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(p), "4M")
        with qjournal.open(p, "r+") as img:
            img.write(65536, b"\x01" * 65536)
            assert img.size == 4 << 20
            result = img.check()
            assert (result.corruptions, result.leaks) == (0, 0)
            ours = [(e.start, e.length, e.data) for e in img.map()]
        theirs = [(e["start"], e["length"], e["data"])
                  for e in json.loads(qemu_img("map", "--output=json", str(p)).stdout)]
        assert ours == theirs
        assert check(p)[0] == 0

    def test_reprs_say_what_they_are(self, tmp_path: Path) -> None:
        p = tmp_path / "a.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(p), "1M")
        with qjournal.open(p, "r+") as img:
            img.bitmaps.add("b0", granularity=65536)
            assert repr(img) == f"<qjournal.Image {str(p)!r} r+ size=1048576>"
            assert repr(img.bitmaps) == f"<qjournal Bitmaps of {str(p)!r}: ['b0']>"
            assert repr(img.bitmaps["b0"]) == "<Bitmap 'b0' granularity=65536 flags=0x2>"
            assert "virtual_size=1048576" in repr(img.info())
            assert "corruptions=0" in repr(img.check())
            with img.transaction("demo") as tx:
                assert "'demo'" in repr(tx)
        assert repr(img).endswith("closed size=1048576>")


class TestErrors:
    def test_format_errors_carry_their_fields(self, tmp_path: Path) -> None:
        p = tmp_path / "a.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(p), "1M")
        with open(p, "r+b") as f:       # an L1 table offset that is not cluster aligned
            f.seek(40)
            f.write((0x30001).to_bytes(8, "big"))
        with pytest.raises(FormatError) as e:
            qjournal.open(p)
        assert e.value.structure and e.value.offset is not None and e.value.rule
        assert str(e.value).startswith(e.value.structure)

    def test_lock_errors_carry_their_fields(self, tmp_path: Path) -> None:
        p = tmp_path / "a.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(p), "1M")
        with qjournal.open(p, "r+"):
            with pytest.raises(LockError) as e:
                qjournal.open(p, "r+")
        assert e.value.path == str(p) and e.value.structure == "image lock"
        assert e.value.offset in range(100, 300)

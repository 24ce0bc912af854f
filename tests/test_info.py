"""`qjournal info` against `qemu-img info` on every kind of image qemu-img 7.2 makes.

Oracle: `qemu-img info --output=json` (and its human output). Wherever the concept is
the same, the JSON must be equal, key for key, except `actual-size` (compared loosely)
and the keys qjournal adds (`qjournal-...`). Images are made by qemu-img and qemu-io
only; `filename`, `backing-filename` and `full-backing-filename` are checked from
several working directories and with absolute paths, since both print them as given.
"""
from __future__ import annotations

from contextlib import chdir

import contextlib
import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import attrs
import pytest

import qemu
import qjournal
from qjournal.cli import main


# -- helpers ------------------------------------------------------------------------
def qemu_img_in(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=check, cwd=cwd)


def qemu_io_in(cwd: Path, img: str, *commands: str) -> None:
    """qemu-io from ``cwd``: QEMU 7.2 resolves a relative data file name against the cwd."""
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    res = subprocess.run([*args, img], capture_output=True, text=True, cwd=cwd)
    assert res.returncode == 0 and "error" not in res.stdout.lower(), res.stdout + res.stderr


def qemu_abort(cwd: Path, img: str) -> None:
    """Write through QEMU and abort: leaves bitmaps in_use (and a lazy image dirty)."""
    res = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 64k", "-c", "abort", img],
                         capture_output=True, text=True, cwd=cwd)
    assert res.returncode != 0, "qemu-io abort should not exit cleanly"




def qj_out(cwd: Path, *args: str) -> str:
    """Run ``qjournal ARGS`` in-process from ``cwd``; return stdout (exit code must be 0)."""
    buf, err = io.StringIO(), io.StringIO()
    with chdir(cwd), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        code = main(list(args))
    assert code == 0, f"qjournal {' '.join(args)}: exit {code}: {err.getvalue()}"
    return buf.getvalue()


def ours_json(cwd: Path, name: str) -> dict[str, Any]:
    return json.loads(qj_out(cwd, "info", "--output=json", name))


def theirs_json(cwd: Path, name: str) -> dict[str, Any]:
    return json.loads(qemu_img_in(cwd, "info", "--output=json", "-U", name).stdout)


def comparable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "actual-size" and not k.startswith("qjournal-")}


def assert_same_json(cwd: Path, name: str) -> dict[str, Any]:
    """qjournal's JSON equals qemu-img's (but actual-size); returns qemu-img's."""
    theirs, ours = theirs_json(cwd, name), ours_json(cwd, name)
    assert comparable(ours) == comparable(theirs)
    assert isinstance(ours["actual-size"], int) and 0 < ours["actual-size"] <= theirs["actual-size"]
    return theirs


def human(lines: str) -> list[str]:
    """Human output without the line that depends on the moment (disk size)."""
    return [ln for ln in lines.splitlines() if not ln.startswith("disk size:")]


BASIC = ("image:", "file format:", "virtual size:", "cluster_size:", "backing file:", "backing file format:",
         "encrypted:", "cleanly shut down:")


def basic(lines: list[str]) -> list[str]:
    return [ln for ln in lines if ln.startswith(BASIC)]


def all_views(tmp_path: Path, img: Path) -> list[tuple[Path, str]]:
    """(cwd, name) pairs that name ``img``: beside it, from its parent, from elsewhere, absolute."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    return [
        (img.parent, img.name),
        (img.parent.parent, f"{img.parent.name}/{img.name}"),
        (elsewhere, os.path.relpath(img, elsewhere)),
        (elsewhere, str(img)),
    ]


# -- the option matrix ----------------------------------------------------------------
# Not the cartesian product: each option value appears at least once, with a few mixes.
MATRIX: list[tuple[str, str]] = [
    ("compat=0.10", "1G"),
    ("compat=0.10,cluster_size=512", "100M"),
    ("compat=0.10,cluster_size=2M,preallocation=metadata", "64M"),
    ("compat=1.1", "1000000"),  # rounded up to 512 bytes
    ("cluster_size=512", "1000M"),
    ("cluster_size=1024,refcount_bits=1", "64M"),
    ("cluster_size=4096,refcount_bits=2", "1T"),
    ("refcount_bits=4,lazy_refcounts=on", "1023M"),
    ("cluster_size=8k,refcount_bits=8", "10G"),
    ("refcount_bits=32", "1"),
    ("cluster_size=2M,refcount_bits=64", "4P"),
    ("lazy_refcounts=on", "64M"),
    ("lazy_refcounts=off,compression_type=zlib", "64M"),
    ("compression_type=zstd", "64M"),
    ("extended_l2=on,cluster_size=16k", "100M"),
    ("extended_l2=on,cluster_size=2M,compression_type=zstd", "1000G"),
    ("extended_l2=on,lazy_refcounts=on,refcount_bits=64,compression_type=zstd,cluster_size=32k", "5G"),
    ("preallocation=metadata,cluster_size=4k", "16M"),
    ("preallocation=falloc", "2M"),
    ("preallocation=full,refcount_bits=1", "1M"),
    ("data_file=data.raw", "64M"),
    ("data_file=data.raw,data_file_raw=on", "64M"),
    ("data_file=data.raw,data_file_raw=on,extended_l2=on,compression_type=zstd", "64M"),
    ("data_file=data.raw,data_file_raw=off,lazy_refcounts=on,refcount_bits=8", "64M"),
    ("backing_file=base.qcow2,backing_fmt=qcow2", "64M"),
    ("backing_file=base.qcow2,backing_fmt=qcow2,compat=0.10", "64M"),
    ("backing_file=base.raw,backing_fmt=raw,extended_l2=on", "32M"),
    ("backing_file=base.qcow2,backing_fmt=qcow2,data_file=data.raw,cluster_size=4k", "64M"),
]


@pytest.fixture(scope="module")
def matrix_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One image per matrix row, each in its own folder (with its backing file and data file)."""
    root = tmp_path_factory.mktemp("matrix")
    out: dict[str, Path] = {}
    for i, (opts, size) in enumerate(MATRIX):
        d = root / f"case{i}" / "img"
        d.mkdir(parents=True)
        if "base.qcow2" in opts:
            qemu_img_in(d, "create", "-q", "-f", "qcow2", "base.qcow2", size)
        if "base.raw" in opts:
            qemu_img_in(d, "create", "-q", "-f", "raw", "base.raw", size)
        qemu_img_in(d, "create", "-q", "-f", "qcow2", "-o", opts, "disk.qcow2", size)
        out[opts] = d / "disk.qcow2"
    return out


@pytest.mark.parametrize("opts,size", MATRIX, ids=[o for o, _ in MATRIX])
class TestOptionMatrix:
    def test_json_equals_qemu_img(self, opts: str, size: str, matrix_images: dict[str, Path]) -> None:
        img = matrix_images[opts]
        theirs = assert_same_json(img.parent, img.name)
        data = theirs["format-specific"]["data"]
        assert data["compat"] == ("0.10" if "compat=0.10" in opts else "1.1")
        if "data_file=" in opts:
            assert data["data-file"] == "data.raw"
        if "backing_file=" in opts:
            assert theirs["backing-filename"].startswith("base.")

    def test_paths_from_other_directories(self, opts: str, size: str, matrix_images: dict[str, Path]) -> None:
        img = matrix_images[opts]
        for cwd, name in all_views(img.parent.parent, img)[1:]:
            theirs = assert_same_json(cwd, name)
            assert theirs["filename"] == name

    def test_human_basic_lines(self, opts: str, size: str, matrix_images: dict[str, Path]) -> None:
        img = matrix_images[opts]
        for cwd, name in all_views(img.parent.parent, img)[::2]:
            theirs = human(qemu_img_in(cwd, "info", "-U", name).stdout)
            ours = human(qj_out(cwd, "info", name))
            assert basic(ours) == basic(theirs)

    def test_human_whole_output(self, opts: str, size: str, matrix_images: dict[str, Path]) -> None:
        img = matrix_images[opts]
        theirs = human(qemu_img_in(img.parent, "info", "-U", img.name).stdout)
        assert human(qj_out(img.parent, "info", img.name)) == theirs


# -- bitmaps in every state ---------------------------------------------------------
class TestBitmaps:
    @pytest.fixture
    def img(self, tmp_path: Path) -> Path:
        d = tmp_path / "img"
        d.mkdir()
        return qemu.create(d / "disk.qcow2", "1G")

    def test_auto_and_disabled(self, img: Path) -> None:
        qemu.qemu_img("bitmap", "--add", str(img), "auto")
        qemu.qemu_img("bitmap", "--add", "-g", "512", "--disable", str(img), "disabled")
        qemu.qemu_img("bitmap", "--add", "-g", "2M", str(img), "coarse")
        qemu.qemu_io(img, "write 0 1M")
        theirs = assert_same_json(img.parent, img.name)
        assert theirs["format-specific"]["data"]["bitmaps"] == [
            {"flags": ["auto"], "name": "auto", "granularity": 65536},
            {"flags": [], "name": "disabled", "granularity": 512},
            {"flags": ["auto"], "name": "coarse", "granularity": 2 << 20},
        ]

    def test_in_use(self, img: Path) -> None:
        qemu.qemu_img("bitmap", "--add", str(img), "auto")
        qemu.qemu_img("bitmap", "--add", "--disable", str(img), "disabled")
        qemu_abort(img.parent, img.name)
        theirs = assert_same_json(img.parent, img.name)
        assert [b["flags"] for b in theirs["format-specific"]["data"]["bitmaps"]] == [["in-use", "auto"],
                                                                                      ["in-use"]]
        assert theirs["dirty-flag"] is False

    def test_in_use_on_dirty_lazy_image(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "lazy.qcow2", "1G", "lazy_refcounts=on")
        qemu.qemu_img("bitmap", "--add", str(img), "b0")
        qemu_abort(tmp_path, img.name)
        theirs = assert_same_json(tmp_path, img.name)
        assert theirs["dirty-flag"] is True
        assert theirs["format-specific"]["data"]["bitmaps"][0]["flags"] == ["in-use", "auto"]

    def test_unicode_and_long_names(self, img: Path) -> None:
        qemu.qemu_img("bitmap", "--add", str(img), "sauvegarde-été")
        qemu.qemu_img("bitmap", "--add", str(img), "x" * 1023)
        assert_same_json(img.parent, img.name)

    def test_bitmaps_then_all_removed(self, img: Path) -> None:
        qemu.qemu_img("bitmap", "--add", str(img), "b0")
        qemu.qemu_img("bitmap", "--remove", str(img), "b0")
        theirs = assert_same_json(img.parent, img.name)
        assert "bitmaps" not in theirs["format-specific"]["data"]

    def test_human_bitmap_listing(self, img: Path) -> None:
        qemu.qemu_img("bitmap", "--add", str(img), "auto")
        qemu.qemu_img("bitmap", "--add", "-g", "512", "--disable", str(img), "disabled")
        theirs = human(qemu_img_in(img.parent, "info", "-U", img.name).stdout)
        assert human(qj_out(img.parent, "info", img.name)) == theirs


# -- dirty flag ---------------------------------------------------------------------
class TestDirty:
    def test_lazy_refcounts_abort_leaves_dirty_flag(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "lazy.qcow2", "64M", "lazy_refcounts=on")
        qemu_abort(tmp_path, img.name)
        theirs = assert_same_json(tmp_path, img.name)
        assert theirs["dirty-flag"] is True

    def test_human_cleanly_shut_down(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "lazy.qcow2", "64M", "lazy_refcounts=on")
        qemu_abort(tmp_path, img.name)
        theirs = human(qemu_img_in(tmp_path, "info", "-U", img.name).stdout)
        assert "cleanly shut down: no" in theirs
        assert basic(human(qj_out(tmp_path, "info", img.name))) == basic(theirs)


# -- internal snapshots -------------------------------------------------------------
class TestSnapshots:
    @pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10", "extended_l2=on,refcount_bits=4"])
    def test_snapshots(self, tmp_path: Path, opts: str) -> None:
        img = qemu.create(tmp_path / "s.qcow2", "64M", opts)
        qemu.qemu_io(img, "write -P 1 0 64k")
        qemu.qemu_img("snapshot", "-c", "first", str(img))
        qemu.qemu_io(img, "write -P 2 1M 64k")
        qemu.qemu_img("snapshot", "-c", "second snapshot é", str(img))
        qemu.qemu_img("snapshot", "-c", "third", str(img))
        qemu.qemu_img("snapshot", "-d", "second snapshot é", str(img))
        theirs = assert_same_json(tmp_path, img.name)
        assert [s["name"] for s in theirs["snapshots"]] == ["first", "third"]
        assert [s["id"] for s in theirs["snapshots"]] == ["1", "3"]

    def test_snapshots_with_bitmaps(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "s.qcow2", "64M")
        qemu.qemu_img("snapshot", "-c", "s1", str(img))
        qemu.qemu_img("bitmap", "--add", str(img), "b0")
        qemu.qemu_io(img, "write 0 64k")
        assert_same_json(tmp_path, img.name)

    def test_human_snapshot_table(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "s.qcow2", "64M")
        qemu.qemu_img("snapshot", "-c", "first", str(img))
        qemu.qemu_img("snapshot", "-c", "a-rather-long-snapshot-name", str(img))
        theirs = human(qemu_img_in(tmp_path, "info", "-U", img.name).stdout)
        assert human(qj_out(tmp_path, "info", img.name)) == theirs


# -- backing chains -----------------------------------------------------------------
class TestBackingChain:
    @pytest.fixture
    def chain(self, tmp_path: Path) -> tuple[Path, Path, Path]:
        """base (b/) <- mid (m/, relative backing name) <- top (t/, absolute backing name)."""
        for d in "bmt":
            (tmp_path / d).mkdir()
        base = qemu.create(tmp_path / "b" / "base.qcow2", "64M")
        qemu.qemu_io(base, "write -P 0xab 0 1M")
        qemu_img_in(tmp_path / "m", "create", "-q", "-f", "qcow2", "-b", "../b/base.qcow2", "-F", "qcow2",
                    "mid.qcow2")
        qemu.qemu_io(tmp_path / "m" / "mid.qcow2", "write -P 0xcd 1M 1M")
        mid = tmp_path / "m" / "mid.qcow2"
        qemu_img_in(tmp_path, "create", "-q", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", "t/top.qcow2")
        top = tmp_path / "t" / "top.qcow2"
        qemu.qemu_io(top, "read -P 0xab 0 1M", "read -P 0xcd 1M 1M")
        return base, mid, top

    def test_relative_backing_name(self, tmp_path: Path, chain: tuple[Path, Path, Path]) -> None:
        _, mid, _ = chain
        for cwd, name in all_views(tmp_path, mid):
            theirs = assert_same_json(cwd, name)
            assert theirs["backing-filename"] == "../b/base.qcow2"
            assert theirs["backing-filename-format"] == "qcow2"

    def test_absolute_backing_name(self, tmp_path: Path, chain: tuple[Path, Path, Path]) -> None:
        _, mid, top = chain
        for cwd, name in all_views(tmp_path, top):
            theirs = assert_same_json(cwd, name)
            assert theirs["backing-filename"] == str(mid)
            assert theirs["full-backing-filename"] == str(mid)

    def test_human_backing_lines(self, tmp_path: Path, chain: tuple[Path, Path, Path]) -> None:
        _, mid, top = chain
        for img in (mid, top):
            for cwd, name in all_views(tmp_path, img):
                theirs = human(qemu_img_in(cwd, "info", "-U", name).stdout)
                assert basic(human(qj_out(cwd, "info", name))) == basic(theirs), (cwd, name)

    def test_missing_backing_file(self, tmp_path: Path) -> None:
        qemu_img_in(tmp_path, "create", "-q", "-f", "qcow2", "-u", "-b", "gone/base.qcow2", "-F", "qcow2",
                    "orphan.qcow2", "1G")
        for cwd, name in all_views(tmp_path, tmp_path / "orphan.qcow2")[2:]:
            assert_same_json(cwd, name)

    def test_backing_name_with_spaces_and_bitmaps(self, tmp_path: Path) -> None:
        (tmp_path / "my base").mkdir()
        qemu.create(tmp_path / "my base" / "a b.qcow2", "64M")
        qemu_img_in(tmp_path, "create", "-q", "-f", "qcow2", "-b", "my base/a b.qcow2", "-F", "qcow2", "top.qcow2")
        qemu.qemu_img("bitmap", "--add", str(tmp_path / "top.qcow2"), "b0")
        for cwd, name in all_views(tmp_path, tmp_path / "top.qcow2")[2:]:
            assert_same_json(cwd, name)


# -- external data files ------------------------------------------------------------
class TestDataFile:
    @pytest.mark.parametrize("raw", ["on", "off"])
    def test_data_file_from_everywhere(self, tmp_path: Path, raw: str) -> None:
        d = tmp_path / "img"
        d.mkdir()
        qemu_img_in(d, "create", "-q", "-f", "qcow2", "-o", f"data_file=disk.data,data_file_raw={raw}",
                    "disk.qcow2", "64M")
        qemu_io_in(d, "disk.qcow2", "write -P 0x11 0 1M")
        for cwd, name in all_views(tmp_path, d / "disk.qcow2"):
            theirs = assert_same_json(cwd, name)
            assert theirs["format-specific"]["data"]["data-file"] == "disk.data"
            assert theirs["format-specific"]["data"]["data-file-raw"] is (raw == "on")

    def test_data_file_with_bitmap(self, tmp_path: Path) -> None:
        qemu_img_in(tmp_path, "create", "-q", "-f", "qcow2", "-o", "data_file=disk.data", "disk.qcow2", "64M")
        qemu_img_in(tmp_path, "bitmap", "--add", "disk.qcow2", "b0")
        assert_same_json(tmp_path, "disk.qcow2")


# -- encryption: AES and LUKS, reported as qemu-img reports them ----------------------
@pytest.mark.parametrize("fmt", ["aes", "luks"])
def test_encrypted(tmp_path: Path, fmt: str) -> None:
    qemu.create_encrypted(tmp_path / "e.qcow2", "64M", fmt, iter_time=100)
    assert_same_json(tmp_path, "e.qcow2")
    theirs = human(qemu_img_in(tmp_path, "info", "-U", "e.qcow2").stdout)
    assert human(qj_out(tmp_path, "info", "e.qcow2")) == theirs


# -- the library ----------------------------------------------------------------------
class TestLibrary:
    def test_info_is_an_attrs_value(self, tmp_path: Path) -> None:
        (tmp_path / "b").mkdir()
        qemu.create(tmp_path / "b" / "base.qcow2", "64M")
        qemu_img_in(tmp_path, "create", "-q", "-f", "qcow2", "-b", "b/base.qcow2", "-F", "qcow2",
                    "-o", "lazy_refcounts=on,refcount_bits=8,compression_type=zstd", "top.qcow2")
        img = tmp_path / "top.qcow2"
        qemu.qemu_img("bitmap", "--add", "-g", "4096", str(img), "b0")
        qemu.qemu_img("snapshot", "-c", "s1", str(img))
        theirs = qemu.info(img)
        data = theirs["format-specific"]["data"]
        with qjournal.open(img) as image:
            info = image.info()
        assert attrs.has(type(info)) and isinstance(info, qjournal.ImageInfo)
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            info.virtual_size = 0  # type: ignore[misc]
        assert info.filename == str(img)
        assert info.virtual_size == theirs["virtual-size"]
        assert info.cluster_size == theirs["cluster-size"]
        assert info.dirty_flag is theirs["dirty-flag"]
        assert info.backing_filename == theirs["backing-filename"] == "b/base.qcow2"
        assert info.full_backing_filename == theirs["full-backing-filename"]
        assert info.backing_format == theirs["backing-filename-format"]
        assert info.compat == data["compat"]
        assert info.lazy_refcounts is data["lazy-refcounts"] is True
        assert info.refcount_bits == data["refcount-bits"] == 8
        assert info.corrupt is data["corrupt"]
        assert info.extended_l2 is data["extended-l2"]
        assert info.compression_type == data["compression-type"] == "zstd"
        assert info.data_file is None and info.data_file_raw is None
        assert info.bitmaps is not None
        assert [(b.name, b.granularity, list(b.flags)) for b in info.bitmaps] == \
            [(b["name"], b["granularity"], b["flags"]) for b in data["bitmaps"]]
        assert all(attrs.has(type(b)) for b in info.bitmaps)
        assert [s.name for s in info.snapshots] == [s["name"] for s in theirs["snapshots"]]
        assert info.unknown_extensions == ()
        assert comparable(info.to_json()) == comparable(theirs)

    def test_data_file_fields(self, tmp_path: Path) -> None:
        qemu_img_in(tmp_path, "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw,data_file_raw=on",
                    "x.qcow2", "1M")
        with qjournal.open(tmp_path / "x.qcow2") as image:
            info = image.info()
        assert (info.data_file, info.data_file_raw) == ("d.raw", True)
        assert info.backing_filename is None and info.bitmaps is None and info.snapshots == ()

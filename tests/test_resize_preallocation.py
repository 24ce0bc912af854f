"""`qjournal resize --preallocation=metadata|falloc|full` against `qemu-img resize`, on twin copies.

Oracle: qemu-img map (which guest ranges are allocated, and in how many extents), qemu-img
check, qemu-img compare, and qemu-img's own refusals; crashsim's states and judge for
every crash point of a preallocating grow.

Where qjournal differs, on purpose: qemu-img's ``metadata`` leaves the data clusters as
holes of the file (``"zero": true`` in the map); qjournal's medium reserves every region
the file grows by (DESIGN.md: a grown region is reserved before it is used), so they are
reserved and read as zeros, as after ``falloc`` (``"zero": false``). Guest content,
allocation and refcounts are the same.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import qemu
from crashsim import harness
from crashsim.workloads import IMG, Base, Workload, qemu_img_cmd, qemu_io_cmd
from qjournal.cli import main
from qjournal.ops.resize import resize

KiB, MiB = 1 << 10, 1 << 20


def _twins(tmp_path: Path, size: str, *opts: str, io: tuple[str, ...] = ("write -P 1 0 64k",)) -> tuple[Path, Path]:
    img = qemu.create(tmp_path / "a.qcow2", size, *opts)
    if io:
        qemu.qemu_io(img, *io)
    return img, Path(shutil.copy(img, tmp_path / "b.qcow2"))


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("old,new,opts", [
    ("1M", "3M", ()),                                      # inside the one L2 table
    ("1000k", "5M", ("cluster_size=4096",)),               # an unaligned end, new L2 tables (2 MiB each)
    ("1M", "9M", ("compat=0.10", "cluster_size=4096")),    # v2, the L1 table grows
    ("1M", "9M", ("cluster_size=16k", "extended_l2=on")),
], ids=["same-l2", "unaligned-new-l2", "v2-l1-grows", "extended-l2"])
def test_preallocation_allocates_what_qemu_img_allocates(tmp_path: Path, mode: str, old: str, new: str,
                                                        opts: tuple[str, ...]) -> None:
    ours, theirs = _twins(tmp_path, old, *opts)
    assert main(["resize", "-q", f"--preallocation={mode}", str(ours), new]) == 0
    qemu.qemu_img("resize", "-q", f"--preallocation={mode}", str(theirs), new)
    assert qemu.map_layout(ours) == qemu.map_layout(theirs)
    out: dict[str, Any] = qemu.assert_clean(ours)
    assert out["allocated-clusters"] == qemu.assert_clean(theirs)["allocated-clusters"]
    assert qemu.qemu_img("compare", str(ours), str(theirs)).returncode == 0
    assert qemu.info(ours)["virtual-size"] == qemu.info(theirs)["virtual-size"]


def test_full_preallocation_writes_zeros_over_reused_clusters(tmp_path: Path) -> None:
    """Clusters freed by a discard inside the file hold old data: preallocated clusters
    placed there must read as zeros (every mode writes zeros there)."""
    for mode in ("metadata", "full"):
        ours, _ = _twins(tmp_path, "1M", "cluster_size=4096", io=("write -P 0x77 0 1M",))
        # qjournal's discard frees the clusters and leaves their bytes (qemu-io's punches holes).
        assert main(["discard", str(ours), "0", "512k"]) == 0
        assert main(["resize", "-q", f"--preallocation={mode}", str(ours), "1040k"]) == 0
        grown = [e for e in json.loads(qemu.qemu_img("map", "--output=json", str(ours)).stdout)
                 if e["start"] == MiB]
        assert grown[0]["offset"] < 512 * KiB, grown     # placed in a freed cluster inside the file
        qemu.assert_clean(ours)
        qemu.qemu_io(ours, "read -P 0 1M 16k", "read -P 0 0 512k", "read -P 0x77 512k 512k")


def test_over_a_backing_file_the_cut_cluster_keeps_its_backing_data(tmp_path: Path) -> None:
    base = qemu.create(tmp_path / "base.qcow2", "1000k")
    qemu.qemu_io(base, "write -P 0x42 0 1000k")
    top = qemu.create(tmp_path / "top.qcow2", "1000k", f"backing_file={base}", "backing_fmt=qcow2")
    assert main(["resize", "-q", "--preallocation=metadata", str(top), "2M"]) == 0
    qemu.assert_clean(top)
    qemu.qemu_io(top, "read -P 0x42 960k 40k", "read -P 0 1000k 24k", "read -P 0 1M 1M")


@pytest.mark.parametrize("args,text", [
    (["--preallocation=sparse", "IMG", "2M"], "Invalid preallocation mode"),
    (["--preallocation=metadata", "IMG", "1M"], "only be used for growing"),
    (["--preallocation=falloc", "--shrink", "IMG", "512k"], "only be used for growing"),
])
def test_refusals_match_qemu_img_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   args: list[str], text: str) -> None:
    ours, theirs = _twins(tmp_path, "1M")
    before = ours.read_bytes()
    assert main(["resize", *[str(ours) if a == "IMG" else a for a in args]]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and text in err, err
    assert ours.read_bytes() == before
    res = qemu.qemu_img("resize", *[str(theirs) if a == "IMG" else a for a in args], check=False)
    assert res.returncode == 1 and text.lower() in res.stderr.lower(), res.stderr


def test_shared_l2_table_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ours, _ = _twins(tmp_path, "1M")
    qemu.qemu_img("snapshot", "-c", "s", str(ours))
    before = ours.read_bytes()
    assert main(["resize", "--preallocation=metadata", str(ours), "2M"]) == 1
    assert "shared with a snapshot" in capsys.readouterr().err
    assert ours.read_bytes() == before


@pytest.mark.parametrize("mode,cluster_size", [("metadata", 512), ("full", 512), ("metadata", 4096)])
def test_crash_after_every_write(mode: str, cluster_size: int) -> None:
    """Every crash point of a preallocating grow: with 512 B clusters a new L1 table, new
    L2 tables, an L2 table that gains entries, data past the old end of the file; with
    4 KiB clusters only entries of the one L2 table change, so nothing but the grown file
    is written before the commit (its new length must be durable before it)."""
    base = Base(f"test-resize-prealloc-{cluster_size}", (
        qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", IMG, "100k"),
        qemu_io_cmd("write -P 0x5a 0 16k"),
    ))
    w = harness.check(Workload(f"resize-prealloc-{mode}", f"resize 100k -> 300k, preallocation={mode}",
                               lambda img: resize(img, 300 * KiB, preallocation=mode), base=base))
    harness.assert_passes(w, qjournal=("old", "new"), plain=("old", "new"))

"""Internal snapshots (`qjournal snapshot -c/-l/-d`) against qemu-img snapshot, both ways.

Oracle: qemu-img (check, snapshot -l, info --output=json, convert -l snapshot.name=,
compare) and qemu-io, on images qemu-img made. Crash states: crashsim's
snapshot-create and snapshot-delete workloads (tests/test_crashsim.py runs every
built-in workload).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import qemu
from crashsim import harness
from crashsim.workloads import WORKLOADS
import qjournal
from qjournal.cli import main
from qjournal.core.image import Image
from qjournal.storage.medium import MmapMedium

OPTIONS = [("cluster_size=4096",), ("compat=0.10",), ("extended_l2=on",), ("cluster_size=512",),
           ("lazy_refcounts=on", "cluster_size=65536"), ("refcount_bits=64",), ("compression_type=zstd",)]


def image(d: Path, *opts: str) -> Path:
    p = qemu.create(d / "a.qcow2", "8M", *opts)
    qemu.qemu_io(p, "write -P 0x11 0 1M", "write -c -P 0x22 2M 64k", "write -P 0x44 6M 512")
    return p


def snapshot_data(p: Path, name: str, out: Path) -> bytes:
    qemu.qemu_img("convert", "-U", "-l", f"snapshot.name={name}", "-O", "raw", str(p), str(out))
    return out.read_bytes()


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o))
def test_create_then_qemu_writes_and_reads_the_old_data(tmp_path: Path, opts: tuple[str, ...]) -> None:
    p = image(tmp_path, *opts)
    twin = shutil.copy(p, tmp_path / "twin.qcow2")
    assert main(["snapshot", "-c", "s1", str(p)]) == 0
    qemu.qemu_img("snapshot", "-c", "s1", str(twin))
    qemu.assert_clean(p)
    mine, theirs = qemu.info(p), qemu.info(twin)
    strip = [{k: v for k, v in s.items() if k not in ("date-sec", "date-nsec")} for s in mine["snapshots"]]
    assert strip == [{k: v for k, v in s.items() if k not in ("date-sec", "date-nsec")} for s in theirs["snapshots"]]
    qemu.qemu_io(p, "write -P 0x33 0 64k", "write -P 0x55 2M 4k")      # copy on write, by QEMU
    qemu.assert_clean(p)
    before = snapshot_data(twin, "s1", tmp_path / "twin.raw")
    assert snapshot_data(p, "s1", tmp_path / "s1.raw") == before
    qemu.qemu_io(p, "read -P 0x33 0 64k", "read -P 0x55 2M 4k", read_only=True)


def test_list_matches_qemu_img(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = image(tmp_path)
    qemu.qemu_img("snapshot", "-c", "by-qemu", str(p))
    assert main(["snapshot", "-c", "by-qjournal", str(p)]) == 0
    capsys.readouterr()
    assert main(["snapshot", "-l", str(p)]) == 0
    assert capsys.readouterr().out == qemu.qemu_img("snapshot", "-l", str(p)).stdout
    assert [s["name"] for s in qemu.info(p)["snapshots"]] == ["by-qemu", "by-qjournal"]
    assert [s["id"] for s in qemu.info(p)["snapshots"]] == ["1", "2"]


@pytest.mark.parametrize("opts", OPTIONS[:4], ids=lambda o: ",".join(o))
def test_delete_a_qemu_snapshot_like_qemu_img(tmp_path: Path, opts: tuple[str, ...]) -> None:
    p = image(tmp_path, *opts)
    qemu.qemu_img("snapshot", "-c", "s0", str(p))
    qemu.qemu_io(p, "write -P 0x66 0 128k")
    twin = shutil.copy(p, tmp_path / "twin.qcow2")
    assert main(["snapshot", "-d", "s0", str(p)]) == 0
    qemu.qemu_img("snapshot", "-d", "s0", str(twin))
    code, out = qemu.check(p)
    assert code == 0 and not out.get("corruptions") and not out.get("leaks"), out
    assert out["allocated-clusters"] == qemu.check(twin)[1]["allocated-clusters"]   # as much freed as QEMU frees
    assert "snapshots" not in qemu.info(p)
    qemu.qemu_img("compare", str(p), str(twin))


def test_qemu_deletes_a_qjournal_snapshot(tmp_path: Path) -> None:
    p = image(tmp_path)
    assert main(["snapshot", "-c", "s1", str(p)]) == 0
    qemu.qemu_io(p, "write -P 0x77 1M 64k")
    qemu.qemu_img("snapshot", "-d", "s1", str(p))
    qemu.assert_clean(p)


def test_bitmaps_stay_as_they_are(tmp_path: Path) -> None:
    p = image(tmp_path)
    qemu.qemu_img("bitmap", "--add", str(p), "b0")
    qemu.qemu_io(p, "write -P 0x12 4M 64k")
    before = qemu.nbd_dirty_extents(p, "b0")
    assert main(["snapshot", "-c", "s1", str(p)]) == 0
    assert qemu.bitmaps(p) == [{"flags": ["auto"], "name": "b0", "granularity": 65536}]
    assert qemu.nbd_dirty_extents(p, "b0") == before
    assert main(["snapshot", "-d", "s1", str(p)]) == 0
    assert qemu.nbd_dirty_extents(p, "b0") == before
    qemu.assert_clean(p)


@pytest.mark.parametrize("args,why", [
    (["-c", "s0"], "exists already"),
    (["-d", "nope"], "snapshot not found"),
    (["-a", "nope"], "Failed to load snapshot"),
    (["-c", ""], "must not be empty"),
    (["-c", "x" * 65536], "exceeds the 65535-byte limit"),
])
def test_refusals_leave_the_image_byte_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 args: list[str], why: str) -> None:
    p = image(tmp_path)
    qemu.qemu_img("snapshot", "-c", "s0", str(p))
    before = p.read_bytes()
    capsys.readouterr()
    assert main(["snapshot", *args, str(p)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and why in err, err
    assert p.read_bytes() == before


def test_refcount_overflow_refused_like_qemu(tmp_path: Path) -> None:
    """1-bit refcounts cannot count a second reference: qemu-img refuses too."""
    p = image(tmp_path, "refcount_bits=1")
    before = p.read_bytes()
    assert main(["snapshot", "-c", "s1", str(p)]) == 1
    assert p.read_bytes() == before
    assert qemu.qemu_img("snapshot", "-c", "s1", str(p), check=False).returncode == 1


def test_data_file_refused(tmp_path: Path) -> None:
    p = qemu.create(tmp_path / "a.qcow2", "1M", f"data_file={tmp_path / 'a.raw'}")
    before = p.read_bytes()
    assert main(["snapshot", "-c", "s1", str(p)]) == 1
    assert p.read_bytes() == before


@pytest.mark.parametrize("opts", OPTIONS[:4], ids=lambda o: ",".join(o))
def test_apply_like_qemu_img(tmp_path: Path, opts: tuple[str, ...]) -> None:
    """-a: the disk reads as the snapshot; later writes copy on write and leave the
    snapshot alone; qemu-img -a on a copy gives the same disk and allocation."""
    p = image(tmp_path, *opts)
    qemu.qemu_img("snapshot", "-c", "s1", str(p))
    qemu.qemu_io(p, "write -P 0x33 0 64k", "write -P 0x55 5M 64k")
    twin = shutil.copy(p, tmp_path / "twin.qcow2")
    assert main(["snapshot", "-a", "1", str(p)]) == 0          # by id, as qemu-img
    qemu.qemu_img("snapshot", "-a", "s1", str(twin))
    qemu.assert_clean(p)
    qemu.qemu_img("compare", str(p), str(twin))
    assert qemu.check(p)[1]["allocated-clusters"] == qemu.check(twin)[1]["allocated-clusters"]
    qemu.qemu_io(p, "write -P 0x66 0 4k")
    qemu.assert_clean(p)
    snap = snapshot_data(p, "s1", tmp_path / "s1.raw")
    assert snap[:1 << 20] == b"\x11" * (1 << 20)


def test_apply_refused_with_bitmaps_as_qemu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = image(tmp_path)
    qemu.qemu_img("snapshot", "-c", "s1", str(p))
    qemu.qemu_img("bitmap", "--add", "--disable", str(p), "b0")
    before = p.read_bytes()
    assert main(["snapshot", "-a", "s1", str(p)]) == 1
    assert "active dirty bitmaps" in capsys.readouterr().err
    assert p.read_bytes() == before
    assert "active dirty bitmaps" in qemu.qemu_img("snapshot", "-a", "s1", str(p), check=False).stderr


@pytest.mark.parametrize("name", ["snapshot-create", "snapshot-delete", "snapshot-apply"])
def test_every_crash_leaves_old_or_new(name: str) -> None:
    """Each crash point of the transaction: qjournal after recovery sees the old snapshot
    list or the new one; QEMU (qemu-img check and info) never a corruption."""
    harness.assert_passes(harness.check(WORKLOADS[name]))


def test_info_json_lists_them_as_qemu_img(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = image(tmp_path)
    assert main(["snapshot", "-c", "s1", str(p)]) == 0
    capsys.readouterr()
    assert main(["info", "--output=json", str(p)]) == 0
    assert json.loads(capsys.readouterr().out)["snapshots"] == qemu.info(p)["snapshots"]


def test_many_shared_clusters_count_as_a_sort_would_count_them(tmp_path: Path) -> None:
    """Above 65536 bulk references (a snapshot of a big disk) the allocator sums them in one
    dense pass; it must give what sorting every reference gives."""
    p = qemu.create(tmp_path / "a.qcow2", "64M", "cluster_size=512")
    qemu.qemu_io(p, "write -P 3 0 2M")
    rng = np.random.default_rng(7)
    with qjournal.open(p, "r+") as img:
        with pytest.raises(RuntimeError), img.transaction() as tx:
            a, b = rng.integers(0, 5000, 70000), rng.integers(100, 4000, 30000)
            tx.alloc.reference(a, 2)
            tx.alloc.reference(b, -1)
            tx.alloc.alloc(3)
            cl, d = tx.alloc.changes()
            want = np.zeros(6000, np.int64)
            np.add.at(want, a, 2)
            np.add.at(want, b, -1)
            for c, delta in tx.alloc.deltas.items():
                want[c] += delta
            nz = np.flatnonzero(want)
            assert cl.tolist() == nz.tolist() and d.tolist() == want[nz].tolist()
            raise RuntimeError("abort: nothing is written")


class _CountingMedium(MmapMedium):
    """The image's own medium, counting the bytes read from it."""

    read_bytes = 0

    def read(self, off: int, n: int) -> bytes:
        self.read_bytes += n
        return super().read(off, n)


@pytest.mark.parametrize("names", [1, 24], ids=["one", "past-the-first-read"])
def test_open_reads_the_snapshot_table_not_the_file_after_it(tmp_path: Path, names: int) -> None:
    """The table comes first in the file, 64 MiB of data after it. An open used to read
    QEMU's limit (64 MiB) from the table's offset: 150 MiB RSS for ``info`` after a
    snapshot. Now it reads the table's bytes, doubling a short first read; 24 names
    of 4000 bytes overflow the first 64 KiB."""
    p = qemu.create(tmp_path / "a.qcow2", "128M")
    for i in range(names):
        qemu.qemu_img("snapshot", "-c", f"{i:04}" + "n" * 3996, str(p))
    qemu.qemu_io(p, "write -P 0x5a 0 64M")
    m = _CountingMedium(str(p), writable=False)
    with Image(p, medium=m) as img:
        assert [s.name[:4] for s in img.snapshots] == [f"{i:04}" for i in range(names)]
    table = names * (40 + 16 + 4000 + len(str(names)) + 8)
    assert m.read_bytes < 4 * max(table, 64 << 10) + (1 << 20), m.read_bytes
    assert [s["name"][:4] for s in qemu.info(p)["snapshots"]] == [f"{i:04}" for i in range(names)]

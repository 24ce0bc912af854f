"""A user's ``with img.transaction():`` is all-or-nothing, guest data included.

Oracle: the image file itself (an exception must leave it byte for byte as it was),
``qemu-img compare`` against a copy of the earlier state or against the same writes
made by ``qemu-io`` on another copy, ``qemu-img check``, ``qemu-nbd -B`` for the bitmap
bits; and for crashes, crashsim's harness (every in-order prefix of the recorded writes
and the state after each barrier, judged by qjournal after recovery, by a reader that
ignores the journal and by qemu-img).
"""
from __future__ import annotations

import shutil
from pathlib import Path
import pytest

import qemu
import qjournal
from crashsim import harness
from crashsim.workloads import WORKLOADS

KiB, MiB = 1 << 10, 1 << 20

# The writes of every scenario: (guest offset, pattern byte, length), made by qjournal in
# one transaction and by qemu-io on a reference copy.
WRITES = [
    (0, 0x22, 1),                      # one byte of an allocated cluster
    (60 * KiB, 0x33, 200 * KiB),       # across allocated clusters, unaligned at both ends
    (512 * KiB, 0x44, 256 * KiB),      # whole allocated clusters
    (3 * MiB + 100, 0x55, 10 * KiB),   # unallocated: new clusters
    (3 * MiB + 200, 0x66, 50),         # again, into a cluster this transaction allocated
]


def _scenario(tmp_path: Path, opts: tuple[str, ...], bitmap: bool = False, snapshot: bool = False,
              backing: bool = False) -> Path:
    """An image with its first MiB allocated (pattern 0x11) by qemu-io, perhaps under a
    backing file, a snapshot and an enabled bitmap."""
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    if backing:
        base = qemu.create(tmp_path / "base.qcow2", "8M")
        qemu.qemu_io(base, "write -P 0x77 0 8M")
        args += ["-b", "base.qcow2", "-F", "qcow2"]
    img = tmp_path / "a.qcow2"
    qemu.qemu_img(*args, str(img), "8M")
    qemu.qemu_io(img, "write -P 0x11 0 1M", "write -P 0x12 70k 3k")
    if snapshot:
        qemu.qemu_img("snapshot", "-c", "s0", str(img))
    if bitmap:
        qemu.qemu_img("bitmap", "--add", "-g", "4096", str(img), "b0")
    return img


SCENARIOS: dict[str, dict[str, object]] = {
    "64k-clusters": dict(opts=()),
    "4k-clusters-bitmap": dict(opts=("cluster_size=4096",), bitmap=True),
    "snapshot": dict(opts=("cluster_size=4096",), snapshot=True),
    "extended-l2-backing": dict(opts=("cluster_size=65536", "extended_l2=on"), backing=True),
    "refcount-1-bit": dict(opts=("cluster_size=4096", "refcount_bits=1")),
    "v2": dict(opts=("compat=0.10", "cluster_size=4096")),
}


def _writes(q: qjournal.Image) -> None:
    for off, byte, n in WRITES:
        q.write(off, bytes([byte]) * n)
    q.write_zeroes(128 * KiB, 64 * KiB)


def _qemu_writes(img: Path) -> None:
    qemu.qemu_io(img, *(f"write -P {byte:#x} {off} {n}" for off, byte, n in WRITES),
                 f"write -z {128 * KiB} {64 * KiB}")


def _compare(a: Path, b: Path) -> None:
    res = qemu.qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(a), str(b), check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def _same_bytes(got: bytes, want: bytes, what: str) -> None:
    """Assert byte equality with a short message (pytest's diff of megabytes takes minutes)."""
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise AssertionError(f"{what}: {len(got)} bytes, expected {len(want)}; first difference at {at:#x}")


class Boom(Exception):
    """Raised inside the block: the transaction must leave nothing behind."""


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_an_exception_leaves_the_image_byte_identical(tmp_path: Path, name: str) -> None:
    img = _scenario(tmp_path, **SCENARIOS[name])  # type: ignore[arg-type]
    before = tmp_path / "before.qcow2"
    shutil.copyfile(img, before)
    with qjournal.open(img, "r+") as q:
        with pytest.raises(Boom):
            with q.transaction("doomed"):
                _writes(q)
                if q.bitmaps:
                    q.bitmaps.add("added", 65536)
                assert q.read(0, 2) == b"\x22\x11"          # the block sees its writes
                raise Boom
        assert q.read(0, 2) == b"\x11\x11"
    _same_bytes(img.read_bytes(), before.read_bytes(), "the image after the exception")
    _compare(img, before)
    qemu.assert_clean(img)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_a_committed_transaction_equals_qemu_io(tmp_path: Path, name: str) -> None:
    img = _scenario(tmp_path, **SCENARIOS[name])  # type: ignore[arg-type]
    ref = tmp_path / "ref.qcow2"
    shutil.copyfile(img, ref)
    _qemu_writes(ref)
    with qjournal.open(img, "r+") as q, q.transaction("all of it"):
        _writes(q)
    _compare(img, ref)
    qemu.assert_clean(img)
    if SCENARIOS[name].get("bitmap"):
        dirty = qemu.nbd_dirty_extents(img, "b0")
        for off, _, n in WRITES:
            assert sum(max(0, min(off + n, s + k) - max(off, s)) for s, k in dirty) == n, (off, dirty)


def test_the_old_cluster_is_freed_and_no_byte_is_written_in_place(tmp_path: Path) -> None:
    """Inside the block an overwrite goes into a new cluster; the old one is freed by the commit."""
    img = _scenario(tmp_path, ("cluster_size=4096",))
    with qjournal.open(img, "r+") as q:
        old_host = q.map(0, 4096)[0].offset
        with q.transaction("move one cluster"):
            q.write(100, b"\x22" * 10)
            assert q.medium.read(old_host, 4096) == b"\x11" * 4096   # untouched before the commit
        new_host = q.map(0, 4096)[0].offset
    assert new_host != old_host
    qemu.assert_clean(img)  # no leak: the old cluster's refcount went to 0
    qemu.qemu_io(img, "read -P 0x11 0 100", "read -P 0x22 100 10", "read -P 0x11 110 3986")


@pytest.mark.parametrize("how", ["write", "disk"])
def test_outside_a_transaction_overwrites_stay_in_place(tmp_path: Path, how: str) -> None:
    """A single write and a GuestDisk batch keep QEMU's in-place semantics: no new cluster."""
    img = _scenario(tmp_path, ("cluster_size=4096",))
    size = img.stat().st_size
    with qjournal.open(img, "r+") as q:
        host = q.map(0, 4096)[0].offset
        if how == "write":
            q.write(100, b"\x22" * 10)
        else:
            with q.disk() as disk:
                disk.seek(100)
                disk.write(b"\x22" * 10)
        assert q.map(0, 4096)[0].offset == host
    assert img.stat().st_size == size
    qemu.qemu_io(img, "read -P 0x22 100 10")
    qemu.assert_clean(img)


def test_a_guest_disk_inside_a_transaction_joins_it(tmp_path: Path) -> None:
    img = _scenario(tmp_path, ("cluster_size=4096",))
    before = img.read_bytes()
    with qjournal.open(img, "r+") as q:
        with pytest.raises(Boom):
            with q.transaction("doomed"), q.disk() as disk:
                disk.write(b"\x22" * (300 * KiB))
                disk.flush()                    # joins the open transaction: commits nothing
                raise Boom
    _same_bytes(img.read_bytes(), before, "the image after the exception")


@pytest.mark.parametrize("raw", [False, True])
def test_an_external_data_file_is_left_untouched_too(tmp_path: Path, raw: bool) -> None:
    """Clusters of a data file cannot move: their overwrites wait for the commit."""
    data = tmp_path / "d.raw"
    img = qemu.create(tmp_path / "d.qcow2", "8M", f"data_file={data}", f"data_file_raw={'on' if raw else 'off'}")
    qemu.qemu_io(img, "write -P 0x11 0 1M")
    before, data_before = img.read_bytes(), data.read_bytes()
    with qjournal.open(img, "r+") as q:
        with pytest.raises(Boom):
            with q.transaction("doomed"):
                q.write(100, b"\x22" * (200 * KiB))
                assert q.read(99, 2) == b"\x11\x22"
                raise Boom
    _same_bytes(img.read_bytes(), before, "the image after the exception")
    _same_bytes(data.read_bytes(), data_before, "the data file after the exception")
    with qjournal.open(img, "r+") as q, q.transaction("kept"):
        q.write(100, b"\x22" * (200 * KiB))
    qemu.qemu_io(img, "read -P 0x11 0 100", f"read -P 0x22 100 {200 * KiB}")
    qemu.assert_clean(img)


def test_a_crash_leaves_all_or_nothing() -> None:
    """Every in-order prefix and every barrier of an atomic overwrite under enabled bitmaps:
    qjournal after recovery sees exactly the old or the new state (guest data compared
    byte for byte), a reader that ignores the journal sees each sector old or new and no
    consistent bitmap that misses a write, and qemu-img check finds no corruption."""
    w = harness.check(WORKLOADS["guest-atomic"])
    harness.assert_passes(w, qjournal=("old", "new"), plain=("old", "new"))

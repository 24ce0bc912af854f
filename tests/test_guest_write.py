"""Guest writes through qjournal, read back by qemu-io and compared by qemu-img.

Oracle: `qemu-io -c "read -P ..."` for what was written, `qemu-img compare` against a raw
reference file kept in step by the test, `qemu-img check` after every operation, and
qemu-nbd -B for the bitmap bits the writes set.
"""
from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import damage
import qemu
import qjournal
from qjournal.cli import main
from qjournal.format.header import FIELD_OFFSET, INCOMPAT_DATA_FILE

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
    assert main(["write", str(img), "0", "--input", "/dev/zero"]) == 1      # no length known: refused
    assert main(["write", str(img), "16M", "--input", str(src)]) == 1       # past the end: refused
    assert main(["zero", str(img), "1M", "64k"]) == 0
    qemu.qemu_io(img, "read -P 0 1M 64k", "read -P 0xab 1088k 64k")
    with qjournal.open(img) as q:
        assert q.read(5000, 4096) == src.read_bytes()
    qemu.assert_clean(img)


def test_refused_write_leaves_a_dirty_image_as_it_was(tmp_path: Path) -> None:
    """A crashed QEMU with lazy refcounts leaves the dirty bit and uncounted clusters. A
    request refused after the open writes nothing (not even the refcount rebuild QEMU
    runs at its writable open); the first accepted write rebuilds, then writes."""
    img = qemu.create(tmp_path / "lazy.qcow2", "16M", "lazy_refcounts=on")
    qemu.run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "abort", str(img), check=False)
    assert qemu.info(img)["dirty-flag"] is True
    before = img.read_bytes()
    for args in (["write", str(img), "16M", "-P", "0x5a", "512"], ["zero", str(img), "15M", "2M"],
                 ["discard", str(img), "16M", "512"]):
        assert main(args) == 1
        assert img.read_bytes() == before, args
    assert main(["write", str(img), "2M", "-P", "0x5a", "64k"]) == 0
    assert qemu.info(img)["dirty-flag"] is False
    qemu.assert_clean(img)
    qemu.qemu_io(img, "read -P 0x11 0 1M", "read -P 0x5a 2M 64k")


def test_new_clusters_step_over_counted_clusters_past_the_end(tmp_path: Path) -> None:
    """Refcounts past the end of the file (a leak, or damage) name clusters in use: QEMU's
    allocator steps over them, and so does ours. Handing one out refused the write when
    its count was already at the maximum (fuzz seed 20261207, case 45348)."""
    img = damage.fresh(tmp_path, "refcount_bits=2")
    end = img.stat().st_size // damage.CS
    for c in (end, end + 1):
        damage.set_refcount_of(img, c, 3)
    assert main(["write", str(img), "8M", "-P", "0x5a", "64k"]) == 0
    assert damage.data_offset(img, 8 * MiB) // damage.CS >= end + 2
    code, out = qemu.check(img)
    assert out["leaks"] == 2 and not out.get("corruptions"), out
    qemu.qemu_io(img, "read -P 0x5a 8M 64k", "read -P 0x11 0 64k")


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

    def test_v2_frees_whole_clusters(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "v2.qcow2", "1T", "compat=0.10")
        qemu.qemu_io(img, "write -P 0x11 0 1M")
        before = qemu.check(img)[1]["allocated-clusters"]
        assert main(["discard", str(img), "100", str((1 << 40) - 200)]) == 0   # a terabyte: nothing written
        qemu.qemu_io(img, "read -P 0x11 0 100", "read -P 0 100 1M")
        assert qemu.assert_clean(img)["allocated-clusters"] == before - 15   # the head cluster stays

    def test_v2_over_a_backing_file_writes_zero_data(self, tmp_path: Path) -> None:
        base = qemu.create(tmp_path / "base.qcow2", "4M", "compat=0.10")
        qemu.qemu_io(base, "write -P 0x44 0 4M")
        top = tmp_path / "top.qcow2"
        qemu.qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2", str(top))
        assert main(["discard", str(top), "0", "128k"]) == 0
        qemu.qemu_io(top, "read -P 0 0 128k", "read -P 0x44 128k 1M")
        qemu.assert_clean(top)


class TestBatches:
    """Many writes in one transaction: one commit, reads see them at once, all or nothing."""

    def test_one_transaction_is_one_journal_commit(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "t.qcow2", "16M", "cluster_size=4096")
        qemu.qemu_io(img, "write -P 0x11 0 1M")
        qemu.qemu_img("bitmap", "--add", "-g", "4096", str(img), "b0")
        with qjournal.open(img, "r+") as q:
            commits: list[str] = []
            commit = q.journal.commit
            q.journal.commit = lambda tx: (commits.append(tx.description), commit(tx))[1]  # type: ignore[method-assign]
            with q.transaction("batch"):
                q.write(8 * KiB, b"\x22" * 5000)            # over allocated clusters: copied
                q.write(2 * MiB, b"\x33" * 70000)           # new clusters
                q.write(2 * MiB + 100, b"\x44" * 10)        # again, into a cluster the batch allocated
                q.write_zeroes(4 * MiB, 64 * KiB)
                q.write(4 * MiB + 8 * KiB, b"\x55" * 100)   # into a zero cluster the batch made
                assert q.read(8 * KiB, 5000) == b"\x22" * 5000
                assert q.read(2 * MiB, 110) == b"\x33" * 100 + b"\x44" * 10
                assert q.read(4 * MiB + 8 * KiB - 1, 102) == b"\0" + b"\x55" * 100 + b"\0"
            assert len(commits) == 1
        qemu.qemu_io(img, "read -P 0x11 0 8k", "read -P 0x22 8k 5000", "read -P 0x33 2M 100",
                     f"read -P 0x44 {2 * MiB + 100} 10", f"read -P 0x33 {2 * MiB + 110} {70000 - 110}",
                     "read -P 0 4M 8k", f"read -P 0x55 {4 * MiB + 8 * KiB} 100")
        qemu.assert_clean(img)
        assert qemu.nbd_dirty_extents(img, "b0") == [(8 * KiB, 8 * KiB), (2 * MiB, 72 * KiB),
                                                     (4 * MiB, 64 * KiB)]

    def test_waiting_in_place_data_dies_with_its_cluster(self, tmp_path: Path) -> None:
        """In-place data that waits for the bitmap bits, then zeroed, then rewritten around
        (in a transaction with the in-place semantics of a GuestDisk batch)."""
        img = qemu.create(tmp_path / "t.qcow2", "16M")
        qemu.qemu_io(img, "write -P 0x11 0 1M")
        qemu.qemu_img("bitmap", "--add", str(img), "b0")
        with qjournal.open(img, "r+") as q:
            with q.transaction("batch") as tx:
                tx.atomic_data = False
                q.write(0, b"\x22" * 4096)             # waits for the commit (the bits first)
                assert tx.guest.deferred_bytes == 4096
                q.write_zeroes(0, 64 * KiB)            # the cluster becomes a zero cluster
                q.write(100, b"\x33")                  # a new cluster: zeros around the byte
                assert q.read(0, 200) == bytes(100) + b"\x33" + bytes(99)
        qemu.qemu_io(img, "read -P 0 0 100", "read -P 0x33 100 1", "read -P 0 101 65435", "read -P 0x11 64k 960k")
        qemu.assert_clean(img)

    def test_an_aborted_batch_maps_nothing_and_gives_the_space_back(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "t.qcow2", "16M")
        qemu.qemu_io(img, "write -P 0x11 0 1M")
        size = img.stat().st_size
        with qjournal.open(img, "r+") as q:
            with pytest.raises(RuntimeError):
                with q.transaction("doomed"):
                    q.write(4 * MiB, b"\x22" * (3 * MiB))
                    raise RuntimeError("give up")
            assert q.read(4 * MiB, 3 * MiB) == bytes(3 * MiB)
        assert img.stat().st_size == size
        qemu.qemu_io(img, "read -P 0x11 0 1M", "read -P 0 1M 15M")
        qemu.assert_clean(img)

    def test_the_disk_commits_at_flush(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "t.qcow2", "64M")
        with qjournal.open(img, "r+") as q, q.disk() as disk:
            for i in range(8):
                disk.write(bytes([i + 1]) * MiB)
            disk.seek(3 * MiB)
            assert disk.read(MiB) == b"\x04" * MiB          # before any commit
            disk.flush()
            out = qemu.run("qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -P 0x08 7M 1M", str(img))
            assert "read 1048576/1048576" in out.stdout    # durable, and QEMU sees it
            disk.seek(20 * MiB)
            disk.write(b"\x99" * 1000)
        qemu.qemu_io(img, "read -P 0x01 0 1M", "read -P 0x08 7M 1M", "read -P 0x99 20M 1000")
        qemu.assert_clean(img)


class TestExtendedL2:
    """Subcluster allocation (extended_l2=on): only the subclusters a write touches change."""

    def test_subclusters_over_a_backing_file(self, tmp_path: Path) -> None:
        base = qemu.create(tmp_path / "base.qcow2", "4M")
        qemu.qemu_io(base, "write -P 0x44 0 4M")
        top = tmp_path / "top.qcow2"
        qemu.qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k",
                      "-b", "base.qcow2", "-F", "qcow2", str(top))
        with qjournal.open(top, "r+") as q:
            q.write(6 * KiB, b"\x55" * 100)        # subcluster 3 of cluster 0 (2 KiB subclusters)
        qemu.qemu_io(top, "read -P 0x44 0 6k", "read -P 0x55 6k 100", f"read -P 0x44 {6 * KiB + 100} 1M")
        qemu.assert_clean(top)
        # The untouched subclusters still come from the backing file.
        m = json.loads(qemu.qemu_img("map", "--output=json", str(top)).stdout)
        assert [(e["start"], e["length"], e["depth"]) for e in m][:3] == [
            (0, 6 * KiB, 1), (6 * KiB, 2 * KiB, 0), (8 * KiB, 4 * MiB - 8 * KiB, 1)]
        with qjournal.open(top, "r+") as q:
            q.write(6 * KiB + 100, b"\x66" * 5000)  # in place, then into unallocated subclusters 4..5
            q.write_zeroes(32 * KiB, 4 * KiB)        # two whole subclusters read as zeros
        qemu.qemu_io(top, "read -P 0x55 6k 100", f"read -P 0x66 {6 * KiB + 100} 5000",
                     f"read -P 0x44 {11 * KiB + 4} 21500", "read -P 0 32k 4k", "read -P 0x44 36k 1M")
        qemu.assert_clean(top)
        assert json.loads(main_json(["map", "--output=json", str(top)])) == \
            json.loads(qemu.qemu_img("map", "--output=json", str(top)).stdout)

    def test_qemu_io_and_qjournal_read_each_other(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "x.qcow2", "8M", "extended_l2=on", "cluster_size=32k")
        qemu.qemu_io(img, "write -P 0x11 1k 3k", "write -c -P 0x12 1M 32k")
        with qjournal.open(img, "r+") as q:
            assert q.read(1 * KiB, 3 * KiB) == b"\x11" * 3 * KiB
            q.write(2 * KiB, b"\x22" * 40 * KiB)            # across a cluster boundary
            q.write(1 * MiB + 7, b"\x23" * 9)                # into a compressed cluster
            q.write_zeroes(1 * MiB + 2 * KiB, 1 * KiB)       # one whole subcluster of it
        qemu.qemu_io(img, "read -P 0x11 1k 1k", "read -P 0x22 2k 40k", "read -P 0 42k 22k",
                     "read -P 0x12 1M 7", f"read -P 0x23 {MiB + 7} 9", f"read -P 0x12 {MiB + 16} {2 * KiB - 16}",
                     f"read -P 0 {MiB + 2 * KiB} 1k", f"read -P 0x12 {MiB + 3 * KiB} 29k")
        qemu.assert_clean(img)


class TestDataFile:
    """External data files: data at the guest offset in the data file, no refcounts for it (as QEMU)."""

    @pytest.mark.parametrize("raw", [False, True])
    def test_writes_land_in_the_data_file(self, tmp_path: Path, raw: bool) -> None:
        img = qemu.create(tmp_path / "d.qcow2", "8M", f"data_file={tmp_path / 'd.raw'}",
                          f"data_file_raw={'on' if raw else 'off'}")
        qemu.qemu_io(img, "write -P 0x11 0 1M")
        with qjournal.open(img, "r+") as q:
            q.write(100, b"\x22" * 70000)
            q.write(5 * MiB - 1, b"\x33" * 3)
            q.write_zeroes(512 * KiB, 128 * KiB)
        qemu.qemu_io(img, "read -P 0x11 0 100", "read -P 0x22 100 70000", "read -P 0 512k 128k",
                     "read -P 0x11 640k 384k", f"read -P 0x33 {5 * MiB - 1} 3", "read -P 0 1M 3M")
        qemu.assert_clean(img)
        data = (tmp_path / "d.raw").read_bytes()
        assert data[100:70100] == b"\x22" * 70000 and data[5 * MiB - 1:5 * MiB + 2] == b"\x33" * 3
        if raw:
            # A raw data file stays a raw image of the disk: zeroes are data too.
            assert data[512 * KiB:640 * KiB] == bytes(128 * KiB)
            with qjournal.open(img) as q:
                assert q.read(0, 8 * MiB) == data.ljust(8 * MiB, b"\0")


    def test_a_data_file_name_without_the_feature_bit_is_ignored(self, tmp_path: Path) -> None:
        """The name extension alone names no data file: QEMU opens such an image as one
        without, and so do qjournal's writes and snapshots (fuzz seed 20261207, case 17568:
        the write asserted there was a data file)."""
        img = qemu.create(tmp_path / "d.qcow2", "8M", f"data_file={tmp_path / 'd.raw'}")
        raw = bytearray(img.read_bytes())
        at = FIELD_OFFSET["incompatible_features"]
        struct.pack_into(">Q", raw, at, struct.unpack_from(">Q", raw, at)[0] & ~INCOMPAT_DATA_FILE)
        img.write_bytes(raw)
        untouched = (tmp_path / "d.raw").read_bytes()
        assert main(["write", str(img), "3M", "-P", "0x5a", "4k"]) == 0
        assert main(["snapshot", "-c", "s1", str(img)]) == 0
        qemu.qemu_io(img, "read -P 0x5a 3M 4k", "read -P 0 0 3M")
        qemu.assert_clean(img)
        assert (tmp_path / "d.raw").read_bytes() == untouched


def main_json(argv: list[str]) -> str:
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


def test_closing_the_image_commits_an_open_disk_batch(tmp_path: Path) -> None:
    img = qemu.create(tmp_path / "t.qcow2", "16M")
    q = qjournal.open(img, "r+")
    disk = q.disk()
    disk.write(b"\x42" * 100000)
    q.close()                      # the disk was never flushed or closed
    qemu.qemu_io(img, "read -P 0x42 0 100000")
    qemu.assert_clean(img)


@given(order=st.integers(0, 6), data=st.data())
def test_refcount_entries_decode_alone_as_in_the_whole_block(order: int, data: st.DataObject) -> None:
    """A write decodes only the refcount entries it changes: the same values as the whole block."""
    from qjournal.format import refcount as rc
    block = data.draw(st.binary(min_size=64, max_size=64))
    whole = rc.unpack_block(block, order)
    lo = data.draw(st.integers(0, len(whole) - 1))
    hi = data.draw(st.integers(lo + 1, len(whole)))
    assert rc.unpack_entries(block, order, lo, hi).tolist() == whole[lo:hi].tolist()
    a, b = rc.byte_span(lo, hi, order)
    first, end = (a * 8) >> order, (b * 8) >> order
    assert rc.pack_block(whole[first:end], order) == block[a:b]


def test_a_small_write_to_2m_clusters_with_1_bit_refcounts(tmp_path: Path) -> None:
    """16 Mi refcount entries per block: the write changes one byte of it, and reads the same."""
    img = qemu.create(tmp_path / "p.qcow2", "4G", "cluster_size=2M", "refcount_bits=1")
    with qjournal.open(img, "r+") as q:
        q.write(3 << 30, b"\x42" * 1000)
        q.write((3 << 30) + (2 << 20), b"\x43" * 1000)
    qemu.qemu_io(img, "read -P 0x42 3G 1000", f"read -P 0x43 {(3 << 30) + (2 << 20)} 1000")
    qemu.assert_clean(img)


class TestDamagedEntries:
    """A write that meets a damaged L2 entry is refused whole: one line, exit 1, nothing written."""

    def _image(self, tmp_path: Path) -> tuple[Path, int]:
        img = qemu.create(tmp_path / "d.qcow2", "16M")
        qemu.qemu_io(img, "write -P 0x11 0 256k")
        raw = img.read_bytes()
        l1 = struct.unpack_from(">Q", raw, struct.unpack_from(">Q", raw, 40)[0])[0] & ((1 << 56) - 512)
        return img, l1          # the L2 table; entry i at l1 + 8 * i

    def _refused(self, img: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
        before = img.read_bytes()
        capsys.readouterr()
        assert main(["write", str(img), *args]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("qjournal: L2 table at offset 0x"), err
        assert img.read_bytes() == before
        return err[0]

    def test_data_mapped_onto_the_refcount_table(self, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
        img, l2 = self._image(tmp_path)
        reftable = struct.unpack_from(">Q", img.read_bytes(), 48)[0]
        with open(img, "r+b") as f:
            f.seek(l2 + 8 * 3)
            f.write((reftable | 1 << 63).to_bytes(8, "big"))   # cluster 3 "is" the refcount table, COPIED
        # The request starts in a sound cluster: it must not be half done either.
        assert "refcount table" in self._refused(img, capsys, "0", "-P", "0x22", "256k")

    @pytest.mark.parametrize("command", [["write", "1M", "-P", "0xaa", "4k"], ["discard", "1M", "64k"]])
    def test_an_entry_onto_its_own_l2_table_is_never_freed(self, tmp_path: Path, command: list[str],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
        img, l2 = self._image(tmp_path)
        qemu.qemu_io(img, "write -P 2 1M 64k")
        with open(img, "r+b") as f:
            f.seek(l2 + 8 * 16)
            f.write(l2.to_bytes(8, "big"))        # without COPIED: a copy-on-write would free it
        before = img.read_bytes()
        capsys.readouterr()
        assert main([command[0], str(img), *command[1:]]) == 1
        assert "L2 table" in capsys.readouterr().err and img.read_bytes() == before

    def test_data_mapped_onto_a_snapshot_l1_table(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        img, l2 = self._image(tmp_path)
        qemu.qemu_img("snapshot", "-c", "snap", str(img))
        raw = img.read_bytes()
        snapshots = struct.unpack_from(">Q", raw, 64)[0]
        snap_l1 = struct.unpack_from(">Q", raw, snapshots)[0]
        l2 = struct.unpack_from(">Q", raw, struct.unpack_from(">Q", raw, 40)[0])[0] & ((1 << 56) - 512)
        with open(img, "r+b") as f:
            f.seek(l2 + 8 * 16)
            f.write((snap_l1 | 1 << 63).to_bytes(8, "big"))
        assert "L1 table of snapshot 'snap'" in self._refused(img, capsys, "1M", "-P", "0xcc", "512")

    def test_a_zero_written_as_data_is_refused_whole(self, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
        base = qemu.create(tmp_path / "base.qcow2", "64M")
        img = tmp_path / "v2.qcow2"
        qemu.qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2",
                      str(img))
        qemu.qemu_io(img, "write -P 5 0 32M")
        raw = img.read_bytes()
        l2 = struct.unpack_from(">Q", raw, struct.unpack_from(">Q", raw, 40)[0])[0] & ((1 << 56) - 512)
        e = struct.unpack_from(">Q", raw, l2 + 8 * 320)[0]
        with open(img, "r+b") as f:
            f.seek(l2 + 8 * 320)                 # guest offset 20 MiB: reserved bit 1
            f.write((e | 2).to_bytes(8, "big"))
        before = img.read_bytes()
        capsys.readouterr()
        assert main(["zero", str(img), "0", "32M"]) == 1
        assert "reserved bits" in capsys.readouterr().err and img.read_bytes() == before
        assert base.exists()

    def test_reserved_bits(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        img, l2 = self._image(tmp_path)
        raw = bytearray(img.read_bytes())
        e = struct.unpack_from(">Q", raw, l2 + 8 * 2)[0]
        with open(img, "r+b") as f:
            f.seek(l2 + 8 * 2)
            f.write((e | 1 << 60).to_bytes(8, "big"))
        assert "reserved bits" in self._refused(img, capsys, "0", "-P", "0x22", "256k")

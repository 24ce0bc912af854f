"""`qjournal amend` against `qemu-img amend`, on twin copies.

Oracle: qemu-img amend on the twin (the files must end byte-identical), qemu-img check,
and qemu-img's own refusals. Crash states: crashsim's ``amend-lazy-refcounts`` workload.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import pytest

import damage
import qemu
import qjournal
from crashsim import harness
from crashsim.workloads import WORKLOADS
from qjournal.api import Image
from qjournal.cli import main
from qjournal.ops import amend as amend_op
from qjournal.ops.resize import resize
from qjournal.storage.faults import JOURNAL_SYNC, Fault
from test_faults import faulted_run, picks


@pytest.mark.parametrize("opts", [(), ("cluster_size=4096",), ("refcount_bits=64", "extended_l2=on")],
                         ids=lambda o: ",".join(o) or "default")
def test_lazy_refcounts_on_and_off_write_what_qemu_img_writes(tmp_path: Path, opts: tuple[str, ...]) -> None:
    img = qemu.create(tmp_path / "a.qcow2", "8M", *opts)
    qemu.qemu_io(img, "write -P 1 0 1M")
    twin = Path(shutil.copy(img, tmp_path / "b.qcow2"))
    for value in ("on", "off", "off"):
        assert main(["amend", "-o", f"lazy_refcounts={value}", str(img)]) == 0
        qemu.qemu_img("amend", "-o", f"lazy_refcounts={value}", str(twin))
        assert hash(img.read_bytes()) == hash(twin.read_bytes()), value
        assert qemu.info(img)["format-specific"]["data"]["lazy-refcounts"] == (value == "on")
    qemu.assert_clean(img)


def test_unchanged_compat_and_refcount_bits_are_accepted(tmp_path: Path) -> None:
    img = qemu.create(tmp_path / "a.qcow2", "8M")
    before = hash(img.read_bytes())
    assert main(["amend", "-o", "compat=1.1,refcount_bits=16", str(img)]) == 0
    assert hash(img.read_bytes()) == before


@pytest.mark.parametrize("create,args,why", [
    (("extended_l2=on",), ["-o", "compat=0.10"], "extended L2"),         # qemu-img refuses too
    (("compat=0.10",), ["-o", "lazy_refcounts=on"], "compatibility level 1.1"),
    ((), ["-o", "cluster_size=4k"], "only supported for image creation"),
    ((), ["-o", "foo=1"], "invalid parameter 'foo'"),
    ((), [], "must specify options"),
    ((), ["-o", "lazy_refcounts=maybe"], "lazy_refcounts=maybe"),
], ids=["compat-0.10-extended-l2", "lazy-on-v2", "creation-only", "unknown", "no-options", "bad-bool"])
def test_refusals_match_qemu_img_and_write_nothing(tmp_path: Path, create: tuple[str, ...], args: list[str], why: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    img = qemu.create(tmp_path / "a.qcow2", "8M", *create)
    twin = Path(shutil.copy(img, tmp_path / "b.qcow2"))
    before = hash(img.read_bytes())
    assert main(["amend", *args, str(img)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and why in err, err
    assert hash(img.read_bytes()) == before
    assert qemu.qemu_img("amend", *args, str(twin), check=False).returncode == 1


def test_compat_0_10_with_bitmaps_is_refused_where_qemu_img_breaks_them(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    img = qemu.create(tmp_path / "a.qcow2", "8M")
    qemu.qemu_img("bitmap", "--add", str(img), "b0")
    twin = Path(shutil.copy(img, tmp_path / "b.qcow2"))
    before = hash(img.read_bytes())
    assert main(["amend", "-o", "compat=0.10", str(img)]) == 1
    assert "persistent bitmap" in capsys.readouterr().err
    assert hash(img.read_bytes()) == before
    # qemu-img 7.2 goes on, and its check then finds the bitmaps' clusters leaked.
    assert qemu.qemu_img("amend", "-o", "compat=0.10", str(twin), check=False).returncode == 0
    code, out = qemu.check(twin)
    assert code == 3 and out.get("leaks"), out


def _info(path: Path) -> dict[str, Any]:
    """qemu-img info without what differs between two files of the same content."""
    out = qemu.info(path)
    for key in ("filename", "actual-size", "dirty-flag"):
        out.pop(key, None)
    return out


def _image(tmp_path: Path, *opts: str, size: str = "8M") -> tuple[Path, Path]:
    """An image with data, a snapshot sharing its clusters (refcount 2) and a bitmap
    (v3 only), and a copy made before anything is amended."""
    img = qemu.create(tmp_path / "a.qcow2", size, *opts)
    qemu.qemu_io(img, "write -P 1 0 1M", "write -P 2 3M 192k")
    qemu.qemu_img("snapshot", "-c", "s1", str(img))
    qemu.qemu_io(img, "write -P 3 512k 64k")
    if "compat=0.10" not in opts:
        qemu.qemu_img("bitmap", "--add", str(img), "b0")
    return img, Path(shutil.copy(img, tmp_path / "before.qcow2"))


@pytest.mark.parametrize("bits", [2, 8, 64])      # below a byte, a byte, the widest
def test_refcount_bits_change_what_qemu_img_amend_changes(tmp_path: Path, bits: int) -> None:
    img, before = _image(tmp_path)
    twin = Path(shutil.copy(img, tmp_path / "b.qcow2"))
    assert main(["amend", "-o", f"refcount_bits={bits}", str(img)]) == 0
    qemu.qemu_img("amend", "-o", f"refcount_bits={bits}", str(twin))
    assert _info(img) == _info(twin)
    assert qemu.info(img)["format-specific"]["data"]["refcount-bits"] == bits
    assert [b["name"] for b in qemu.bitmaps(img)] == ["b0"]
    assert "s1" in qemu.qemu_img("snapshot", "-l", str(img)).stdout
    # No leak (the old table and blocks were freed), and the snapshot's shared clusters
    # kept their count of 2 (qemu-img check calls a 1 there a corruption).
    qemu.assert_clean(img)
    assert qemu.qemu_img("compare", str(img), str(before)).returncode == 0
    assert main(["amend", "-o", "refcount_bits=16", str(img)]) == 0
    qemu.assert_clean(img)
    assert qemu.info(img)["format-specific"]["data"]["refcount-bits"] == 16


def test_a_refcount_the_new_width_cannot_hold_is_refused_as_qemu_img_refuses(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img, _ = _image(tmp_path)
    twin = Path(shutil.copy(img, tmp_path / "b.qcow2"))
    before = hash(img.read_bytes())
    assert main(["amend", "-o", "refcount_bits=1", str(img)]) == 1
    err = capsys.readouterr().err
    res = qemu.qemu_img("amend", "-o", "refcount_bits=1", str(twin), check=False)
    assert res.returncode == 1
    # qemu-img: "Cannot decrease refcount entry width to 1 bits: Cluster at offset 0x50000 has a refcount of 2"
    where = res.stderr.split("Cluster at offset ")[1].split()[0]
    assert err.count("\n") == 1 and f"cluster at offset {where} has a refcount of 2" in err, (err, res.stderr)
    assert hash(img.read_bytes()) == before


def test_refcount_bits_on_small_clusters_grows_the_table(tmp_path: Path) -> None:
    """512-byte clusters: 16 -> 64 bits needs 4x the blocks and a table of many clusters,
    placed in free clusters and past the end; 64 -> 1 packs them again."""
    img = qemu.create(tmp_path / "a.qcow2", "16M", "cluster_size=512")
    qemu.qemu_io(img, "write -P 7 0 3M")
    qemu.qemu_io(img, "discard 1M 512k")       # free clusters inside the file
    before = Path(shutil.copy(img, tmp_path / "before.qcow2"))
    for bits in (64, 1):
        assert main(["amend", "-o", f"refcount_bits={bits}", str(img)]) == 0
        out = qemu.assert_clean(img)
        assert qemu.info(img)["format-specific"]["data"]["refcount-bits"] == bits
        assert qemu.qemu_img("compare", str(img), str(before)).returncode == 0
    assert out["image-end-offset"] <= img.stat().st_size


@pytest.mark.parametrize("create,spec", [
    (("compat=0.10",), "compat=1.1"),
    (("compat=0.10",), "compat=1.1,refcount_bits=64"),
    (("compat=0.10",), "compat=1.1,lazy_refcounts=on"),
    (("compat=0.10", "cluster_size=4096"), "compat=v3"),
    ((), "compat=0.10"),
    (("lazy_refcounts=on",), "compat=0.10"),
    (("refcount_bits=64",), "compat=0.10,refcount_bits=16"),
    (("cluster_size=512",), "compat=0.10"),
], ids=["up", "up-64-bits", "up-lazy", "up-4k", "down", "down-lazy", "down-from-64-bits", "down-512"])
def test_compat_changes_what_qemu_img_amend_changes(tmp_path: Path, create: tuple[str, ...], spec: str) -> None:
    base = qemu.create(tmp_path / "base.qcow2", "8M", "compat=0.10")
    qemu.qemu_io(base, "write -P 9 0 8M")
    img = qemu.create(tmp_path / "a.qcow2", "8M", *create, f"backing_file={base.name}", "backing_fmt=qcow2")
    qemu.qemu_io(img, "write -P 1 0 1M")
    qemu.qemu_img("snapshot", "-c", "s1", str(img))
    qemu.qemu_io(img, "write -P 3 512k 64k")
    before = Path(shutil.copy(img, tmp_path / "before.qcow2"))
    twin = Path(shutil.copy(img, tmp_path / "b.qcow2"))
    assert main(["amend", "-o", spec, str(img)]) == 0
    qemu.qemu_img("amend", "-o", spec, str(twin))
    assert _info(img) == _info(twin)
    qemu.assert_clean(img)
    assert qemu.qemu_img("compare", str(img), str(before)).returncode == 0
    assert qemu.qemu_img("snapshot", "-l", str(img)).stdout == qemu.qemu_img("snapshot", "-l", str(before)).stdout
    with qjournal.open(str(img)) as q:     # and qjournal reads it back as qemu-img does
        assert q.info().to_json()["format-specific"] == qemu.info(img)["format-specific"]


@pytest.mark.parametrize("create,io,spec,why,qemu_code", [
    (("compat=0.10",), None, "refcount_bits=64", "require compatibility level 1.1", 1),
    ((), None, "compat=0.10,refcount_bits=64", "require compatibility level 1.1", 1),
    (("refcount_bits=64",), None, "compat=0.10", "compat=0.10 requires refcount_bits=16", 1),
    (("data_file=a.raw",), None, "compat=0.10", "external data file", 1),
    (("compression_type=zstd",), None, "compat=0.10", "zstd", 0),      # qemu-img 7.2 goes on
    ((), None, "refcount_bits=3", "power of two", 1),
    ((), None, "refcount_bits=128", "power of two", 1),
], ids=["bits-on-v2", "bits-with-down", "down-64-bits", "down-data-file", "down-zstd", "bits-3", "bits-128"])
def test_compat_and_width_refusals_write_nothing(tmp_path: Path, create: tuple[str, ...], io: str | None, spec: str,
                                                 why: str, qemu_code: int,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    img = qemu.create(tmp_path / "a.qcow2", "8M", *(o.replace("=a.raw", f"={tmp_path}/a.raw") for o in create))
    qemu.qemu_io(img, "write -P 1 0 2M", *([io] if io else []))
    twin = Path(shutil.copy(img, tmp_path / "b.qcow2"))
    before = hash(img.read_bytes())
    assert main(["amend", "-o", spec, str(img)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and why in err, err
    assert hash(img.read_bytes()) == before
    assert qemu.qemu_img("amend", "-o", spec, str(twin), check=False).returncode == qemu_code


@pytest.mark.parametrize("backed", [False, True], ids=["no-backing", "backing"])
@pytest.mark.parametrize("snapshot", [False, True], ids=["", "shared-l2"])
def test_compat_0_10_expands_zero_clusters_as_qemu_img_does(tmp_path: Path, backed: bool, snapshot: bool) -> None:
    """Zero clusters without a cluster (unallocated after, or zero-filled over a backing
    file) and with one (zero-filled), in an L2 table a snapshot shares or not."""
    opts: tuple[str, ...] = ()
    if backed:
        base = qemu.create(tmp_path / "base.qcow2", "8M")
        qemu.qemu_io(base, "write -P 9 0 8M")
        opts = (f"backing_file={base}", "backing_fmt=qcow2")
    img = qemu.create(tmp_path / "a.qcow2", "8M", *opts)
    qemu.qemu_io(img, "write -P 1 0 1M", "write -z 1M 1M", "write -P 2 2M 128k", "write -z 2M 64k")
    if snapshot:
        qemu.qemu_img("snapshot", "-c", "s1", str(img))
    before = Path(shutil.copy(img, tmp_path / "before.qcow2"))
    twin = Path(shutil.copy(img, tmp_path / "b.qcow2"))
    assert main(["amend", "-o", "compat=0.10", str(img)]) == 0
    qemu.qemu_img("amend", "-o", "compat=0.10", str(twin))
    assert _info(img) == _info(twin)
    qemu.assert_clean(img)
    assert qemu.map_layout(img) == qemu.map_layout(twin)
    assert qemu.qemu_img("compare", str(img), str(before)).returncode == 0
    if snapshot:     # the snapshot reads as before too
        for path in (img, before):
            qemu.qemu_img("convert", "-l", "snapshot.name=s1", "-O", "raw", str(path), f"{path}.s1.raw")
        assert Path(f"{img}.s1.raw").read_bytes() == Path(f"{before}.s1.raw").read_bytes()


def test_compat_1_1_completes_snapshot_entries_as_qemu_img_does(tmp_path: Path) -> None:
    """A v2 snapshot entry without extra data (older QEMU wrote none) lacks the disk size v3
    requires: the upgrade writes a completed table, as qemu-img's does (its check then
    finds nothing incomplete)."""
    img = qemu.create(tmp_path / "a.qcow2", "8M", "compat=0.10")
    qemu.qemu_io(img, "write -P 1 0 1M")
    qemu.qemu_img("snapshot", "-c", "s1", str(img))
    damage.write_snapshot_table(img, [(fixed, b"", names) for fixed, _, names in damage.snapshot_entries(img)])
    qemu.assert_clean(img)
    twin = Path(shutil.copy(img, tmp_path / "b.qcow2"))
    before = Path(shutil.copy(img, tmp_path / "before.qcow2"))
    assert main(["amend", "-o", "compat=1.1", str(img)]) == 0
    qemu.qemu_img("amend", "-o", "compat=1.1", str(twin))
    assert [len(extra) for _, extra, _ in damage.snapshot_entries(img)] == [24]   # with icount, as qemu-img
    assert damage.snapshot_entries(img) == damage.snapshot_entries(twin)
    assert _info(img) == _info(twin)
    qemu.assert_clean(img)                  # no leak: the old table was freed
    assert qemu.qemu_img("compare", str(img), str(before)).returncode == 0


def test_a_failed_width_check_comes_before_the_upgrade(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """compat=1.1,refcount_bits=1 on a v2 image with a snapshot: the width is refused before
    the upgrade writes anything (qemu-img upgrades first, then refuses: a changed file)."""
    img, _ = _image(tmp_path, "compat=0.10")
    twin = Path(shutil.copy(img, tmp_path / "b.qcow2"))
    before = hash(img.read_bytes())
    assert main(["amend", "-o", "compat=1.1,refcount_bits=1", str(img)]) == 1
    assert "has a refcount of 2" in capsys.readouterr().err
    assert hash(img.read_bytes()) == before
    assert qemu.qemu_img("amend", "-o", "compat=1.1,refcount_bits=1", str(twin), check=False).returncode == 1
    assert qemu.info(twin)["format-specific"]["data"]["compat"] == "1.1"


def test_every_crash_leaves_old_or_new() -> None:
    """Each crash point of the header write. crashsim's Semantic holds no header feature
    bits, so the old and the new state look the same to it ("old"); the structural check
    and qemu-img check/info judge every state."""
    harness.assert_passes(harness.check(WORKLOADS["amend-lazy-refcounts"]), qjournal=("old",))


@pytest.mark.parametrize("name", ["amend-refcount-bits", "amend-compat", "amend-compat-zero"])
def test_every_crash_of_a_width_or_version_change_leaves_old_or_new(name: str) -> None:
    """Each crash point of the new structure's precommit writes, the header switch and the
    free of the old refcount structure (or of the version switch): the structural check
    and qemu-img check/info judge every state. Guest data and bitmaps are the same before
    and after, so crashsim's Semantic calls both sides "old"."""
    harness.assert_passes(harness.check(WORKLOADS[name]), qjournal=("old",))


# -- faults (the injector of qjournal/storage/faults.py, driven as tests/test_faults.py drives it)
def _zero_clusters_image(d: Path) -> Path:
    img = qemu.create(d / "zero.qcow2", "8M", "cluster_size=4096")
    qemu.qemu_io(img, "write -P 1 0 256k", "write -z 64k 16k", "write -z 1M 64k")
    qemu.qemu_img("snapshot", "-c", "s0", str(img))
    return img


FAULTED = {
    "refcount_bits=64": (lambda d: _image(d)[0], lambda img: amend_op.amend(img, "refcount_bits=64")),
    "compat=0.10 over zero clusters": (_zero_clusters_image, lambda img: amend_op.amend(img, "compat=0.10")),
    "resize --preallocation=full": (lambda d: _image(d)[0], lambda img: resize(img, 12 << 20, preallocation="full")),
}


@pytest.mark.parametrize("name", list(FAULTED))
def test_a_fault_at_any_event_leaves_the_old_state_or_the_new_one(tmp_path: Path, name: str) -> None:
    """Each write, flush and resize of the operation fails in turn (EIO on a disk that stays
    dead, ENOSPC once): a one-line error; after recovery the guest reads as before, the
    header is the old one (the new one allowed once the journal sync was reached), and
    qemu-img check finds no corruption."""
    make, op = FAULTED[name]
    base = make(tmp_path)
    before = Path(shutil.copy(base, tmp_path / "before.qcow2"))
    work = tmp_path / "work.qcow2"
    dry, error = faulted_run(base, work, op, [])
    assert error is None, error
    header = {"old": qemu.info(base)["format-specific"], "new": qemu.info(work)["format-specific"]}
    size = {"old": qemu.info(base)["virtual-size"], "new": qemu.info(work)["virtual-size"]}
    commit = next((i for i, o in enumerate(dry.trace) if o.event == JOURNAL_SYNC), len(dry.trace))
    where: dict[str, list[int]] = {}
    for i, o in enumerate(dry.trace):
        where.setdefault(o.event, []).append(i)
    failures = []
    for event, at in sorted(where.items()):
        for nth in picks(len(at)):
            for fault in (Fault(event, nth, errno.EIO, sticky=True), Fault(event, nth, errno.ENOSPC)):
                inj, error = faulted_run(base, work, op, [fault])
                what = f"{name}: {fault}"
                if error is None or "\n" in str(error) or inj.fired != [fault]:
                    failures.append(f"{what}: fired {inj.fired}, error {error!r}")
                    continue
                Image(work, "r+", take_locks=False).close()      # recovery
                allowed = ["old"] if at[nth - 1] < commit else ["old", "new"]
                got = [k for k in allowed if qemu.info(work)["format-specific"] == header[k]
                       and qemu.info(work)["virtual-size"] == size[k]]
                if not got:
                    failures.append(f"{what}: after recovery neither {' nor '.join(allowed)} ({error})")
                code, out = qemu.check(work)
                if code not in (0, 3) or out.get("corruptions"):
                    failures.append(f"{what}: qemu-img check exit {code}: {out} ({error})")
                if qemu.qemu_img("compare", str(work), str(before), check=False).returncode != 0:
                    failures.append(f"{what}: the guest reads differently ({error})")
    assert not failures, "\n".join(failures)


def test_compat_changes_with_a_backing_name_across_sectors(tmp_path: Path) -> None:
    """A 600-byte backing file name: the upgrade moves it after the longer header in
    several sector writes (the name copied first, then the header pointed at it, sector 0
    last), each checked to leave a cluster 0 a reader of either version parses."""
    d = tmp_path / ("d" * 200) / ("e" * 200) / ("f" * 190)
    d.mkdir(parents=True)
    base = qemu.create(d / "base.qcow2", "8M", "compat=0.10")
    qemu.qemu_io(base, "write -P 7 0 8M")
    img = qemu.create(tmp_path / "a.qcow2", "8M", "compat=0.10", f"backing_file={base}", "backing_fmt=qcow2")
    qemu.qemu_io(img, "write -P 1 0 1M")
    before = Path(shutil.copy(img, tmp_path / "before.qcow2"))
    twin = Path(shutil.copy(img, tmp_path / "b.qcow2"))
    for spec in ("compat=1.1", "compat=0.10"):
        assert main(["amend", "-o", spec, str(img)]) == 0
        qemu.qemu_img("amend", "-o", spec, str(twin))
        assert _info(img) == _info(twin), spec
        qemu.assert_clean(img)
        assert qemu.qemu_img("compare", str(img), str(before)).returncode == 0

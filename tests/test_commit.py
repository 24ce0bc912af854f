"""`qjournal commit` against `qemu-img commit`, on twin copies of the same chains.

Oracle: qemu-img (commit on the twin, compare, check, map) and qemu-io. Bitmaps: the
base's enabled bitmap after qjournal's commit holds the same dirty extents as after
qemu-img's. Crash states: crashsim's ``commit`` and ``commit-empty`` workloads, through
crashsim's harness.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import qemu
from crashsim import harness
from crashsim.workloads import WORKLOADS
from qjournal.cli import main


def chain(d: Path, *base_opts: str, raw_base: bool = False) -> tuple[Path, Path, Path]:
    """base <- mid <- top, each holding data of its own; top has a zero cluster over mid's data."""
    if raw_base:
        base = d / "base.raw"
        qemu.qemu_img("create", "-q", "-f", "raw", str(base), "4M")
        qemu.run("qemu-io", "-f", "raw", "-c", "write -P 7 3M 64k", str(base))
    else:
        base = qemu.create(d / "base.qcow2", "4M", *base_opts)
        if "compat=0.10" not in base_opts:
            qemu.qemu_img("bitmap", "--add", "-g", "4096", str(base), "b0")
        qemu.qemu_io(base, "write -P 7 3M 64k")
    fmt = "raw" if raw_base else "qcow2"
    mid, top = d / "mid.qcow2", d / "top.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", fmt, str(mid))
    qemu.qemu_io(mid, "write -P 2 2M 64k", "write -P 9 1M 128k")
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", str(top))
    qemu.qemu_io(top, "write -P 1 0 64k", "write -z 1M 64k", "write -P 5 3M 1000", "write -P 6 3997696 1000")
    return base, mid, top


def twin(d: Path, name: str, *base_opts: str, raw_base: bool = False) -> tuple[Path, Path, Path]:
    (d / name).mkdir()
    return chain(d / name, *base_opts, raw_base=raw_base)


def guest(p: Path, out: Path) -> bytes:
    qemu.qemu_img("convert", "-U", "-O", "raw", str(p), str(out))
    return out.read_bytes()


def dirty(p: Path, capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    capsys.readouterr()
    assert main(["bitmap", "--dump", "--output=json", str(p), "b0"]) == 0
    return list(json.loads(capsys.readouterr().out))


def allocated_in(p: Path) -> list[tuple[int, int]]:
    return [(e["start"], e["length"]) for e in json.loads(qemu.qemu_img("map", "--output=json", "-U", str(p)).stdout)
            if e["depth"] == 0 and e["present"]]


@pytest.mark.parametrize("opts", [(), ("compat=0.10",), ("cluster_size=512",), ("extended_l2=on",)],
                         ids=lambda o: ",".join(o) or "default")
def test_commit_into_backing_file_as_qemu_img(tmp_path: Path, opts: tuple[str, ...],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    base, mid, top = twin(tmp_path, "mine", *opts)
    qbase, qmid, qtop = twin(tmp_path, "theirs", *opts)
    seen = guest(top, tmp_path / "before.raw")
    assert main(["commit", str(top)]) == 0
    assert capsys.readouterr().out == qemu.qemu_img("commit", str(qtop)).stdout == "Image committed.\n"
    for p in (base, mid, top):
        qemu.assert_clean(p)
    assert guest(top, tmp_path / "after.raw") == seen
    assert guest(mid, tmp_path / "mid.raw") == guest(qmid, tmp_path / "qmid.raw")
    assert allocated_in(top) == allocated_in(qtop) == []          # emptied, as qemu-img empties it
    assert guest(base, tmp_path / "b.raw") == guest(qbase, tmp_path / "qb.raw")


def test_commit_b_writes_the_whole_chain_into_base_and_keeps_top(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    base, mid, top = twin(tmp_path, "mine")
    qbase, qmid, qtop = twin(tmp_path, "theirs")
    seen = guest(top, tmp_path / "before.raw")
    top_bytes, mid_bytes = hash(top.read_bytes()), hash(mid.read_bytes())
    assert main(["commit", "-b", str(base), str(top)]) == 0
    qemu.qemu_img("commit", "-b", str(qbase), str(qtop))
    assert hash(top.read_bytes()) == top_bytes and hash(mid.read_bytes()) == mid_bytes     # -b implies -d
    qemu.assert_clean(base)
    assert guest(base, tmp_path / "base.raw") == guest(qbase, tmp_path / "qbase.raw") == seen
    # The enabled bitmap of the base records what the commit wrote, as QEMU's does.
    assert dirty(base, capsys) == dirty(qbase, capsys)
    assert any(e["dirty"] for e in dirty(base, capsys))


def test_commit_d_keeps_the_overlay(tmp_path: Path) -> None:
    base, mid, top = chain(tmp_path)
    top_bytes = hash(top.read_bytes())
    assert main(["commit", "-d", "-q", str(top)]) == 0
    assert hash(top.read_bytes()) == top_bytes
    qemu.qemu_img("compare", "-U", str(top), str(mid))


def test_commit_into_a_raw_base(tmp_path: Path) -> None:
    base, mid, top = twin(tmp_path, "mine", raw_base=True)
    qbase, qmid, qtop = twin(tmp_path, "theirs", raw_base=True)
    assert main(["commit", "-b", str(base), str(top)]) == 0
    qemu.qemu_img("commit", "-b", str(qbase), str(qtop))
    assert hash(base.read_bytes()) == hash(qbase.read_bytes())


def test_a_smaller_base_grows_to_the_overlay(tmp_path: Path) -> None:
    base = qemu.create(tmp_path / "base.qcow2", "1M")
    top = tmp_path / "top.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top), "4M")
    qemu.qemu_io(top, "write -P 3 3M 64k")
    twin_dir = tmp_path / "t"
    twin_dir.mkdir()
    qbase, qtop = Path(shutil.copy(base, twin_dir)), Path(shutil.copy(top, twin_dir))
    assert main(["commit", str(top)]) == 0
    qemu.qemu_img("commit", str(qtop))
    assert qemu.info(base)["virtual-size"] == qemu.info(qbase)["virtual-size"] == 4 << 20
    qemu.assert_clean(base)
    assert guest(base, tmp_path / "a.raw") == guest(qbase, tmp_path / "b.raw")


def test_bad_input_is_refused_with_one_line_and_nothing_written(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    base, mid, top = twin(tmp_path, "mine")
    qbase, qmid, qtop = twin(tmp_path, "theirs")
    files = [base, mid, top]
    before = [hash(p.read_bytes()) for p in files]
    other = qemu.create(tmp_path / "other.qcow2", "4M")
    for args, theirs in ((["-b", str(other), str(top)], ["-b", str(other), str(qtop)]),   # a base not in the chain
                         (["-b", str(top), str(top)], ["-b", str(qtop), str(qtop)]),      # the image itself
                         ([str(base)], [str(qbase)]),                                     # no backing file
                         (["-f", "raw", str(top)], None)):
        capsys.readouterr()
        assert main(["commit", *args]) == 1, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("qjournal: "), err
        assert theirs is None or qemu.qemu_img("commit", *theirs, check=False).returncode == 1
        assert [hash(p.read_bytes()) for p in files] == before, args
    # A chain that loops (qemu-img rebase -u makes one): refused, nothing written.
    qemu.qemu_img("rebase", "-u", "-b", top.name, "-F", "qcow2", str(base))
    before = [hash(p.read_bytes()) for p in files]
    assert main(["commit", str(top)]) == 1
    assert "loops" in capsys.readouterr().err
    assert [hash(p.read_bytes()) for p in files] == before


@pytest.mark.parametrize("name", ["commit", "commit-empty"])
def test_every_crash_leaves_old_or_new(name: str) -> None:
    """Each crash point of the base's transaction and of the emptying: qjournal after
    recovery sees the old or the new state; QEMU (qemu-img check and info) no corruption."""
    harness.assert_passes(harness.check(WORKLOADS[name]))

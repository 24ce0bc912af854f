"""`qjournal amend` against `qemu-img amend`, on twin copies.

Oracle: qemu-img amend on the twin (the files must end byte-identical), qemu-img check,
and qemu-img's own refusals. Crash states: crashsim's ``amend-lazy-refcounts`` workload.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import qemu
from crashsim import harness
from crashsim.workloads import WORKLOADS
from qjournal.cli import main


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


def test_changes_not_implemented_are_refused_with_the_reason(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    img = qemu.create(tmp_path / "a.qcow2", "8M")
    before = hash(img.read_bytes())
    for spec in ("compat=0.10", "refcount_bits=64"):
        assert main(["amend", "-o", spec, str(img)]) == 1
        assert "not implemented" in capsys.readouterr().err
        assert hash(img.read_bytes()) == before


def test_every_crash_leaves_old_or_new() -> None:
    """Each crash point of the header write. crashsim's Semantic holds no header feature
    bits, so the old and the new state look the same to it ("old"); the structural check
    and qemu-img check/info judge every state."""
    harness.assert_passes(harness.check(WORKLOADS["amend-lazy-refcounts"]), qjournal=("old",))

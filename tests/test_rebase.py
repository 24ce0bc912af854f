"""`qjournal rebase` against `qemu-img rebase`, on twin copies.

Oracle: qemu-img (rebase on the twin, compare before/after, check, info) and qemu-io.
Crash states: crashsim's ``rebase`` workload (a rebase -u, then a safe rebase that copies
data in), through crashsim's harness.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import qemu
from crashsim import harness
from crashsim.workloads import WORKLOADS
import qjournal
from qjournal.cli import main
from qjournal.ops import rebase as rebase_op


def images(d: Path, *opts: str) -> tuple[Path, Path, Path]:
    """old <- img (data of its own over part of old's), and new, which differs from old."""
    old = qemu.create(d / "old.qcow2", "4M", *opts)
    qemu.qemu_io(old, "write -P 1 0 1M", "write -P 4 3M 4k")
    img = d / "img.qcow2"
    args = ["create", "-q", "-f", "qcow2", "-b", old.name, "-F", "qcow2"] + (["-o", ",".join(opts)] if opts else [])
    qemu.qemu_img(*args, str(img))
    qemu.qemu_io(img, "write -P 2 512k 64k", "write -P 5 1000000 700")
    new = qemu.create(d / "new.qcow2", "4M", *opts)
    qemu.qemu_io(new, "write -P 1 0 256k", "write -P 3 2M 64k")
    return old, img, new


def guest(p: Path, out: Path) -> bytes:
    qemu.qemu_img("convert", "-U", "-O", "raw", str(p), str(out))
    return out.read_bytes()


def backing(p: Path) -> tuple[object, object]:
    info = qemu.info(p)
    return info.get("backing-filename"), info.get("backing-filename-format")


@pytest.mark.parametrize("opts", [(), ("cluster_size=512",), ("extended_l2=on",), ("compat=0.10",)],
                         ids=lambda o: ",".join(o) or "default")
def test_safe_rebase_keeps_the_guest_data(tmp_path: Path, opts: tuple[str, ...]) -> None:
    old, img, new = images(tmp_path, *opts)
    seen = guest(img, tmp_path / "before.raw")
    assert main(["rebase", "-b", new.name, "-F", "qcow2", str(img)]) == 0
    qemu.assert_clean(img)
    assert backing(img) == ("new.qcow2", "qcow2")
    assert guest(img, tmp_path / "after.raw") == seen
    qemu.qemu_img("compare", "-U", str(img), str(tmp_path / "before.raw"))


def test_safe_rebase_onto_nothing_and_onto_raw(tmp_path: Path) -> None:
    old, img, new = images(tmp_path)
    seen = guest(img, tmp_path / "before.raw")
    raw = tmp_path / "new.raw"
    guest(new, raw)
    assert main(["rebase", "-b", raw.name, "-F", "raw", str(img)]) == 0
    assert backing(img) == ("new.raw", "raw")
    assert guest(img, tmp_path / "a.raw") == seen
    assert main(["rebase", "-b", "", str(img)]) == 0
    assert backing(img) == (None, None)
    assert guest(img, tmp_path / "b.raw") == seen
    qemu.assert_clean(img)


@pytest.mark.parametrize("name", ["new.qcow2", "a-much-longer-name-than-before/../new.qcow2", "n.qcow2"])
def test_unsafe_changes_only_the_header_as_qemu_img(tmp_path: Path, name: str) -> None:
    old, img, new = images(tmp_path)
    shutil.copy(new, tmp_path / "n.qcow2")
    (tmp_path / "a-much-longer-name-than-before").mkdir()
    twin = Path(shutil.copy(img, tmp_path / "twin.qcow2"))
    data = guest(img, tmp_path / "before.raw")
    assert main(["rebase", "-u", "-b", name, "-F", "qcow2", str(img)]) == 0
    qemu.qemu_img("rebase", "-u", "-b", name, "-F", "qcow2", str(twin))
    qemu.assert_clean(img)
    assert backing(img) == backing(twin) == (name, "qcow2")
    assert guest(img, tmp_path / "a.raw") == guest(twin, tmp_path / "b.raw") != data
    # Past the header cluster, nothing changed.
    cs = 65536
    assert hash(img.read_bytes()[cs:]) == hash(twin.read_bytes()[cs:])


def test_bad_input_is_refused_with_one_line_and_nothing_written(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    old, img, new = images(tmp_path)
    top = tmp_path / "top.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", img.name, "-F", "qcow2", str(top))
    files = [old, img, new, top]
    before = [hash(p.read_bytes()) for p in files]
    for args in (["-b", top.name, "-F", "qcow2", str(old)],        # a loop: old <- img <- top <- old
                 ["-u", "-b", top.name, "-F", "qcow2", str(old)],  # the same, unsafe (qemu-img makes it)
                 ["-b", img.name, "-F", "qcow2", str(img)],        # its own backing file
                 ["-b", new.name, str(img)],                       # no -F (qemu-img 7.2 requires it)
                 ["-b", "missing.qcow2", "-F", "qcow2", str(img)],
                 ["-b", new.name, "-F", "vmdk", str(img)],
                 ["-F", "qcow2", "-b", "", str(img)]):
        capsys.readouterr()
        assert main(["rebase", *args]) == 1, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("qjournal: "), (args, err)
        assert [hash(p.read_bytes()) for p in files] == before, args


def test_every_crash_leaves_old_or_new() -> None:
    """Each crash point of the two rebases: qjournal after recovery sees the old state or
    the new one; QEMU (qemu-img check and info) no corruption."""
    harness.assert_passes(harness.check(WORKLOADS["rebase"]))


def test_a_new_name_of_the_same_length_across_a_sector_boundary(tmp_path: Path) -> None:
    """The new name is written beside the old one and the header switches to it in one
    sector write; written in place it would tear across two sectors (the planner refuses
    that), so this rebase only works because the name moves."""
    old_name, new_name = ("o" * 100 + "/") * 6 + "b.qcow2", ("n" * 100 + "/") * 6 + "b.qcow2"
    for name in (old_name, new_name):
        (tmp_path / name).parent.mkdir(parents=True)
        qemu.create(tmp_path / name, "4M")
    img = tmp_path / "img.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", old_name, "-F", "qcow2", str(img))
    raw = img.read_bytes()
    at = raw.index(old_name.encode())
    assert at // 512 != (at + len(old_name) - 1) // 512       # the name straddles two sectors
    assert main(["rebase", "-u", "-b", new_name, "-F", "qcow2", str(img)]) == 0
    qemu.assert_clean(img)
    assert backing(img) == (new_name, "qcow2")


def test_a_safe_rebase_after_an_unsafe_one_in_the_same_open_image_reads_the_new_chain(tmp_path: Path) -> None:
    """The guest reader follows the backing file a transaction switched in: before, a safe
    rebase right after `rebase -u` on the same open image read the old (empty) chain and
    copied nothing, so the guest lost the backing file's data (found by crashsim's QEMU twin
    of the rebase workload)."""
    old, img, _ = images(tmp_path)
    twin = tmp_path / "twin.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", str(twin), "4M")
    qemu.qemu_io(twin, "write -P 2 512k 64k")
    shutil.copy(twin, tmp_path / "mine.qcow2")
    for rebase_cmds in (("rebase", "-u", "-b", old.name, "-F", "qcow2"), ("rebase", "-b", "")):
        qemu.qemu_img(*rebase_cmds, str(twin))
    with qjournal.open(tmp_path / "mine.qcow2", "r+") as mine:
        rebase_op.rebase(mine, old.name, "qcow2", unsafe=True)
        assert rebase_op.rebase(mine, "", None) > 0
    assert guest(tmp_path / "mine.qcow2", tmp_path / "a.raw") == guest(twin, tmp_path / "b.raw")

"""`qjournal compare` against `qemu-img compare`: same exit code, same lines, on the same pairs.

Oracle: qemu-img compare (its stdout and exit status) on images qemu-img and qemu-io made,
qcow2 and raw, with backing chains, zero clusters and different sizes.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import pytest

import qemu
from qjournal.cli import main

Pair = Callable[[Path], tuple[list[str], list[str]]]


def _img(d: Path, name: str, size: str, *io: str, opts: tuple[str, ...] = ()) -> Path:
    p = qemu.create(d / name, size, *opts)
    if io:
        qemu.qemu_io(p, *io)
    return p


def identical(d: Path) -> tuple[list[str], list[str]]:
    a = _img(d, "a.qcow2", "4M", "write -P 1 1M 64k")
    b = _img(d, "b.qcow2", "4M", "write -P 1 1M 64k")
    return [], [str(a), str(b)]


def differ_mid_sector(d: Path) -> tuple[list[str], list[str]]:
    a = _img(d, "a.qcow2", "4M", "write -P 1 1M 64k")
    b = _img(d, "b.qcow2", "4M", "write -P 1 1M 64k", "write -P 3 1000005 3")
    return [], [str(a), str(b)]


def data_against_nothing(d: Path) -> tuple[list[str], list[str]]:
    a = _img(d, "a.qcow2", "4M", "write -P 1 1M 64k")
    b = _img(d, "b.qcow2", "4M")
    return [], [str(a), str(b)]


def longer_tail_zero(d: Path) -> tuple[list[str], list[str]]:
    a = _img(d, "a.qcow2", "4M", "write -P 1 1M 64k")
    b = _img(d, "b.qcow2", "6M", "write -P 1 1M 64k", "write -P 0 5M 64k")
    return [], [str(a), str(b)]


def longer_tail_data(d: Path) -> tuple[list[str], list[str]]:
    a = _img(d, "a.qcow2", "4M", "write -P 1 1M 64k")
    b = _img(d, "b.qcow2", "6M", "write -P 1 1M 64k", "write -P 2 5M 3")
    return [], [str(b), str(a)]


def strict_sizes(d: Path) -> tuple[list[str], list[str]]:
    return ["-s"], longer_tail_zero(d)[1]


def strict_zero_vs_unallocated(d: Path) -> tuple[list[str], list[str]]:
    a = _img(d, "a.qcow2", "4M", "write -P 1 1M 64k")
    b = _img(d, "b.qcow2", "4M", "write -P 1 1M 64k", "write -z 0 64k")
    return ["-s"], [str(a), str(b)]


def zero_vs_unallocated(d: Path) -> tuple[list[str], list[str]]:
    return [], strict_zero_vs_unallocated(d)[1]


def against_raw(d: Path) -> tuple[list[str], list[str]]:
    a = _img(d, "a.qcow2", "4M", "write -P 1 1M 64k", "write -c -P 2 2M 64k", opts=("cluster_size=4096",))
    raw = d / "a.raw"
    qemu.qemu_img("convert", "-O", "raw", str(a), str(raw))
    return ["-F", "raw"], [str(a), str(raw)]


def raw_differs(d: Path) -> tuple[list[str], list[str]]:
    args, (a, raw) = against_raw(d)
    with open(raw, "r+b") as f:
        f.seek(2 * 1024 * 1024 + 700)
        f.write(b"x")
    return ["-f", "raw", "-F", "qcow2"], [raw, a]


def backing_chain(d: Path) -> tuple[list[str], list[str]]:
    base = _img(d, "base.qcow2", "4M", "write -P 1 0 1M")
    top = d / "top.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    qemu.qemu_io(top, "write -P 2 512k 4k")
    flat = _img(d, "flat.qcow2", "4M", "write -P 1 0 1M", "write -P 2 512k 4k")
    return [], [str(top), str(flat)]


def backing_chain_differs(d: Path) -> tuple[list[str], list[str]]:
    args, (top, flat) = backing_chain(d)
    qemu.qemu_io(flat, "write -P 9 768k 512")
    return [], [top, flat]


PAIRS: list[Pair] = [identical, differ_mid_sector, data_against_nothing, longer_tail_zero, longer_tail_data,
                     strict_sizes, strict_zero_vs_unallocated, zero_vs_unallocated, against_raw, raw_differs,
                     backing_chain, backing_chain_differs]


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p.__name__)
def test_same_exit_code_and_lines_as_qemu_img(tmp_path: Path, pair: Pair,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    opts, files = pair(tmp_path)
    before = [Path(f).read_bytes() for f in files]
    theirs = qemu.qemu_img("compare", "-U", *opts, *files, check=False)
    code = main(["compare", *opts, *files])
    assert (code, capsys.readouterr().out) == (theirs.returncode, theirs.stdout)
    assert [Path(f).read_bytes() for f in files] == before


def test_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _img(tmp_path, "a.qcow2", "1M")
    assert qemu.qemu_img("compare", str(a), str(tmp_path / "missing"), check=False).returncode == 2
    assert main(["compare", str(a), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err
    assert main(["compare", "-f", "vmdk", str(a), str(a)]) == 2
    assert "vmdk" in capsys.readouterr().err
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(a.read_bytes()[:50])
    assert main(["compare", "-f", "qcow2", str(bad), str(a)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_quiet_prints_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    opts, files = differ_mid_sector(tmp_path)
    assert main(["compare", "-q", *files]) == 1
    assert capsys.readouterr().out == ""


def test_ranges_both_sides_know_to_be_zero_are_not_read(tmp_path: Path) -> None:
    """Two empty 16 TiB disks: reading them would take hours; the allocation walk, well under
    a second per side. The one difference at the very end is still found."""
    a = qemu.create(tmp_path / "a.qcow2", "16T", "cluster_size=2M")
    b = qemu.create(tmp_path / "b.qcow2", "16T", "cluster_size=2M")
    qemu.qemu_io(b, f"write -P 7 {(16 << 40) - 512} 512")
    t = time.perf_counter()
    assert main(["compare", "-q", str(a), str(b)]) == 1
    assert main(["compare", "-q", str(a), str(a)]) == 0
    assert time.perf_counter() - t < 5

"""`qjournal measure` against `qemu-img measure`: the same output, human and JSON, on a
matrix of output options and sources (no source, raw, qcow2 partly allocated, with zero
clusters, compressed clusters, a backing chain, persistent bitmaps).

Oracle: qemu-img measure's stdout and exit status.
"""
from __future__ import annotations

from pathlib import Path

import pytest

import qemu
from qjournal.cli import main

OPTIONS = ["", "cluster_size=512", "cluster_size=4k,refcount_bits=1", "cluster_size=2M,refcount_bits=64",
           "extended_l2=on", "compat=0.10", "preallocation=metadata", "preallocation=falloc",
           "preallocation=full", "backing_file=x.qcow2,backing_fmt=qcow2", "lazy_refcounts=on,compression_type=zstd"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, ...]]:
    d = tmp_path_factory.mktemp("measure")
    part = qemu.create(d / "part.qcow2", "100M", "cluster_size=4096")
    qemu.qemu_io(part, "write -P 1 0 1M", "write -P 2 5000 3", "write -z 10M 1M", "write -c -P 3 20M 64k",
                 "write -P 4 99M 4k")
    bitmaps = qemu.create(d / "bitmaps.qcow2", "1G")
    for name, g in (("a", "64k"), ("long-name-" + "x" * 200, "512"), ("c", "2M")):
        qemu.qemu_img("bitmap", "--add", "-g", g, str(bitmaps), name)
    qemu.qemu_io(bitmaps, "write -P 1 300M 3M")
    top = d / "top.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", str(part), "-F", "qcow2", str(top))
    qemu.qemu_io(top, "write -P 5 50M 100k")
    v2 = qemu.create(d / "v2.qcow2", "10M", "compat=0.10")
    qemu.qemu_io(v2, "write -P 6 1M 1M")
    raw = d / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(50 << 20)
        f.seek(3 << 20)
        f.write(b"r" * 70000)
    odd = d / "odd.raw"
    odd.write_bytes(b"o" * 1001)
    return {"size-1G": ("--size", "1G"), "size-1001": ("--size", "1001"), "size-0": ("--size", "0"),
            "partly-allocated": (str(part),), "bitmaps": (str(bitmaps),), "backing-chain": (str(top),),
            "v2": (str(v2),), "raw": (str(raw),), "raw-odd-size": (str(odd),),
            "qcow2-read-as-raw": ("-f", "raw", str(part))}


@pytest.mark.parametrize("source", ["size-1G", "size-1001", "size-0", "partly-allocated", "bitmaps",
                                    "backing-chain", "v2", "raw", "raw-odd-size", "qcow2-read-as-raw"])
def test_qcow2_output_matches_qemu_img(sources: dict[str, tuple[str, ...]], source: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    for opts in OPTIONS:
        for output in ("human", "json") if opts in ("", "compat=0.10", "cluster_size=512") else ("human",):
            args = ["measure", f"--output={output}", "-O", "qcow2", *(["-o", opts] if opts else []),
                    *sources[source]]
            theirs = qemu.qemu_img(*args)
            assert main(args) == 0, (args, capsys.readouterr().err)
            assert capsys.readouterr().out == theirs.stdout, args


@pytest.mark.parametrize("args", [("--size", "1001"), ("--size", "5G", "-o", "preallocation=full"), ("RAW",),
                                  ("QCOW2",), ("--output=json", "QCOW2")])
def test_raw_output_and_the_default_format_match_qemu_img(sources: dict[str, tuple[str, ...]], args: tuple[str, ...],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    real = [{"RAW": sources["raw"][0], "QCOW2": sources["partly-allocated"][0]}.get(a, a) for a in args]
    for extra in ([], ["-O", "raw"]):
        theirs = qemu.qemu_img("measure", *extra, *real)
        assert main(["measure", *extra, *real]) == 0
        assert capsys.readouterr().out == theirs.stdout


@pytest.mark.parametrize("args", [
    ("--size", "1G", "SRC"),                          # both
    (),                                               # neither
    ("-O", "qcow2", "-o", "foo=1", "--size", "1G"),   # unknown option
    ("-O", "qcow2", "-o", "cluster_size=3k", "--size", "1G"),
    ("-O", "qcow2", "-o", "extended_l2=on,cluster_size=1k", "--size", "1G"),
    ("-O", "qcow2", "-o", "preallocation=bogus", "--size", "1G"),
    ("-O", "raw", "-o", "cluster_size=4k", "--size", "1G"),
    ("-O", "vmdk", "--size", "1G"),
    ("-O", "qcow2", "MISSING"),
])
def test_bad_input_is_one_line_and_exit_1_as_qemu_img(sources: dict[str, tuple[str, ...]], args: tuple[str, ...],
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    real = [{"SRC": sources["raw"][0], "MISSING": str(tmp_path / "missing")}.get(a, a) for a in args]
    assert qemu.qemu_img("measure", *real, check=False).returncode == 1
    assert main(["measure", *real]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("qjournal: ")

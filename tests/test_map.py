"""`qjournal map` and `qjournal.mapping.map_image` against `qemu-img map`.

Oracle: `qemu-img map` (QEMU 7.2), JSON and human, run from the image's folder on the
same images (the matrix of test_guest_read.py: every cluster size, extended L2, v2,
zstd, metadata preallocation, data files, qcow2 and raw backing files, a chain of three).
The JSON text must be identical, line for line; so must the human output, including
qemu-img's refusal of compressed clusters.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings

import qjournal
from qjournal.read.mapping import map_image
from test_guest_read import (CASES, PROPERTY_EXAMPLES, RANDOM_IMAGE, Layer, build, chdir, qj, random_image,
                             run)

MiB = 1 << 20


def qemu_map(img: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "map", *args, img.name], cwd=img.parent, capture_output=True, text=True)


def ours(img: Path, *args: str) -> tuple[int, str, str]:
    with chdir(img.parent):
        return qj("map", *args, img.name)


class TestJson:
    @pytest.mark.parametrize("name", CASES)
    def test_same_text(self, name: str, images: dict[str, Path]) -> None:
        theirs = qemu_map(images[name], "--output=json")
        assert theirs.returncode == 0, theirs.stderr
        assert ours(images[name], "--output=json") == (0, theirs.stdout, "")

    @pytest.mark.parametrize("name", ["backing-raw-shorter", "chain-of-three", "extended-l2", "data-file-raw"])
    def test_library_returns_the_same_entries(self, name: str, images: dict[str, Path]) -> None:
        with qjournal.open(images[name]) as img:
            assert map_image(img) == json.loads(qemu_map(images[name], "--output=json").stdout)

    @pytest.mark.parametrize("start, length", [("0", "1"), ("1000", "300k"), ("3M", "9M"), ("7M", None),
                                               ("16M", None), ("100M", "1M")])
    def test_start_offset_and_max_length(self, start: str, length: str | None, images: dict[str, Path]) -> None:
        args = ["--output=json", f"--start-offset={start}"] + ([f"--max-length={length}"] if length else [])
        for name in ("chain-of-three", "cluster-512"):
            theirs = qemu_map(images[name], *args)
            assert ours(images[name], *args) == (0, theirs.stdout, ""), name

    def test_empty_disk(self, tmp_path: Path) -> None:
        img = build(tmp_path, [Layer("qcow2", 0)])
        for output in ("json", "human"):
            assert ours(img, f"--output={output}") == (0, qemu_map(img, f"--output={output}").stdout, "")

    def test_encrypted_clusters_have_no_offset(self, tmp_path: Path) -> None:
        secret, opts = "secret,id=s0,data=123456", "driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=s0"
        run(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "--object", secret, "-o",
            "encrypt.format=aes,encrypt.key-secret=s0", "enc.qcow2", "4M")
        run(tmp_path, "qemu-io", "--object", secret, "--image-opts", "-c", "write -P 1 0 64k", "-c",
            "write -z 1M 64k", opts)
        theirs = run(tmp_path, "qemu-img", "map", "--output=json", "--object", secret, "--image-opts", opts)
        assert ours(tmp_path / "enc.qcow2", "--output=json") == (0, theirs, "")


class TestHuman:
    @pytest.mark.parametrize("name", CASES)
    def test_same_text_or_same_refusal(self, name: str, images: dict[str, Path]) -> None:
        theirs = qemu_map(images[name])
        code, out, err = ours(images[name])
        assert (code, out) == (theirs.returncode, theirs.stdout)
        if code:
            assert "compressed clusters" in theirs.stderr
            assert err.startswith("qjournal: File contains external, encrypted or compressed clusters.")
            assert err.count("\n") == 1
        else:
            assert err == ""

    def test_absolute_names(self, images: dict[str, Path]) -> None:
        """Files are named as QEMU names them: the image as given, the others beside it."""
        img = images["backing-raw-shorter"]
        theirs = subprocess.run(["qemu-img", "map", str(img)], capture_output=True, text=True)
        assert qj("map", str(img)) == (0, theirs.stdout, "")
        assert str(img.parent / "l0.raw") in theirs.stdout


def test_a_bigger_disk_maps_quickly(tmp_path: Path) -> None:
    """16 TiB with data spread over it: the map walks only the L2 tables that exist."""
    cmds = tuple(f"write -P {i} {i * 97 * 1024 ** 3 + i * 4096} 128k" for i in range(1, 100))
    img = build(tmp_path, [Layer("qcow2", 16 << 40, "", cmds)])
    theirs = qemu_map(img, "--output=json")
    assert ours(img, "--output=json") == (0, theirs.stdout, "")


@settings(max_examples=PROPERTY_EXAMPLES)
@given(**RANDOM_IMAGE)
def test_random_qemu_writes_map_alike(config: str, backing: bool, ops: list[tuple[str, int, int, int]],
                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    img = random_image(tmp_path_factory.mktemp("prop"), config, backing, ops)
    for output in ("json", "human"):
        theirs = qemu_map(img, f"--output={output}")
        code, out, _ = ours(img, f"--output={output}")
        assert (code, out) == (theirs.returncode, theirs.stdout), output

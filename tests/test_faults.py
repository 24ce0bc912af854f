"""A full disk is an error, never a killed process or a damaged image.

Oracle: qemu-img check and qemu-io on the image afterwards. The disk is made full for
one process by RLIMIT_FSIZE (with SIGXFSZ ignored, a write past the limit fails with
EFBIG, as one on a full file system fails with ENOSPC).
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

import qemu

CLI = "import sys; from qjournal.cli import main; sys.exit(main(sys.argv[1:]))"
LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from qjournal.cli import main
sys.exit(main(sys.argv[1:]))
"""


def limited(limit: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", LIMITED.format(limit=limit), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [
    ["write", "{img}", "0", "-P", "0x66", "8M"],         # guest data into new clusters
    ["bitmap", "--add", "-g", "512", "{img}", "fine"],    # new bitmap tables and directory
    ["resize", "{img}", "+1G"],                          # a new L1 table
])
def test_file_size_limit_is_an_error_and_the_image_keeps_its_state(tmp_path: Path, args: list[str]) -> None:
    img = qemu.create(tmp_path / "a.qcow2", "64M", "cluster_size=4096")
    qemu.qemu_io(img, "write -P 0x11 0 1M")
    qemu.qemu_img("bitmap", "--add", str(img), "b0")
    before = (tmp_path / "a.raw")
    qemu.qemu_img("convert", "-O", "raw", str(img), str(before))
    size = img.stat().st_size
    res = limited(size + 8192, *[a.format(img=img) for a in args])
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("qjournal: "), res.stderr
    assert "Traceback" not in res.stderr
    code, out = qemu.check(img)
    assert code in (0, 3) and not out.get("corruptions"), out     # clean, or leaks only
    after = tmp_path / "b.raw"
    qemu.qemu_img("convert", "-U", "-O", "raw", str(img), str(after))
    assert after.read_bytes() == before.read_bytes()
    assert [b["name"] for b in qemu.bitmaps(img)] == ["b0"]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of the test's own (CI runs as root, which may mount one)."""
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=True)


def test_full_file_system_is_an_error_not_sigbus(small_fs: Path) -> None:
    """An in-place write into a page the file system has no block for (a hole in a data
    cluster) on a full file system: pwrite fails with ENOSPC; a store into the map would
    have killed the process with SIGBUS."""
    img = qemu.create(small_fs / "a.qcow2", "16M", "cluster_size=65536")
    qemu.qemu_io(img, "write -P 0x11 0 1M")
    host = int(json.loads(qemu.qemu_img("map", "--output=json", str(img)).stdout)[0]["offset"])
    # The second 4 KiB of guest cluster 0 becomes a hole (it reads as zeros).
    fallocate = subprocess.run(["fallocate", "--punch-hole", "--keep-size", "-o", str(host + 4096), "-l", "4096",
                                str(img)], capture_output=True, text=True)
    assert fallocate.returncode == 0, fallocate.stderr
    filler = small_fs / "filler"
    with open(filler, "wb", buffering=0) as f:     # fill the file system
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\xff" * 4096)
    image = img.read_bytes()
    res = subprocess.run([sys.executable, "-c", CLI, "write", str(img), "4096", "-P", "0x22", "512"],
                         capture_output=True, text=True, timeout=60)
    if res.returncode == 0:
        qemu.qemu_io(img, "read -P 0x22 4096 512", read_only=True)    # the journal had room after all
    else:
        assert res.returncode == 1 and res.stderr.startswith("qjournal: ") and res.stderr.count("\n") == 1, \
            (res.returncode, res.stderr)
        assert img.read_bytes() == image
    filler.unlink()
    code, out = qemu.check(img)
    assert code == 0, out
    qemu.qemu_io(img, "read -P 0x11 64k 960k", read_only=True)

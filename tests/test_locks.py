"""QEMU's image locks: qjournal and a running QEMU never write one image at the same time."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

import qemu
import qjournal


def _serve(img: Path, sock: Path, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["qemu-nbd", "-t", "-k", str(sock), "-f", "qcow2", *extra, str(img)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        if sock.exists():
            return proc
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("qemu-nbd did not start")


def test_qjournal_refuses_an_image_qemu_writes(tmp_path: Path) -> None:
    img = qemu.create(tmp_path / "l.qcow2", "64M")
    proc = _serve(img, tmp_path / "s")
    try:
        with pytest.raises(qjournal.LockError, match="lock"):
            qjournal.open(img, "r+")
        with pytest.raises(qjournal.LockError):
            qjournal.open(img, "r")  # qemu-nbd does not share write: a consistent reader is refused too
    finally:
        proc.terminate()
        proc.wait()
    with qjournal.open(img, "r+") as q:
        q.bitmaps.add("after")


def test_qjournal_reads_beside_a_read_only_qemu(tmp_path: Path) -> None:
    img = qemu.create(tmp_path / "l.qcow2", "64M")
    proc = _serve(img, tmp_path / "s", "-r")
    try:
        with qjournal.open(img, "r") as q:
            assert q.info().virtual_size == 64 << 20
        with pytest.raises(qjournal.LockError):
            qjournal.open(img, "r+")
    finally:
        proc.terminate()
        proc.wait()


def test_qemu_refuses_an_image_qjournal_holds(tmp_path: Path) -> None:
    img = qemu.create(tmp_path / "l.qcow2", "64M")
    with qjournal.open(img, "r+"):
        res = qemu.run("qemu-io", "-f", "qcow2", "-c", "write 0 4k", str(img), check=False)
        assert "lock" in (res.stdout + res.stderr), res
        res = qemu.qemu_img("info", str(img), check=False)
        assert res.returncode != 0 and "lock" in res.stderr
        assert qemu.qemu_img("info", "-U", str(img)).returncode == 0
    assert not os.path.exists(str(img) + ".lock")
    qemu.qemu_io(img, "write 0 4k")

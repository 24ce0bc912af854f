"""The oracle: real qemu-img, qemu-io and qemu-nbd, run as subprocesses."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qjournal.storage.lock import writer_present


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("qemu-img", *args, check=check)


def qemu_io(path: str | Path, *commands: str, read_only: bool = False) -> str:
    args = ["qemu-io", "-f", "qcow2"] + (["-r"] if read_only else [])
    for c in commands:
        args += ["-c", c]
    res = run(*args, str(path))
    if "error" in res.stdout.lower() or "failed" in res.stdout.lower() or "Pattern verification failed" in res.stdout:
        raise AssertionError(f"qemu-io {commands}: {res.stdout}{res.stderr}")
    return res.stdout


def info(path: str | Path) -> dict[str, Any]:
    return json.loads(qemu_img("info", "--output=json", "-U", str(path)).stdout)


def check(path: str | Path) -> tuple[int, dict[str, Any]]:
    res = qemu_img("check", "--output=json", str(path), check=False)
    try:
        return res.returncode, json.loads(res.stdout)
    except json.JSONDecodeError:
        return res.returncode, {"error": res.stderr.strip()}


def assert_clean(path: str | Path) -> dict[str, Any]:
    code, out = check(path)
    assert code == 0, f"qemu-img check {path}: exit {code}: {out}"
    assert not out.get("leaks") and not out.get("corruptions"), out
    return out


def map_layout(path: str | Path) -> list[tuple[int, int, bool, bool]]:
    """(start, length, present, data) of each guest extent of ``qemu-img map``, adjacent ones
    with the same flags merged (host offsets and the file-level zero flag left out: they
    depend on where clusters were placed)."""
    out: list[tuple[int, int, bool, bool]] = []
    for e in json.loads(qemu_img("map", "--output=json", str(path)).stdout):
        key = (e["present"], e["data"])
        if out and out[-1][2:] == key and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], *key)
        else:
            out.append((e["start"], e["length"], *key))
    return out


def bitmaps(path: str | Path) -> list[dict[str, Any]]:
    return info(path)["format-specific"]["data"].get("bitmaps", [])


def create(path: str | Path, size: str = "1G", *opts: str) -> Path:
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    qemu_img(*args, str(path), size)
    return Path(path)


def create_encrypted(path: str | Path, size: str, fmt: str = "luks", iter_time: int = 10) -> Path:
    """An encrypted image (secret ``pw``). For LUKS, qemu-img 7.2 first times 32768 PBKDF2
    rounds and fails ("Unable to get accurate CPU usage") when the thread's CPU time has
    not moved yet, which with SHA-256 was almost every other run here (a race the QEMU list
    knows). With SHA-512 those rounds outlast a scheduler tick; and an attempt refused for
    that reason alone is made again."""
    opts = f"encrypt.format={fmt},encrypt.key-secret=sec0"
    if fmt == "luks":
        opts += f",encrypt.iter-time={iter_time},encrypt.hash-alg=sha512"
    for _ in range(10):
        res = qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=pw", "-o", opts,
                       str(path), size, check=False)
        if "Unable to get accurate CPU usage" not in res.stderr:
            break
    assert res.returncode == 0, res.stderr
    return Path(path)


def nbd_dirty_extents(path: str | Path, bitmap: str) -> list[tuple[int, int]]:
    """The dirty extents of ``bitmap`` as qemu-nbd -B exports them (via qemu-img map)."""
    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "nbd.sock")
        proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-k", sock, "-f", "qcow2", "-B", bitmap, str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(200):
                if os.path.exists(sock):
                    try:
                        s = socket.socket(socket.AF_UNIX)
                        s.connect(sock)
                        s.close()
                        break
                    except OSError:
                        pass
                if proc.poll() is not None:
                    raise AssertionError(f"qemu-nbd failed: {proc.stderr.read() if proc.stderr else ''}")
                time.sleep(0.02)
            res = qemu_img("map", "--output=json", "--image-opts",
                           f"driver=nbd,server.type=unix,server.path={sock},"
                           f"x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}")
        finally:
            proc.terminate()
            proc.wait()
    out: list[tuple[int, int]] = []
    for e in json.loads(res.stdout):
        if not e["data"]:
            if out and out[-1][0] + out[-1][1] == e["start"]:
                out[-1] = (out[-1][0], out[-1][1] + e["length"])
            else:
                out.append((e["start"], e["length"]))
    return out


@contextmanager
def held_for_writing(path: str | Path) -> Iterator[None]:
    """qemu-io holding ``path`` open for writing (with its locks taken) for the ``with`` body.

    Waits (up to a minute: a loaded machine may take seconds to start qemu-io) until
    the write lock byte is held. The probe only queries the lock: a probe that takes
    locks, such as ``qemu-img info``, can make qemu-io's own open fail when the two
    overlap, and then neither holds the image."""
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", "-c", "sleep 600000", str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not writer_present(str(path)):
            assert holder.poll() is None, "qemu-io exited before it locked the image"
            assert time.monotonic() < deadline, "qemu-io never locked the image"
            time.sleep(0.02)
        yield
    finally:
        holder.kill()
        holder.wait()

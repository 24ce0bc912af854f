"""Start-up: ``qjournal info`` of a small image, the whole command against the whole peer.

``info`` reads one cluster and prints a few lines, so its time is start-up: the
interpreter, the imports and the parser. The peer is ``qemu-img info`` plus a bare
``python3 -c pass`` (the same interpreter, in the same environment), run one after the
other in each round: Python's own start is a floor no Python command can go under, and
the goal is at most twice the two together.

The image is a 64 MiB qcow2 image made by qemu-img with 64 KiB of data and one
internal snapshot (so the snapshot table is read too). ``verify`` compares
``qjournal info --output=json`` with ``qemu-img info --output=json``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .harness import PROJECT_ROOT, Benchmark, Fixtures, benchmark, qemu_img

PYTHON = sys.executable


def _build(path: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", str(path)], check=True,
                   capture_output=True)
    qemu_img("snapshot", "-c", "snap1", path)


@benchmark("info", goal=2.0)
class Info(Benchmark):
    """qjournal info of a small image vs qemu-img info + python3 -c pass (whole processes)"""

    def template(self, fx: Fixtures) -> Path:
        return fx.image("small-64M-snapshot", _build)

    def ours_command(self, image: Path) -> list[str]:
        return [PYTHON, "-m", "qjournal", "info", str(image)]

    def peers(self, image: Path) -> list[list[str]]:
        return [["qemu-img", "info", str(image)], [PYTHON, "-c", "pass"]]

    def verify(self, ours_image: Path, peer_image: Path) -> None:
        res = subprocess.run([PYTHON, "-m", "qjournal", "info", "--output=json", str(ours_image)],
                             capture_output=True, text=True, check=True,
                             env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))
        ours, theirs = json.loads(res.stdout), json.loads(qemu_img("info", "--output=json", ours_image))
        for key in ("virtual-size", "cluster-size", "snapshots", "format-specific"):
            assert ours[key] == theirs[key], f"info: {key}: {ours[key]!r} != {theirs[key]!r}"

"""check: ``qjournal check`` against ``qemu-img check`` on 1 GiB allocated in 4 KiB clusters.

The template is io.py's ``random-1G-4k`` image (1 GiB of seeded random bytes made by
``qemu-img convert -o cluster_size=4k``: 262,144 data clusters in 512 L2 tables), shared
with ``io-read-4k`` when both run. Ours is the library call, opening the image read-only
and checking it (:func:`qjournal.check.check`); the peer is ``qemu-img check IMAGE``, a
whole process. Goal: at most 2.0x.

``verify`` compares ours' counters with ``qemu-img check --output=json``'s.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .harness import Benchmark, Fixtures, benchmark
from .io import build

KEYS = ("check-errors", "corruptions", "leaks", "total-clusters", "allocated-clusters",
        "fragmented-clusters", "compressed-clusters", "image-end-offset")


def run_check(image: Path) -> dict[str, object]:
    import qjournal
    from qjournal.ops.check import check
    with qjournal.open(image) as img:
        return check(img).to_json()


@benchmark("check-4k", goal=2.0)
class Check4k(Benchmark):
    """check of 1 GiB allocated in 4 KiB clusters (262,144 clusters), vs qemu-img check"""

    def template(self, fx: Fixtures) -> Path:
        return fx.image("random-1G-4k", lambda p: build(p, "4k"))

    def ours(self, image: Path) -> None:
        run_check(image)

    def peer(self, image: Path) -> list[str]:
        return ["qemu-img", "check", str(image)]

    def verify(self, ours_image: Path, peer_image: Path) -> None:
        mine = run_check(ours_image)
        res = subprocess.run(["qemu-img", "check", "--output=json", str(peer_image)], capture_output=True,
                             text=True, check=False)
        theirs = json.loads(res.stdout)
        got = {k: mine.get(k, 0) for k in KEYS}
        want = {k: theirs.get(k, 0) for k in KEYS}
        assert got == want, f"qjournal check {got} != qemu-img check {want}"

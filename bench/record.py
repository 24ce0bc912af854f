"""crashsim record: what recording a real QEMU command over NBD costs.

- ``crashsim-record``: ``qemu-io -c "write -P 1 0 64M"`` on an empty 64 MiB image,
  recorded (ours: :func:`crashsim.nbdrecord.record` in-process: the image copied with
  spare room, nbdkit started, the command run over NBD with every request appended to
  the trace, nbdkit stopped, the trace finished) against the same command on the file
  (the peer). Goal: at most 3x. ``verify`` checks that the recorded final image is
  byte for byte the peer's.

``python -m bench.record`` prints the ratio of the medians of 3 rounds, without the
harness.

crashsim is imported inside the functions that use it, so that ``--list`` works even
while it does not import.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .harness import Benchmark, Fixtures, benchmark, qemu_img, run_timed

WRITE = "write -P 1 0 64M"
GOAL = 3.0


def _trace_of(image: Path) -> Path:
    return image.with_name(image.name + ".trace")


def _record(image: Path) -> Any:
    from crashsim.nbdrecord import record
    return record(image, ["qemu-io", "--image-opts", "{nbd}", "-c", WRITE], _trace_of(image), spare=128 << 20)


def _peer(image: Path) -> list[str]:
    return ["qemu-io", "-f", "qcow2", "-c", WRITE, str(image)]


@benchmark("crashsim-record", goal=GOAL)
class CrashsimRecord(Benchmark):
    """qemu-io write 64M recorded over NBD by crashsim record vs the same command on the file."""

    def template(self, fx: Fixtures) -> Path:
        return fx.image("empty-64m", lambda path: qemu_img("create", "-q", "-f", "qcow2", path, "64M") and None)

    def ours(self, image: Path) -> None:
        _record(image)

    def peer(self, image: Path) -> list[str]:
        return _peer(image)

    def verify(self, ours_image: Path, peer_image: Path) -> None:
        from crashsim.trace import final_image, load
        t = load(_trace_of(ours_image))
        assert final_image(t) == peer_image.read_bytes(), "the recorded image is not what qemu-io leaves"
        assert t.counts().get("write", 0) >= 2, t.counts()


def main() -> int:
    """Three rounds of each side, one after the other; the ratio of the medians against the goal."""
    ours, peer = [], []
    with tempfile.TemporaryDirectory(prefix="bench-record-") as d:
        for i in range(3):
            for side, out in (("ours", ours), ("peer", peer)):
                image = Path(d) / f"{side}-{i}.qcow2"
                qemu_img("create", "-q", "-f", "qcow2", image, "64M")
                if side == "ours":
                    t0 = time.perf_counter()
                    _record(image)
                    out.append(time.perf_counter() - t0)
                else:
                    out.append(run_timed(_peer(image)))
    ratio = statistics.median(ours) / statistics.median(peer)
    print(f"crashsim record of qemu-io -c '{WRITE}': {statistics.median(ours):.3f} s, unrecorded "
          f"{statistics.median(peer):.3f} s: ratio {ratio:.2f} (goal <= {GOAL:.0f}): "
          f"{'PASS' if ratio <= GOAL else 'MISS'}")
    return 0 if ratio <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())

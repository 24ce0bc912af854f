"""crashsim: how fast crash states are checked, with and without the qemu-img oracle.

- ``crashsim-state``: one crash state of ``bitmap add`` (a committed transaction whose
  steps did not all reach the disk) checked by crashsim in-process (recovery on a copy,
  a second recovery, ``qjournal.check`` and the semantic state of both views), against
  the qemu-img oracle on the same image file (``qemu-img check`` then ``qemu-img info``).
  States per second without the oracle are ``1 / ours``, with it ``1 / (ours + peer)``.
- ``crashsim-run-all``: every built-in workload but the negative controls, every
  strategy, ``--k 2 --oracle none`` on two worker processes; ours is the library call,
  the peer the same run through the ``crashsim`` command (interpreter start, imports
  and base images included). The goal is under 60 s on 2 cores: ``python -m
  bench.crashsim`` prints the figures against it.

crashsim is imported inside the functions that use it, so that ``--list`` works even
while it does not import.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, ClassVar

from .harness import Benchmark, Fixtures, benchmark

RUN_ALL = ["run", "all", "--k", "2", "--oracle", "none", "--jobs", "2", "-q"]
GOAL_RUN_ALL_S = 60.0


def _state() -> tuple[dict[str, bytes], Any]:
    """A state of ``bitmap add`` after the commit, with the image steps in flight: the image
    and journal bytes, and what the crash point allows."""
    from crashsim.model import Options
    from crashsim.runner import prepare
    from crashsim.workloads import WORKLOADS
    p = prepare(WORKLOADS["add"], Options(strategies=("subset",), oracle="none", seed=0))
    commit = next(e.index for e in p.entries if e.kind == "mark" and e.name == "commit")
    c = next(c for c in p.cands if c.spec.point > commit and c.spec.choices)
    return p.tl.materialize(c.spec), p.ph.expects[c.phase]


@benchmark("crashsim-state", goal=1.0)
class CrashsimState(Benchmark):
    """Check one crash state: crashsim in-process vs the qemu-img oracle (check + info)."""

    _cache: ClassVar[dict[str, Any]] = {}

    @classmethod
    def _files(cls) -> tuple[dict[str, bytes], Any]:
        if "state" not in cls._cache:
            cls._cache["state"] = _state()
        return cls._cache["state"]     # type: ignore[no-any-return]

    def template(self, fx: Fixtures) -> Path:
        def build(path: Path) -> None:
            path.write_bytes(self._files()[0]["image"])
        return fx.image("crashsim-add-state", build)

    def ours(self, image: Path) -> None:
        from crashsim.checks import judge
        files, expect = self._files()
        j = judge({"image": image.read_bytes(), "journal": files["journal"]}, expect)
        assert j.ok and j.recovered, j.explanation

    def peer(self, image: Path) -> list[str]:
        # qemu-img check exits 3 for leaks, which this state may have: a crash mid-operation.
        return ["sh", "-c", f"qemu-img check --output=json '{image}' >/dev/null; c=$?; "
                            f"qemu-img info --output=json -U '{image}' >/dev/null && [ $c -eq 0 -o $c -eq 3 ]"]


@benchmark("crashsim-run-all", goal=1.2)
class CrashsimRunAll(Benchmark):
    """crashsim run all --k 2 --oracle none, 2 workers: library call vs the command."""

    def template(self, fx: Fixtures) -> Path:
        def build(path: Path) -> None:
            path.write_bytes(b"")       # the workloads make their own images
        return fx.image("crashsim-none", build)

    def ours(self, image: Path) -> None:
        from crashsim.model import Options
        from crashsim.runner import run
        from crashsim.workloads import WORKLOADS
        run([w for w in WORKLOADS.values() if not w.expect_failure], Options(k=2, oracle="none", jobs=2))

    def peer(self, image: Path) -> list[str]:
        # Exit 1 means some state was not allowed: still a complete run, which is what is timed.
        cmd = " ".join([sys.executable, "-m", "crashsim", *RUN_ALL])
        return ["sh", "-c", f"{cmd} >/dev/null; test $? -le 1"]


def main() -> int:
    """The three figures: states/s without and with the oracle, and the wall time of run all."""
    import subprocess
    from crashsim.model import Options
    from crashsim.runner import run
    from crashsim.workloads import WORKLOADS
    real = [w for w in WORKLOADS.values() if not w.expect_failure]
    sample = [WORKLOADS[n] for n in ("add", "set-in-use", "transaction", "guest-write")]
    for oracle in ("none", "all"):
        res = run(sample, Options(oracle=oracle, jobs=2))
        print(f"{res.states} states of {len(sample)} workloads, oracle {oracle}: {res.seconds:.1f} s, "
              f"{res.states / res.seconds:.0f} states/s on 2 workers")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "crashsim", *RUN_ALL], check=False, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    res = run(real, Options(k=2, oracle="none", jobs=2))
    print(f"crashsim {' '.join(RUN_ALL)}: {wall:.1f} s wall ({res.states} states, goal < {GOAL_RUN_ALL_S:.0f} s): "
          f"{'PASS' if wall < GOAL_RUN_ALL_S else 'MISS'}")
    return 0 if wall < GOAL_RUN_ALL_S else 1


if __name__ == "__main__":
    sys.exit(main())

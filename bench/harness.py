"""The benchmark harness: registry, fixtures, timing, the table and the command line.

How a benchmark is measured, round by round:

1. The template image (built once per run, shared between benchmarks through
   :class:`Fixtures`) is copied twice with ``cp --sparse=always``, one copy per
   side, and each copy is fsynced, so neither side pays for the other's dirty
   pages and both start from the same bytes in the page cache. Only the image is
   copied: ours starts without a journal sidecar, as on an image qemu-img just
   made, and so pays for creating its journal every round.
2. Both sides run, ours first in even rounds and the peer first in odd ones
   (the warm-up is round 0): an even ``--rounds`` puts each side first equally
   often. It matters where the first run leaves the second less free memory
   (see 4.); after the table a note says when the count was uneven.
   Ours is the library call in this process, timed with ``time.perf_counter``
   after a ``gc.collect()``. The peer is the whole command, timed from just before
   ``Popen`` until it has exited and been reaped. A peer of several commands
   (``qemu-img info`` and a bare ``python3 -c pass``) runs them one after another
   and counts the sum; the table's notes give each one's median.
   A benchmark of the ``qjournal`` command itself (``ours_command``) times ours as
   a whole process too, the same way. Commands run with the project on
   ``PYTHONPATH`` and their bytecode cached in the work directory
   (``PYTHONPYCACHEPREFIX``, even when ``PYTHONDONTWRITEBYTECODE`` is set), as an
   installed package has it: the warm-up round compiles, the timed rounds do not.
3. After the first round (a warm-up round unless ``--warmup 0``), ``verify``
   checks that both sides did the same work.
4. The copies are deleted: in later rounds each as soon as its side has run, so
   that the second side of a round does not start with the first side's output
   (1 GiB for the write benchmarks) still in the page cache.
5. Just before each side runs, ``--warm`` MiB of memory (2 GiB by default) are
   written and freed (:func:`warm_memory`). This machine's memory is handed back to
   its host while it is free, and the first touch of such a page costs more than the
   work: without it, whichever side ran first after the copies paid up to 2 s more in
   about half the rounds (``read-cmd``: ours 0.49-2.51 s, the peer 0.33-1.70 s over
   six rounds; warmed, 0.48-0.67 s and 0.33-0.47 s).

Warm-up rounds are run and verified but not counted. The ratio is
median(ours) / median(peer); a benchmark passes when it is at most its goal.

A benchmark declared with a ``rate`` (``@benchmark("crc32c-whole", rate=4e9, nbytes=64 << 20)``)
is measured against a throughput, not a program: it has no peer process, and the peer
column shows the time that rate allows for ``nbytes``, the bytes one ``ours`` call
processes. The ratio is then at most 1.0 exactly when ours reaches the rate, and the
table is followed by ours' rate (bytes per second of the median call).

With ``--rss`` each side runs once more, untimed, on a fresh copy, under GNU
``time -f %M``: the peer as is (the largest of its commands), ours as a child
process (``python -m bench --child-ours NAME IMAGE``; a command benchmark's own
command), beside a child that only imports the same modules (the baseline). Not ``os.wait4`` on our own children: a process forked from
this one starts with a copy of its page tables, and the kernel counts that
copy's resident size into the child's peak, so every figure would be at least
this harness's own RSS. GNU time's child is forked from GNU time (about 1 MiB).
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import mmap
import os
import pkgutil
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence, TypeVar

import attrs

PACKAGE_ROOT = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_ROOT.parent
NOT_AREAS = {"harness", "__main__"}


class Benchmark:
    """One pair: ``ours`` (a library call) against ``peer`` (a command line) on the same image.

    Subclass it, decorate the subclass with :func:`benchmark`, and define:

    - ``template(fx)``: the image every round starts from; build it through
      ``fx.image(key, builder)`` so that benchmarks can share it;
    - ``ours(image)``: the library call, on a fresh copy of the template;
    - ``peer(image)``: the argv of the peer command, on another fresh copy (not
      for a benchmark declared with a ``rate``: it has no peer process);
    - ``verify(ours_image, peer_image)`` (optional): after the first round, raise
      ``AssertionError`` if the two sides did not leave the same result;
    - ``ours_command(image)`` (optional) instead of ``ours``: the argv of the
      ``qjournal`` command, timed as a whole process as the peer is;
    - ``peers(image)`` (optional) instead of ``peer``: several commands whose
      times add up to the peer's.

    ``ours`` may only use ``image`` and class attributes: ``--rss`` calls it in a
    child process on a fresh instance, without ``template``.
    """

    name: ClassVar[str] = ""
    goal: ClassVar[float] = 1.0
    rate: ClassVar[float | None] = None      # bytes/s the goal asks for, instead of a peer
    nbytes: ClassVar[int] = 0                # bytes one ``ours`` call processes (with ``rate``)

    @classmethod
    def rate_budget(cls) -> float | None:
        """Seconds the goal's ``rate`` allows for ``nbytes`` (None: measured against a peer)."""
        return None if cls.rate is None else cls.nbytes / cls.rate

    @classmethod
    def description(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def template(self, fx: "Fixtures") -> Path:
        raise NotImplementedError

    def ours(self, image: Path) -> None:
        raise NotImplementedError

    def peer(self, image: Path) -> list[str]:
        raise NotImplementedError

    def verify(self, ours_image: Path, peer_image: Path) -> None:
        """Raise ``AssertionError`` unless both sides did the same work (default: no check)."""

    def ours_command(self, image: Path) -> list[str] | None:
        """Ours as a whole process (argv), or None (the default): ours is the call ``ours(image)``."""
        return None

    def peers(self, image: Path) -> list[list[str]]:
        """The peer's commands, run one after another, their times summed (default: ``[peer(image)]``)."""
        return [self.peer(image)]


REGISTRY: dict[str, type[Benchmark]] = {}
B = TypeVar("B", bound=type[Benchmark])


def benchmark(name: str, *, goal: float = 1.0, rate: float | None = None, nbytes: int = 0) -> Callable[[B], B]:
    """Register a :class:`Benchmark` subclass as ``name``; it passes when ours/peer <= ``goal``.

    With ``rate`` (bytes/s) the peer is no process but the time ``nbytes`` take at that
    rate; ``goal`` then stays 1.0: the benchmark passes when ours reaches the rate.
    """
    if rate is not None and (rate <= 0 or nbytes <= 0 or goal != 1.0):
        raise ValueError(f"benchmark {name!r}: a rate needs nbytes > 0 and the goal 1.0")
    def register(cls: B) -> B:
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ValueError(f"benchmark {name!r} is already registered by {REGISTRY[name].__qualname__}; "
                             "pick another name")
        cls.name = name
        cls.goal = goal
        cls.rate = rate
        cls.nbytes = nbytes
        REGISTRY[name] = cls
        return cls
    return register


def load_all() -> dict[str, type[Benchmark]]:
    """Import every area module of the ``bench`` package, which registers its benchmarks."""
    for mod in pkgutil.iter_modules([str(PACKAGE_ROOT)]):
        if mod.name not in NOT_AREAS:
            importlib.import_module(f"{__package__}.{mod.name}")
    return REGISTRY


def select(names: Sequence[str]) -> list[type[Benchmark]]:
    """The benchmarks named (an exact name, or a prefix of one or more names), in registry order.

    No names selects everything. An unknown name raises ``KeyError`` with the known ones.
    """
    if not names:
        return list(REGISTRY.values())
    chosen: list[str] = []
    for n in names:
        hits = [n] if n in REGISTRY else [k for k in REGISTRY if k.startswith(n)]
        if not hits:
            raise KeyError(f"no benchmark named {n!r} (nor starting so); known: {', '.join(REGISTRY)}")
        chosen += [h for h in hits if h not in chosen]
    return [cls for k, cls in REGISTRY.items() if k in chosen]


# -- processes ------------------------------------------------------------------
def qemu_img(*args: str | os.PathLike[str]) -> str:
    """Run ``qemu-img ARGS`` (untimed, for building and checking); its stdout, or raise with its stderr."""
    res = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"qemu-img {' '.join(map(str, args))}: exit {res.returncode}: {res.stderr.strip()}")
    return res.stdout


def run_timed(argv: Sequence[str], env: dict[str, str] | None = None) -> float:
    """Run ``argv`` as one process; wall seconds from spawn to reaped exit.

    Raises ``RuntimeError`` with the process's stderr when it exits non-zero.
    """
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env)
        code = proc.wait()
        elapsed = time.perf_counter() - t0
        if code:
            err.seek(0)
            raise RuntimeError(f"{' '.join(argv)}: exit {code}: {err.read().decode('utf-8', 'replace').strip()}")
    return elapsed


WARM_MIB = 2048
"""Memory written and freed before each side runs, by default (``--warm``)."""


def warm_memory(mib: int) -> None:
    """Write ``mib`` MiB of anonymous memory and free it, so that the pages the next
    command takes from the kernel are ones the host has just handed over."""
    if mib <= 0:
        return
    chunk = b"\x01" * (64 << 20)
    with mmap.mmap(-1, mib << 20) as m:
        while m.tell() + len(chunk) <= len(m):
            m.write(chunk)
        m.write(chunk[:len(m) - m.tell()])


def peak_rss(argv: Sequence[str], env: dict[str, str] | None = None) -> int:
    """Peak RSS in KiB of one run of ``argv``, as GNU time reports it (see the module docstring)."""
    gnu_time = shutil.which("time")
    if gnu_time is None:
        raise RuntimeError("--rss needs GNU time as a program (Debian package 'time')")
    with tempfile.NamedTemporaryFile("r") as out:
        res = subprocess.run([gnu_time, "-f", "%M", "-o", out.name, *argv], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        if res.returncode:
            raise RuntimeError(f"{' '.join(argv)}: exit {res.returncode}: {res.stderr.strip()}")
        return int(out.read().split()[-1])


def time_call(fn: Callable[[], object]) -> float:
    """Seconds one in-process call of ``fn`` takes (garbage collected beforehand, not during)."""
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def command_env(root: Path) -> dict[str, str]:
    """The environment of timed commands: the project on ``PYTHONPATH``, and Python's
    bytecode cached under ``root`` whatever ``PYTHONDONTWRITEBYTECODE`` says (see the
    module docstring)."""
    env = _child_env()
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    return env


def command_label(argv: Sequence[str], image: Path) -> str:
    """``argv`` for a table note: the program's base name, the image as ``IMAGE``."""
    words = [os.path.basename(argv[0]), *("IMAGE" if a == str(image) else a for a in argv[1:])]
    return " ".join(words)


# -- fixtures -------------------------------------------------------------------
class Fixtures:
    """The work directory of one run: templates built once, fresh copies per round."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, Path] = {}

    @staticmethod
    def template_path(image: Path, key: str) -> Path:
        """Where the template ``key`` of the run that made the round copy ``image`` is.

        For ``ours`` in a ``--rss`` child, which gets only the image (a class attribute
        set by ``template`` is unset there)."""
        return image.parent.parent / "templates" / f"{key}.qcow2"

    def image(self, key: str, build: Callable[[Path], None]) -> Path:
        """The template ``key``, built by ``build(path)`` on first use in this run."""
        if key not in self._built:
            path = self.root / "templates" / f"{key}.qcow2"
            path.parent.mkdir(parents=True, exist_ok=True)
            _progress(f"building template {key} ...")
            t0 = time.perf_counter()
            build(path)
            _progress(f"built template {key} in {time.perf_counter() - t0:.1f} s")
            self._built[key] = path
        return self._built[key]

    def fresh(self, template: Path, name: str) -> Path:
        """A durable sparse copy of ``template`` named ``name`` in the rounds directory."""
        dst = self.root / "rounds" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "--sparse=always", str(template), str(dst)], check=True)
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return dst

    def discard(self, image: Path) -> None:
        """Delete a round's copy and whatever sidecars (the journal) were made next to it."""
        for p in image.parent.glob(image.name + "*"):
            p.unlink()


# -- running --------------------------------------------------------------------
@attrs.define
class Result:
    name: str
    description: str
    goal: float
    rate: float | None = None
    nbytes: int = 0
    ours_s: list[float] = attrs.Factory(list)
    peer_s: list[float] = attrs.Factory(list)
    peer_maxrss_kib: int | None = None
    ours_maxrss_kib: int | None = None
    error: str | None = None
    peer_parts: dict[str, list[float]] = attrs.Factory(dict)   # label -> seconds, for a peer of several commands

    @property
    def ours_median(self) -> float | None:
        return statistics.median(self.ours_s) if self.ours_s else None

    @property
    def peer_median(self) -> float | None:
        return statistics.median(self.peer_s) if self.peer_s else None

    @property
    def ratio(self) -> float | None:
        o, p = self.ours_median, self.peer_median
        return o / p if o is not None and p else None

    @property
    def ours_rate(self) -> float | None:
        """Bytes per second of ours' median call, for a benchmark declared with a rate."""
        o = self.ours_median
        return self.nbytes / o if self.rate is not None and o else None

    @property
    def passed(self) -> bool | None:
        r = self.ratio
        return None if r is None else r <= self.goal

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "goal_ratio": self.goal,
                "ours_s": self.ours_s, "peer_s": self.peer_s, "ours_median_s": self.ours_median,
                "peer_median_s": self.peer_median, "ratio": self.ratio, "pass": self.passed,
                "ours_maxrss_kib": self.ours_maxrss_kib, "peer_maxrss_kib": self.peer_maxrss_kib,
                "goal_rate_bytes_per_s": self.rate, "ours_rate_bytes_per_s": self.ours_rate,
                "peer_parts_s": self.peer_parts, "error": self.error}


def run_benchmark(cls: type[Benchmark], fx: Fixtures, rounds: int, warmup: int = 1, *,
                  peer_only: bool = False, rss: bool = False, warm_mib: int = WARM_MIB) -> Result:
    """Measure one benchmark; an exception on either side ends it with ``Result.error`` set."""
    b = cls()
    res = Result(cls.name, cls.description(), cls.goal, cls.rate, cls.nbytes)
    budget = cls.rate_budget()
    env = command_env(fx.root)
    try:
        template = b.template(fx)
        for r in range(warmup + rounds):
            images = {side: fx.fresh(template, f"{cls.name}-{r}-{side}.qcow2") for side in ("ours", "peer")}
            order = ("ours", "peer") if r % 2 == 0 else ("peer", "ours")
            times: dict[str, float] = {}
            parts: dict[str, float] = {}
            for side in order:
                warm_memory(warm_mib)
                if side == "ours" and not peer_only:
                    argv = b.ours_command(images["ours"])
                    times["ours"] = time_call(lambda: b.ours(images["ours"])) if argv is None else \
                        run_timed(argv, env)
                elif side == "peer" and budget is not None:
                    times["peer"] = budget
                elif side == "peer":
                    for argv in b.peers(images["peer"]):
                        parts[command_label(argv, images["peer"])] = run_timed(argv, env)
                    times["peer"] = sum(parts.values())
                if r > 0 or peer_only:
                    fx.discard(images[side])  # its page cache is gone before the other side runs
            if r == 0 and not peer_only:
                b.verify(images["ours"], images["peer"])
            if r >= warmup:
                res.peer_s.append(times["peer"])
                if "ours" in times:
                    res.ours_s.append(times["ours"])
                if len(parts) > 1:
                    for label, t in parts.items():
                        res.peer_parts.setdefault(label, []).append(t)
            for image in images.values():
                fx.discard(image)
        if rss and budget is None:
            image = fx.fresh(template, f"{cls.name}-rss-peer.qcow2")
            res.peer_maxrss_kib = max(peak_rss(argv, env) for argv in b.peers(image))
            fx.discard(image)
        if rss and not peer_only:
            image = fx.fresh(template, f"{cls.name}-rss-ours.qcow2")
            argv = b.ours_command(image)
            res.ours_maxrss_kib = peak_rss(argv, env) if argv is not None else \
                peak_rss([sys.executable, "-m", __package__, "--child-ours", cls.name, str(image)], env=_child_env())
            fx.discard(image)
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"
        _progress(traceback.format_exc().rstrip())
    return res


def baseline_rss() -> int:
    """Peak RSS (KiB) of a child that imports what ``--child-ours`` imports and does nothing."""
    return peak_rss([sys.executable, "-m", __package__, "--child-baseline"], env=_child_env())


# -- output ---------------------------------------------------------------------
def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.1f} ms"


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and not n & ((1 << 20) - 1) else f"{n} bytes"


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f} MiB"


def table(results: Sequence[Result], rss: bool = False) -> str:
    """The results as an aligned text table, one benchmark a row."""
    head = ["benchmark", "ours (median)", "peer (median)", "ratio", "goal", "result"]
    if rss:
        head += ["ours RSS", "peer RSS"]
    rows = [head]
    for r in results:
        verdict = "ERROR" if r.error else {True: "PASS", False: "MISS", None: "-"}[r.passed]
        row = [r.name, _ms(r.ours_median), _ms(r.peer_median), "-" if r.ratio is None else f"{r.ratio:.2f}x",
               f"<= {r.goal:.1f}x", verdict]
        if rss:
            row += [_mib(r.ours_maxrss_kib), _mib(r.peer_maxrss_kib)]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    right = {1, 2, 3, 6, 7}
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        rate = r.ours_rate
        if r.rate is not None and rate is not None:
            lines.append(f"{r.name}: {rate / 1e9:.2f} GB/s ({_size(r.nbytes)} a call; goal >= {r.rate / 1e9:.1f} GB/s, "
                         "the peer column is the time the goal allows)")
    for r in results:
        if r.peer_parts:
            parts = " + ".join(f"{label} {_ms(statistics.median(ts))}" for label, ts in r.peer_parts.items())
            lines.append(f"{r.name}: peer = {parts} (medians)")
    for r in results:
        if r.error:
            lines.append(f"{r.name}: {r.error}")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """What the figures depend on: versions, machine, date."""
    import numpy
    return {"qemu_img": qemu_img("--version").splitlines()[0], "python": platform.python_version(),
            "numpy": numpy.__version__, "platform": platform.platform(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- command line ---------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench",
                                description="Compare qjournal (library call, in-process) with its peer "
                                            "(whole qemu-img process) on the same images.")
    p.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (exact name or prefix; default all)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--rounds", type=int, default=5, metavar="N", help="timed rounds per benchmark (default 5)")
    p.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="untimed rounds first, also the ones verified (default 1)")
    p.add_argument("--warm", type=int, default=WARM_MIB, metavar="MIB",
                   help=f"memory written and freed before each side runs (default {WARM_MIB}; 0: none)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--rss", action="store_true", help="also measure each side's peak RSS (needs GNU time)")
    p.add_argument("--peer-only", action="store_true", help="run and time the peer side alone")
    p.add_argument("--dir", type=Path, metavar="DIR", help="work directory (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work directory and its templates")
    p.add_argument("--child-ours", nargs=2, metavar=("NAME", "IMAGE"), help=argparse.SUPPRESS)
    p.add_argument("--child-baseline", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench``: 0 when every benchmark ran (PASS or MISS), 1 on an error, 2 on bad usage."""
    args = parser().parse_args(argv)
    load_all()
    if args.child_baseline:
        return 0
    if args.child_ours:
        name, image = args.child_ours
        REGISTRY[name]().ours(Path(image))
        return 0
    if args.list:
        width = max(map(len, REGISTRY), default=0)
        for name, cls in REGISTRY.items():
            goal = f"goal <= {cls.goal:.1f}x" if cls.rate is None else f"goal >= {cls.rate / 1e9:.1f} GB/s"
            print(f"{name.ljust(width)}  {goal}  {cls.description()}")
        return 0
    if args.rounds < 1 or args.warmup < 0:
        print("python -m bench: --rounds must be at least 1 and --warmup at least 0", file=sys.stderr)
        return 2
    try:
        chosen = select(args.names)
    except KeyError as e:
        print(f"python -m bench: {e.args[0]}", file=sys.stderr)
        return 2
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="bench-", dir=args.dir))
    else:
        root = Path(tempfile.mkdtemp(prefix="qjournal-bench-"))
    env = environment()
    results: list[Result] = []
    try:
        fx = Fixtures(root)
        for cls in chosen:
            _progress(f"{cls.name}: {args.warmup} warm-up + {args.rounds} rounds ...")
            results.append(run_benchmark(cls, fx, args.rounds, args.warmup, peer_only=args.peer_only,
                                         rss=args.rss, warm_mib=args.warm))
        base = baseline_rss() if args.rss and not args.peer_only else None
    finally:
        if args.keep:
            _progress(f"work directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{env['qemu_img']}; Python {env['python']}; {args.rounds} rounds (+{args.warmup} warm-up) each; "
          "ours = library call in-process (or the qjournal command: see --list), peer = whole process")
    print(table(results, rss=args.rss))
    ours_first = sum(1 for r in range(args.warmup, args.warmup + args.rounds) if r % 2 == 0)
    if 2 * ours_first != args.rounds and not args.peer_only:
        print(f"note: ours ran first in {ours_first} rounds, the peer in {args.rounds - ours_first}; "
              "an even --rounds is fair to both")
    if base is not None:
        print(f"RSS: peak of one more run of each side under GNU time, ours in a child process; "
              f"a child that only imports the same modules peaks at {_mib(base)}")
    if args.json is not None:
        doc = {"environment": env, "rounds": args.rounds, "warmup": args.warmup, "peer_only": args.peer_only,
               "baseline_maxrss_kib": base, "results": [r.to_json() for r in results]}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if any(r.error for r in results) else 0

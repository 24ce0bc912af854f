"""The ``crashsim`` command.

    crashsim list
    crashsim run WORKLOAD... [--strategy prefix,barrier,subset,versions,torn,recovery] [--k 2]
                 [--samples N] [--seed S] [--sector-size 512] [--max-tears N] [--jobs N]
                 [--executor dask://HOST:PORT] [--oracle all|sample|none] [--oracle-samples N]
                 [--recovery-depth 2] [--recovery-states 16] [--report out.html|out.json]
    crashsim replay REPORT STATE_ID [-o out.qcow2]
    crashsim mutants [NAME...] [--sample N] [--list] [--markdown]   (see crashsim.mutants)
    crashsim record [--spare 64M] [--timeout S] [-o TRACE] IMAGE -- COMMAND ARGS...   (see crashsim.nbdrecord)
    crashsim run --trace TRACE [--strategy ...] [--max-states N] [--jobs N]   (see crashsim.qemurules)

``WORKLOAD`` is a built-in name, ``all`` (every built-in workload but the negative
controls), ``controls`` (the negative controls), or a user
workload as ``path/to/file.py:function`` or ``module:function`` (the current directory
is importable); :func:`crashsim.workloads.workload` declares its allowed outcomes.

Exit status: 0 when every workload behaved as expected (the summary says PASS): no state
not allowed, no transaction short of its minimum barriers, nothing unsynced at close, or,
for a negative control, a failure found; 1 otherwise (FAIL), or when a workload could not
run; 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import qjournal

from . import mutants, nbdrecord, qemurules, report
from .model import SECTOR_SIZES, STRATEGIES, CrashState, Options, RunResult, WorkloadResult
from .runner import digest, recorded_state, run
from .workloads import WORKLOADS, Workload, find


def _strategies(text: str) -> tuple[str, ...]:
    out = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in out if s not in STRATEGIES]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"unknown strategy {', '.join(bad) or '(none)'}; "
                                         f"choose from {','.join(STRATEGIES)}")
    return out


def _sector(text: str) -> int:
    n = int(text)
    if n not in SECTOR_SIZES:
        raise argparse.ArgumentTypeError(f"the sector size is {', '.join(map(str, SECTOR_SIZES[:-1]))} or "
                                         f"{SECTOR_SIZES[-1]}")
    return n


def _executor(text: str) -> str:
    if text in ("", "inline", "process") or (text.startswith("dask://") and ":" in text[len("dask://"):]):
        return "" if text == "process" else text
    raise argparse.ArgumentTypeError("the executor is process, inline or dask://HOST:PORT")


def _nonneg(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crashsim", description="Exhaustive crash simulation of qjournal's "
                                "journaled operations (see DESIGN.md, 'The crash model').")
    p.add_argument("--version", action="version", version=f"crashsim {qjournal.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the built-in workloads")
    sub.add_parser("mutants", help="plant bugs in a scratch copy, check that crashsim catches each "
                   "(crashsim mutants --help)", add_help=False)
    sub.add_parser("record", help="record a real qemu-img/qemu-io command over NBD into a trace "
                   "(crashsim record --help)", add_help=False)
    r = sub.add_parser("run", help="record workloads, crash them everywhere, check every state")
    r.add_argument("workloads", nargs="*", metavar="WORKLOAD",
                   help="a built-in name, 'all', 'controls', path/to/file.py:function or module:function")
    r.add_argument("--trace", metavar="TRACE", help="check a trace written by 'crashsim record' instead of "
                   "workloads (judged by QEMU's rules, see crashsim.qemurules)")
    r.add_argument("--max-states", type=_nonneg, default=500, metavar="N",
                   help="--trace: judge a seeded sample of N states when there are more (default 500)")
    r.add_argument("--strategy", type=_strategies, default=STRATEGIES, metavar="LIST",
                   help=f"comma-separated strategies (default {','.join(STRATEGIES)})")
    r.add_argument("--k", type=_nonneg, default=2, help="above 12 in-flight units: subsets and complements of "
                   "at most K units (default 2)")
    r.add_argument("--samples", type=_nonneg, default=32, metavar="N",
                   help="above 12 in-flight units: N seeded random subsets per epoch (default 32)")
    r.add_argument("--seed", type=int, default=0, help="seed of every random choice and of the journal salts")
    r.add_argument("--sector-size", type=_sector, default=SECTOR_SIZES[0],
                   help=f"the unit a write cannot tear (default {SECTOR_SIZES[0]})")
    r.add_argument("--max-tears", type=_nonneg, default=32, metavar="N",
                   help="tears enumerated per page and epoch before sampling (default 32)")
    r.add_argument("--recovery-depth", type=_nonneg, default=2, metavar="N",
                   help="crash recovery too, and the recovery of that crash, N levels deep (default 2)")
    r.add_argument("--recovery-states", type=_nonneg, default=16, metavar="N",
                   help="per recovery: every in-order prefix and a seeded sample of N of its other crash "
                        "states (default 16)")
    r.add_argument("--jobs", type=_nonneg, default=0, metavar="N", help="worker processes (default: CPUs; 1: none)")
    r.add_argument("--executor", type=_executor, default="", metavar="EXECUTOR",
                   help="process (default), inline, or dask://HOST:PORT")
    r.add_argument("--oracle", choices=("all", "sample", "none"), default="sample",
                   help="run qemu-img check and info on every state, a seeded sample, or none (default sample)")
    r.add_argument("--oracle-samples", type=_nonneg, default=24, metavar="N",
                   help="states per workload and wave for --oracle sample (default 24)")
    r.add_argument("--medium", choices=("memory", "real"), default="memory",
                   help="memory: record through a recording medium (default); real: run on files through the "
                        "real media and record the system calls they make (msync, fsync, pwrite, ftruncate)")
    r.add_argument("--report", type=Path, metavar="FILE", help="write the report (.json, or .html)")
    r.add_argument("-q", "--quiet", action="store_true", help="print only the summary line")
    rp = sub.add_parser("replay", help="rebuild one state of a report as files")
    rp.add_argument("report", type=Path, help="a report written by --report (its JSON)")
    rp.add_argument("state", metavar="STATE_ID", help="e.g. control-header-tear/torn/2")
    rp.add_argument("-o", "--output", type=Path, help="image file to write (its journal goes beside it, "
                    "as FILE.qjournal); default: the state id with / as -")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mutants"]:
        return mutants.main(argv[1:])
    if argv[:1] == ["record"]:
        return nbdrecord.main(argv[1:])
    p = parser()
    args = p.parse_args(argv)
    if args.command == "list":
        width = max(map(len, WORKLOADS))
        bwidth = max(len(w.base.name) for w in WORKLOADS.values())
        for w in WORKLOADS.values():
            print(f"{w.name.ljust(width)}  {w.base.name.ljust(bwidth)}  {w.description}")
        return 0
    if args.command == "run":
        return _run(p, args)
    return _replay(p, args)


def _select(p: argparse.ArgumentParser, names: list[str]) -> list[Workload]:
    out: list[Workload] = []
    for name in names:
        if name in ("all", "controls"):
            want = name == "controls"
            out += [w for w in WORKLOADS.values() if w.expect_failure == want]
            continue
        try:
            out.append(find(name))
        except KeyError as e:
            p.error(str(e.args[0]))
    return list({w.name: w for w in out}.values())


def _run(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.trace is not None:
        if args.workloads or args.report is not None:
            p.error("--trace takes no WORKLOAD and no --report (it prints its report)")
        return qemurules.run_trace(args.trace, args.strategy, k=args.k, samples=args.samples, seed=args.seed,
                                   max_tears=args.max_tears, sector_size=args.sector_size,
                                   max_states=args.max_states, jobs=args.jobs, quiet=args.quiet)
    if not args.workloads:
        p.error("give at least one WORKLOAD (or --trace TRACE)")
    workloads = _select(p, args.workloads)
    opts = Options(strategies=args.strategy, k=args.k, samples=args.samples, seed=args.seed, medium=args.medium,
                   sector_size=args.sector_size, max_tears=args.max_tears, oracle=args.oracle,
                   oracle_samples=args.oracle_samples, jobs=args.jobs, executor=args.executor,
                   recovery_depth=args.recovery_depth, recovery_states=args.recovery_states)
    result = run(workloads, opts, progress=True)
    if not args.quiet:
        for w in result.workloads:
            print(_summary(w))
    bad = [v for w in result.workloads for v in w.failures]
    errors = [w for w in result.workloads if w.error]
    deficits = [t for w in result.workloads for t in w.deficits]
    unsynced = [w for w in result.workloads if w.unsynced]
    odd = [w.name for w in result.workloads if not w.ok]
    extra = "".join(f", {n} {what}" for n, what in ((len(deficits), "transaction(s) short of barriers"),
                                                     (len(unsynced), "workload(s) unsynced at close"),
                                                     (len(errors), "workload(s) failed to run")) if n)
    verdict = "PASS" if result.ok else f"FAIL ({', '.join(odd)} did not behave as expected)"
    print(f"crashsim: {len(result.workloads)} workload(s), {result.states} states checked in "
          f"{result.seconds:.1f} s ({result.states / max(result.seconds, 1e-9):.0f}/s): "
          f"{len(bad)} not allowed{extra}: {verdict}")
    if args.report is not None:
        _write_report(result, args.report)
    return 0 if result.ok else 1


def _summary(w: WorkloadResult) -> str:
    if w.error:
        return f"{w.name}: could not run: {w.error}"
    counts = ", ".join(f"{c.strategy} {c.unique}/{c.generated}" for c in w.counts)
    fails = w.failures
    lines = [f"{w.name}: {len(w.states)} states ({counts}): "
             + (f"{len(fails)} NOT ALLOWED" if fails else "all allowed")
             + (" (a negative control: failures expected)" if w.expect_failure else "")]
    for t in w.transactions:
        if t.barriers < t.minimum:
            lines.append(f"  transaction {t.index} ({t.description}): {t.barriers} barriers, minimum {t.minimum} "
                         f"({t.minimum_reason}): NOT ALLOWED")
        elif t.barriers != t.minimum:
            lines.append(f"  transaction {t.index} ({t.description}): {t.barriers} barriers, minimum {t.minimum}")
    if w.unsynced:
        lines.append(f"  NOT ALLOWED: {w.unsynced}")
    shown = [v for v in fails if v.minimal or v.explanation][:3]
    for v in shown:
        lines.append(f"  {v.state_id} [{v.invariant}]: {v.explanation}")
    if len(fails) > len(shown):
        lines.append(f"  ... and {len(fails) - len(shown)} more")
    return "\n".join(lines)


def _write_report(result: RunResult, path: Path) -> None:
    """The HTML report in full; the JSON with passing states summarized (one line each)."""
    if path.suffix != ".json":
        report.write_report(result, str(path))
        path.with_suffix(".json").write_text(result.dumps(compact=True))
        return
    path.write_text(result.dumps(compact=True))


def load_report(path: Path) -> RunResult:
    """A report's run result: its JSON, or the JSON written beside an HTML report."""
    for candidate in (path, path.with_suffix(".json")):
        try:
            return RunResult.loads(candidate.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
    raise ValueError(f"{path}: not a crashsim JSON report (nor is {path.with_suffix('.json')})")


def _replay(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        result = load_report(args.report)
    except ValueError as e:
        p.error(str(e))
    states: dict[str, CrashState] = {s.id: s for w in result.workloads for s in w.states}
    state = states.get(args.state)
    if state is None:
        p.error(f"no state {args.state!r} in {args.report}")
    try:
        w = find(state.workload)
    except KeyError as e:
        p.error(str(e.args[0]))
    parent = states.get(state.parent) if state.parent else None
    files = recorded_state(w, result.options, state, parent)
    # No ':' in the default name: qemu-img reads "a:b" as protocol "a" (a user workload is
    # module:function); for a name of your own with ':', pass qemu-img file.filename=NAME.
    out = args.output or Path(state.id.replace("/", "-").replace(":", "-") + ".qcow2")
    out.write_bytes(files["image"])
    jpath = Path(str(out) + ".qjournal")
    if files["journal"]:
        jpath.write_bytes(files["journal"])
    elif jpath.exists():
        os.unlink(jpath)
    verdict = next(v for wr in result.workloads for v in wr.verdicts if v.state_id == state.id)
    same = digest(files).startswith(state.digest)     # a summarized state keeps a prefix
    print(f"{out}: {state.description}")
    print(f"  journal: {jpath if files['journal'] else '(empty, not written)'}")
    print(f"  verdict: {'allowed' if verdict.ok else 'NOT ALLOWED: ' + verdict.invariant}; "
          f"qjournal {verdict.qjournal}, plain {verdict.plain}")
    if not same:
        print("crashsim replay: the rebuilt state differs from the report's (another qjournal or base image?)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

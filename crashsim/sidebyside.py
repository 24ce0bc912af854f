"""QEMU and qjournal side by side: each operation recorded as a real qemu-img/qemu-io run and as
the matching crashsim workload, both crashed everywhere, both judged.

    python -m crashsim.sidebyside [PROTOCOL...] [--max-states N] [--jobs N] [--seed S]
                                  [--traces DIR] [--markdown docs/qemu-crash-report.md]

For each protocol of :data:`crashsim.qemuprotocols.PROTOCOLS`: the QEMU command is
recorded (:mod:`crashsim.nbdrecord`) and its states judged by QEMU's rules
(:mod:`crashsim.qemurules`); the matching built-in workloads run through
:func:`crashsim.runner.run` with the same strategies (and qjournal's own ``recovery``).
One row per run: writes and barriers (both files for qjournal: image and journal),
distinct states, and the outcomes. QEMU's outcomes are those of
:mod:`crashsim.qemurules`; qjournal's are its own views' (``crashsim.model.OUTCOMES``):
after recovery, and as a reader that ignores the journal (QEMU) sees it.

``--markdown FILE`` replaces the part of FILE between ``<!-- table -->`` and
``<!-- /table -->`` (the rest of the file is prose kept as it is; a new file gets the
markers only). Exit status 0 when every run worked, 1 when a recording or a workload failed.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import attrs

from .model import SECTOR_SIZES, Options, WorkloadResult
from .nbdrecord import RecordError
from .qemuprotocols import Protocol, record_protocol, select
from .qemurules import OUTCOMES, TRACE_STRATEGIES, TraceResult, check_trace
from .runner import run
from .trace import load
from .workloads import find

BEGIN, END = "<!-- table -->", "<!-- /table -->"


@attrs.frozen
class Row:
    operation: str
    by: str                     # "qemu" or "qjournal <workload>"
    writes: int
    barriers: int
    states: int                 # distinct states
    judged: int
    outcomes: str
    not_allowed: int
    note: str = ""
    disagree: int = 0           # QEMU's states where qjournal's check contradicts qemu-img's


def qemu_row(p: Protocol, r: TraceResult) -> Row:
    dist = ", ".join(f"{o} {n}" for o, n in r.outcomes().items())
    bad = sum(n for o, n in r.outcomes().items() if o in ("corrupt", "unopenable"))
    return Row(p.name, "qemu", r.writes, r.barriers, r.unique, len(r.judged), dist, bad,
               "sampled" if r.sampled else "", sum(1 for j in r.judged if j.disagree))


def qjournal_row(p: Protocol, w: WorkloadResult) -> Row:
    if w.error:
        return Row(p.name, f"qjournal {w.name}", 0, 0, 0, 0, "", 0, f"could not run: {w.error}")
    writes = sum(1 for e in w.entries if e.kind == "write")
    barriers = sum(1 for e in w.entries if e.kind == "barrier")
    after: dict[str, int] = {}
    plain: dict[str, int] = {}
    for v in w.verdicts:
        after[v.qjournal] = after.get(v.qjournal, 0) + 1
        plain[v.plain] = plain.get(v.plain, 0) + 1
    leaky = sum(1 for v in w.verdicts if v.leaks)
    dist = ("recovered: " + ", ".join(f"{o} {n}" for o, n in sorted(after.items()))
            + "; without the journal: " + ", ".join(f"{o} {n}" for o, n in sorted(plain.items()))
            + (f" ({leaky} with leaks)" if leaky else ""))
    return Row(p.name, f"qjournal {w.name}", writes, barriers, len(w.states), len(w.verdicts), dist,
               len(w.failures))


def compare(protocols: Sequence[Protocol], opts: Options, max_states: int, traces: str,
            progress: bool = True) -> tuple[list[Row], list[str]]:
    """Record and judge every protocol, run its workloads; the rows and any errors."""
    rows: list[Row] = []
    errors: list[str] = []
    for p in protocols:
        path = os.path.join(traces, f"{p.name}.trace")
        try:
            record_protocol(p, path)
            r = check_trace(load(path), p.name, TRACE_STRATEGIES, k=opts.k, samples=opts.samples, seed=opts.seed,
                            max_tears=opts.max_tears, sector_size=opts.sector_size, max_states=max_states,
                            jobs=opts.jobs)
            rows.append(qemu_row(p, r))
        except (RecordError, ValueError, OSError) as e:
            errors.append(f"{p.name}: {e}")
            rows.append(Row(p.name, "qemu", 0, 0, 0, 0, "", 0, f"could not record: {e}"))
        result = run([find(n) for n in p.workloads], opts)
        rows += [qjournal_row(p, w) for w in result.workloads]
        errors += [f"{w.name}: {w.error}" for w in result.workloads if w.error]
        if progress:
            for row in rows[-1 - len(p.workloads):]:
                print(f"{row.operation:22} {row.by:34} {row.writes:4} writes {row.barriers:4} barriers "
                      f"{row.states:5} states: {row.outcomes or row.note}", file=sys.stderr)
    return rows, errors


def markdown(rows: Sequence[Row], opts: Options, max_states: int) -> str:
    lines = [BEGIN, "",
             "| operation | done by | writes | barriers | distinct states | judged | outcomes | not allowed "
             "| second opinion differs |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        judged = f"{r.judged}" + (" (sample)" if r.note == "sampled" else "")
        text = r.outcomes or r.note
        differs = f"{r.disagree}" if r.by == "qemu" else ""
        lines.append(f"| {r.operation} | {r.by} | {r.writes} | {r.barriers} | {r.states} | {judged} | {text} | "
                     f"{r.not_allowed} | {differs} |")
    lines += ["", f"Strategies {', '.join(opts.strategies)} (qjournal only: recovery, depth "
              f"{opts.recovery_depth}); seed {opts.seed}; {opts.sector_size}-byte sectors; QEMU states judged: "
              f"at most {max_states} per operation (a seeded sample above that). QEMU outcomes: "
              f"{', '.join(OUTCOMES)}. Second opinion: the QEMU states where qjournal's check "
              f"contradicts qemu-img's (see crashsim.qemurules.disagreement).", "", END]
    return "\n".join(lines)


def write_markdown(path: Path, table: str) -> None:
    text = path.read_text() if path.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path}: no {BEGIN} ... {END} markers to put the table between")
    path.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: table, text, count=1,
                           flags=re.S))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m crashsim.sidebyside", description="QEMU's protocols and "
                                "qjournal's, crashed everywhere and judged side by side.")
    p.add_argument("protocols", nargs="*", metavar="PROTOCOL", help="default: all")
    p.add_argument("--max-states", type=int, default=300, metavar="N",
                   help="QEMU states judged per operation, a seeded sample above that (default 300)")
    p.add_argument("--jobs", type=int, default=0, metavar="N", help="worker processes (default: CPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sector-size", type=int, choices=SECTOR_SIZES, default=SECTOR_SIZES[0])
    p.add_argument("--recovery-depth", type=int, default=1, metavar="N",
                   help="qjournal: crashes during recovery, nested N deep (default 1)")
    p.add_argument("--traces", metavar="DIR", help="keep the traces in DIR (default: a temporary folder)")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="write the table into FILE (between markers)")
    args = p.parse_args(argv)
    try:
        protocols = select(args.protocols)
    except KeyError as e:
        p.error(str(e.args[0]))
    opts = Options(strategies=(*TRACE_STRATEGIES, "recovery"), seed=args.seed, sector_size=args.sector_size,
                   oracle="none", jobs=args.jobs, recovery_depth=args.recovery_depth)
    if args.traces:
        os.makedirs(args.traces, exist_ok=True)
        rows, errors = compare(protocols, opts, args.max_states, args.traces)
    else:
        with tempfile.TemporaryDirectory(prefix="crashsim-sidebyside-") as d:
            rows, errors = compare(protocols, opts, args.max_states, d)
    table = markdown(rows, opts, args.max_states)
    print(table)
    if args.markdown is not None:
        write_markdown(args.markdown, table)
    for line in errors:
        print(f"crashsim.sidebyside: {line}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

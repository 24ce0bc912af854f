"""The runner: record a workload, generate its crash states, check them on an executor, report.

Per workload:

1. **Record** the workload on recording media over its base image. The journal's salt
   is drawn from the run's seed, so a run is byte-for-byte reproducible (``replay``
   relies on it). Each transaction is bracketed by ``tx-begin``/``tx-end`` marks and the
   workload's return by a ``returned`` mark.
2. **States** (``crashsim.states``): every strategy's candidates, deduplicated by an exact
   key of their content and the phase they fall in (a state allowed inside an operation
   may be forbidden after it returned, so the phase is part of the key).
3. **Check** them in batches on any ``concurrent.futures.Executor`` (a process pool, a
   Dask cluster, or :class:`InlineExecutor`). A batch carries the recording; a worker
   rebuilds the model once per recording and materializes each state in memory.
4. **Recovery** is crash-tested like the operation. A worker records the recovery of each
   state it judged; when recovery wrote something, it generates that recording's own
   crash states with the same strategies (every in-order prefix, and a seeded sample of
   at most ``recovery_states`` of the others: barriers, subsets, older versions, tears)
   and sends back their content digests. The new ones are checked in a second wave, with
   the rule that recovery must still reach the outcome it reached without the second
   crash; their recoveries are crashed in turn, down to ``recovery_depth`` levels. A state
   at level ``n`` is its first crash's spec plus a *path* of ``n`` specs, one per recovery.
5. **Explain** failures: a few are minimized (in-flight writes put back to their durable
   version one at a time while the state still fails), and described by the writes that
   matter, the header fields that came from old and new, and what each reader saw.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import math
import os
import random
import tempfile
import time
from typing import Any, Callable, Sequence

import attrs

from qjournal.format.header import AUTOCLEAR_BITMAPS, field_span, read_field
from qjournal.ops.check import check
from qjournal import Image
from qjournal.journal.journal import SaltSource
from qjournal.storage.medium import Medium, MemoryMedium
from qjournal.progress import Progress

from . import explain
from .checks import Caches, Expect, Judged, Semantic, judge, oracle, recover, semantic, semantic_diff
from .model import (STRATEGIES, CrashState, EntryInfo, Fate, Options, RunResult, StrategyCount, TransactionInfo,
                    Verdict, WorkloadResult)
from .realmedium import MarkingFileMedium, MarkingMmapMedium, RecordingSystem
from .recorder import IMAGE, JOURNAL, Recording, RecordingMedium, bracket_transactions
from .states import SIZE, Choice, Generator, Spec, Timeline
from .workloads import Workload, WorkloadCheckFailed, qemu_result

MINIMIZE = 4            # failing states minimized and explained per workload


# -- recording ---------------------------------------------------------------------------
def seeded_salts(seed: int) -> SaltSource:
    """A journal salt source drawn from ``seed`` instead of the system's random source:
    the same salts, so the same journal bytes, on every run (``replay`` relies on it)."""
    rng = random.Random(f"salt:{seed}")
    return lambda: rng.getrandbits(64)


@attrs.frozen
class Span:
    begin: int              # index of the tx-begin mark (-1: from the start)
    end: int                # index of the tx-end (or returned) mark
    description: str


@attrs.frozen
class Recorded:
    rec: Recording
    returned: int
    spans: tuple[Span, ...]         # the operations, as the allowed outcomes see them
    txs: tuple[Span, ...]           # the transactions (or, bypassing the journal, the whole workload)


def record(w: Workload, seed: int, medium: str = "memory") -> Recorded:
    """Run ``w`` once and record it: through recording media (``memory``), or on real files
    through the real media, recording their system calls (``real``, see
    :mod:`crashsim.realmedium`)."""
    rec = Recording({IMAGE: w.base.build(), JOURNAL: b""})
    with tempfile.TemporaryDirectory(prefix="crashsim-real-") as tmp:
        if medium == "real":
            path = os.path.join(tmp, f"{w.name}.qcow2")
            with open(path, "wb") as f:
                f.write(rec.initial[IMAGE])
            open(path + ".qjournal", "wb").close()
            system = RecordingSystem(rec)
            image_medium: Medium = MarkingMmapMedium(path, system, IMAGE)
            journal_medium: Medium = MarkingFileMedium(path + ".qjournal", system, JOURNAL)
        else:
            path = f"{w.name}.qcow2"
            image_medium, journal_medium = RecordingMedium(rec, IMAGE), RecordingMedium(rec, JOURNAL)
        img = Image(path, "r+", medium=image_medium, journal_medium=journal_medium, salts=seeded_salts(seed))
        descriptions = bracket_transactions(img, rec)
        try:
            w.fn(img)
            rec.mark("returned")
        finally:
            img.close()
    returned = max(i for i, e in enumerate(rec.entries) if e.kind == "mark" and e.name == "returned")
    txs: list[Span] = []
    if w.journaled:
        begin = 0
        it = iter(descriptions)
        for i, e in enumerate(rec.entries):
            if e.kind == "mark" and e.name == "tx-begin":
                begin = i
            elif e.kind == "mark" and e.name == "tx-end":
                desc = next(it)
                if any(x.kind in ("write", "resize") for x in rec.entries[begin:i]):
                    txs.append(Span(begin, i, desc))
    whole = Span(-1, returned, w.description)
    spans = [whole] if w.whole or not w.journaled else txs
    return Recorded(rec, returned, tuple(spans), tuple(txs) if w.journaled else (whole,))


# -- what each phase allows ------------------------------------------------------------------
def _open_semantic(files: dict[str, bytes]) -> tuple[Semantic, int, int]:
    """The semantic state, leaks and corruptions (besides COPIED flags too few) of ``files``."""
    with Image("state.qcow2", "r", medium=MemoryMedium(files[IMAGE]),
               journal_medium=MemoryMedium(files[JOURNAL])) as img:
        sem = semantic(img)
    with Image("state.qcow2", "r", medium=MemoryMedium(files[IMAGE]), journal_medium=MemoryMedium(b"")) as img:
        res = check(img)
    return sem, res.leaks, res.corruptions - res.copied_too_few


def _qemu_corruptions(image: bytes) -> int:
    with tempfile.TemporaryDirectory(prefix="crashsim-base-") as d:
        return oracle(image, os.path.join(d, "base.qcow2"), None).corruptions


@attrs.frozen
class Phases:
    """The workload's states at transaction boundaries, and the Expect of every crash point."""

    images: tuple[bytes, ...]           # image bytes at each boundary (s_0 .. s_m)
    semantics: tuple[Semantic, ...]
    expects: tuple[Expect, ...]         # before0, inside0, after0, inside1, after1, ...
    of_point: tuple[int, ...]           # crash point -> index into expects


def phases(r: Recorded, journaled: bool, relaxed: bool = False, in_place: bool = False) -> Phases:
    n = len(r.rec.entries)
    cuts = [0] + [s.end + 1 for s in r.spans]
    states = [r.rec.state(c) for c in cuts]
    sems, leaks, corrupt = zip(*(_open_semantic(s) for s in states))
    # Damage the base already had (a workload on a damaged image): every state may show it,
    # none may show more.
    damage = {"damage": corrupt[0], "qemu_damage": _qemu_corruptions(states[0][IMAGE]) if corrupt[0] else 0}
    m = len(r.spans)
    expects: list[Expect] = []
    if m == 0:
        expects.append(Expect(sems[0], sems[0], leaks[0], leaks[0], "old", journaled, relaxed, in_place, **damage))
    else:
        expects.append(Expect(sems[0], sems[1], leaks[0], leaks[1], "old", journaled, relaxed, in_place, **damage))
        for j in range(m):
            for only in ("", "new"):
                expects.append(Expect(sems[j], sems[j + 1], leaks[j], leaks[j + 1], only, journaled, relaxed,
                                      in_place, **damage))
    of_point = []
    for t in range(n + 1):
        ph = 2 * m
        for j, s in enumerate(r.spans):
            if t <= s.begin:
                ph = 2 * j
                break
            if t <= s.end:
                ph = 2 * j + 1
                break
        of_point.append(ph)
    return Phases(tuple(s[IMAGE] for s in states), tuple(sems), tuple(expects), tuple(of_point))


# -- work for the executor -------------------------------------------------------------------
@attrs.frozen
class RecoveryStates:
    """How the crash states of a recorded recovery are generated (from :class:`Options`)."""

    workload: str
    strategies: tuple[str, ...]
    k: int
    samples: int
    seed: int
    max_tears: int
    depth: int
    cap: int

    @classmethod
    def of(cls, workload: str, opts: Options) -> "RecoveryStates":
        return cls(workload, tuple(x for x in opts.strategies if x != "recovery"), opts.k, opts.samples, opts.seed,
                   opts.max_tears, opts.recovery_depth if "recovery" in opts.strategies else 0, opts.recovery_states)

    def specs(self, tl: Timeline, parent: str) -> list[Spec]:
        """The distinct crash states of recovery recording ``tl``: every in-order prefix, then a
        sample (seeded by the run's seed and the parent's digest) of at most ``cap`` others."""
        gen = Generator(tl, f"{self.workload}:recovery:{parent}", self.k, self.samples, self.seed, self.max_tears)
        seen: set[Any] = set()
        prefixes: list[Spec] = []
        others: list[Spec] = []
        for strategy in ("prefix",) + tuple(x for x in self.strategies if x != "prefix"):
            for spec in gen.generate(strategy):
                key = tl.key(spec)
                if key not in seen:
                    seen.add(key)
                    (prefixes if strategy == "prefix" else others).append(spec)
        if len(others) > self.cap:
            rng = random.Random(f"{self.seed}:{self.workload}:recovery:{parent}")
            others = [others[i] for i in sorted(rng.sample(range(len(others)), self.cap))]
        return prefixes + others


@attrs.frozen
class Context:
    """What a worker needs to check the states of one workload (sent with every batch)."""

    key: str
    rec: Recording
    sector_size: int
    expects: tuple[Expect, ...]
    of_point: tuple[int, ...]
    gen: RecoveryStates


@attrs.frozen
class Task:
    index: int
    spec: Spec
    oracle: bool
    path: tuple[Spec, ...] = ()         # crashes during recovery: each a state of the recovery before it
    require: str | None = None          # the qjournal outcome the parent's recovery reached


@attrs.frozen
class Batch:
    ctx: Context
    tasks: tuple[Task, ...]


@attrs.frozen
class Done:
    index: int
    digest: str
    judged: Judged                      # without its recovery recording
    children: tuple[tuple[Spec, str], ...] = ()  # (spec, digest) of the crash states of the recovery


_TIMELINES: dict[str, Timeline] = {}
_RECOVERIES: dict[str, Timeline] = {}   # digest of a state -> the timeline of its recovery (per worker)


def _timeline(ctx: Context) -> Timeline:
    tl = _TIMELINES.get(ctx.key)
    if tl is None:
        if len(_TIMELINES) > 8:
            _TIMELINES.clear()
        tl = _TIMELINES[ctx.key] = Timeline(ctx.rec, ctx.sector_size)
    return tl


def digest(files: dict[str, bytes]) -> str:
    """The content hash of a state's two files (SHA-1: fast here, and nothing is adversarial)."""
    h = hashlib.sha1(usedforsecurity=False)
    for name in (IMAGE, JOURNAL):
        h.update(len(files[name]).to_bytes(8, "big"))
        h.update(files[name])
    return h.hexdigest()


def recovery_timeline(files: dict[str, bytes], sector_size: int, rec: Recording | None = None) -> Timeline:
    """The timeline of the recovery of ``files`` (recorded now unless ``rec`` is given),
    cached per worker by the files' digest: a batch holds many children of one parent."""
    key = f"{digest(files)}:{sector_size}"
    tl = _RECOVERIES.get(key)
    if tl is None:
        if rec is None:
            rec = recover(files).recording
            assert rec is not None, "the parent's recovery failed, so it has no crash states"
        if len(_RECOVERIES) > 64:
            _RECOVERIES.clear()
        tl = _RECOVERIES[key] = Timeline(rec, sector_size)
    return tl


def state_files(tl: Timeline, spec: Spec, path: Sequence[Spec] = ()) -> dict[str, bytes]:
    """The files of a state: ``spec`` of the workload's timeline, then each spec of ``path``
    applied to the recovery of the state before it."""
    files = tl.materialize(spec)
    for step in path:
        files = recovery_timeline(files, tl.sector_size).materialize(step)
    return files


def check_batch(batch: Batch) -> list[Done]:
    """Check every task of ``batch`` (runs on a worker)."""
    ctx = batch.ctx
    tl = _timeline(ctx)
    caches = Caches()
    out = []
    oracle = any(t.oracle for t in batch.tasks)
    with tempfile.TemporaryDirectory(prefix="crashsim-") if oracle else contextlib.nullcontext("") as d:
        for task in batch.tasks:
            files = state_files(tl, task.spec, task.path)
            expect = ctx.expects[ctx.of_point[task.spec.point]]
            j = judge(files, expect, os.path.join(d, "state.qcow2") if task.oracle else None, task.require, caches)
            children: tuple[tuple[Spec, str], ...] = ()
            if j.recovery is not None and len(task.path) < ctx.gen.depth:
                dg = digest(files)
                rtl = recovery_timeline(files, tl.sector_size, j.recovery)
                children = tuple((s, digest(rtl.materialize(s))) for s in ctx.gen.specs(rtl, dg[:16]))
            out.append(Done(task.index, digest(files), attrs.evolve(j, recovery=None), children))
    return out


class InlineExecutor(cf.Executor):
    """Runs each call at submit, in this thread: no processes, same results."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        fut: cf.Future[Any] = cf.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:
            fut.set_exception(e)
        return fut


# -- one workload ------------------------------------------------------------------------------
@attrs.define
class Candidate:
    index: int
    spec: Spec
    phase: int
    path: tuple[Spec, ...] = ()
    parent: int | None = None
    require: str | None = None
    duplicates: int = 0
    oracle: bool = False
    done: Done | None = None


@attrs.define
class Prepared:
    w: Workload
    r: Recorded
    ph: Phases
    tl: Timeline
    ctx: Context
    entries: tuple[EntryInfo, ...]
    steps: dict[int, str]
    cands: list[Candidate]
    generated: dict[str, int]
    t0: float
    futures: list[cf.Future[list[Done]]] = attrs.Factory(list)


def _entry_infos(rec: Recording) -> tuple[EntryInfo, ...]:
    out = []
    for i, e in enumerate(rec.entries):
        length = len(e.data) if e.kind == "write" else e.size if e.kind == "resize" else 0
        out.append(EntryInfo(i, e.kind, e.file, e.off, length, tuple(e.ranges), e.name, e.site))
    return tuple(out)


def _steps_of(rec: Recording) -> dict[int, str]:
    """For each write, the name of the step it belongs to (the next mark that names a step)."""
    out: dict[int, str] = {}
    waiting: list[int] = []
    for i, e in enumerate(rec.entries):
        if e.kind in ("write", "resize"):
            waiting.append(i)
        elif e.kind == "mark" and e.name not in ("tx-begin", "tx-end", "returned"):
            for j in waiting:
                out[j] = "precommit and journal" if e.name == "commit" else e.name
            waiting = []
    return out


def prepare(w: Workload, opts: Options) -> Prepared:
    t0 = time.perf_counter()
    r = record(w, opts.seed, opts.medium)
    ph = phases(r, w.journaled, w.relaxed, w.whole and w.journaled)
    complaint = independent_new(w, ph.semantics[0], ph.semantics[-1])
    if complaint:
        raise WorkloadCheckFailed(complaint)
    tl = Timeline(r.rec, opts.sector_size)
    gen = Generator(tl, w.name, opts.k, opts.samples, opts.seed, opts.max_tears)
    key = f"{w.name}:{digest(r.rec.state(len(r.rec.entries)))}:{len(r.rec.entries)}:{opts.sector_size}"
    ctx = Context(key, r.rec, opts.sector_size, ph.expects, ph.of_point, RecoveryStates.of(w.name, opts))
    seen: dict[Any, Candidate] = {}
    cands: list[Candidate] = []
    generated: dict[str, int] = {}
    for strategy in opts.strategies:
        if strategy == "recovery":
            continue
        n = 0
        for spec in gen.generate(strategy):
            n += 1
            k = (tl.key(spec), ph.of_point[spec.point])
            c = seen.get(k)
            if c is not None:
                c.duplicates += 1
                continue
            c = seen[k] = Candidate(len(cands), spec, ph.of_point[spec.point])
            cands.append(c)
        generated[strategy] = n
    _choose_oracle(cands, opts, w.name, "wave1")
    return Prepared(w, r, ph, tl, ctx, _entry_infos(r.rec), _steps_of(r.rec), cands, generated, t0)


def independent_new(w: Workload, old: Semantic, new: Semantic) -> str:
    """Check the new state qjournal reached against the workload's independent one: what
    QEMU leaves for the same operation, and the workload's declared check ("" when both
    agree or the workload declares neither)."""
    if w.qemu:
        theirs = _open_semantic({IMAGE: qemu_result(w), JOURNAL: b""})[0]
        diff = semantic_diff(theirs, new)
        if diff:
            cmds = "; ".join(" ".join(c[1:]) for c in w.qemu)
            return f"the new state is not what QEMU leaves for the same operation ({cmds}): {diff}"
    if w.expect is not None:
        complaint = w.expect(old, new)
        if complaint:
            return f"the new state is not the one the workload declares: {complaint}"
    return ""


def _choose_oracle(cands: Sequence[Candidate], opts: Options, name: str, wave: str) -> None:
    if opts.oracle == "all":
        for c in cands:
            c.oracle = True
    elif opts.oracle == "sample" and cands:
        rng = random.Random(f"{opts.seed}:{name}:oracle:{wave}")
        for c in rng.sample(list(cands), min(opts.oracle_samples, len(cands))):
            c.oracle = True


def _submit(p: Prepared, ex: cf.Executor, cands: Sequence[Candidate], jobs: int) -> list[cf.Future[list[Done]]]:
    if not cands:
        return []
    size = max(4, math.ceil(len(cands) / (3 * max(1, jobs))))
    futs = []
    for i in range(0, len(cands), size):
        tasks = tuple(Task(c.index, c.spec, c.oracle, c.path, c.require) for c in cands[i:i + size])
        futs.append(ex.submit(check_batch, Batch(p.ctx, tasks)))
    return futs


def _collect(p: Prepared, futs: list[cf.Future[list[Done]]], tick: Callable[[int], None]) -> None:
    for fut in futs:
        for d in fut.result():
            p.cands[d.index].done = d
        tick(1)


def _next_wave(p: Prepared, opts: Options, level: int) -> list[Candidate]:
    """Candidates for a crash during the recovery of the states at ``level - 1`` (0: the
    workload's own): the crash states of each recovery not yet seen."""
    seen = {(c.done.digest, c.phase) for c in p.cands if c.done is not None}
    out: list[Candidate] = []
    generated = 0
    for c in list(p.cands):
        if c.done is None or not c.done.children or len(c.path) != level - 1:
            continue
        req = c.done.judged.qjournal if c.done.judged.ok else None
        for spec, dg in c.done.children:
            generated += 1
            if (dg, c.phase) in seen:
                continue
            seen.add((dg, c.phase))
            child = Candidate(len(p.cands), c.spec, c.phase, c.path + (spec,), c.index, req)
            p.cands.append(child)
            out.append(child)
    p.generated["recovery"] = p.generated.get("recovery", 0) + generated
    _choose_oracle(out, opts, p.w.name, f"wave{level + 1}")
    return out


# -- results ---------------------------------------------------------------------------------
def fates(tl: Timeline, spec: Spec, entries: tuple[EntryInfo, ...], only_chosen: bool = False) -> tuple[Fate, ...]:
    snap = tl.snapshots[spec.point]
    chosen = dict(spec.choices)
    out = []
    for u in sorted(snap.inflight):
        if only_chosen and u not in chosen:
            continue
        versions = snap.inflight[u]
        f, page = u
        file = tl.files[f]
        c = chosen.get(u)
        if page == SIZE:
            held = versions[c].content if isinstance(c, int) else snap.durable_size[f]
            idx = tuple(v.entry for v in (versions[:c + 1] if isinstance(c, int) else versions))
            out.append(Fate(file, "size", held, "persisted" if c is not None else "dropped", idx,
                            _sites(idx, entries)))
            continue
        if c is None:
            idx = tuple(v.entry for v in versions)
            out.append(Fate(file, "page", page, "dropped", idx, _sites(idx, entries)))
        elif isinstance(c, int):
            idx = tuple(v.entry for v in versions[:c + 1])
            out.append(Fate(file, "page", page, "persisted", idx, _sites(idx, entries)))
        else:
            v, mask = c
            idx = tuple(x.entry for x in versions[:v + 1])
            sectors = tuple(s for s in range(4096 // tl.sector_size) if mask >> s & 1)
            out.append(Fate(file, "page", page, "torn", idx, _sites(idx, entries), sectors, tl.sector_size))
    return tuple(out)


def _sites(idx: tuple[int, ...], entries: tuple[EntryInfo, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(entries[i].site for i in idx))


def describe(p: Prepared, c: Candidate, ids: dict[int, str]) -> str:
    spec, entries, n = c.spec, p.entries, len(p.entries)
    t = spec.point
    nxt = entries[t] if t < n else None
    at = (f"before entry {t} ({nxt.kind} on the {nxt.file}, {nxt.site})" if nxt is not None
          else "after the last entry")
    units = len(p.tl.snapshots[t].inflight)
    if c.path:
        parent = ids.get(c.parent, "?") if c.parent is not None else "?"
        return f"a crash during the recovery of state {parent} (level {len(c.path)}): {_recovery_text(c.path[-1])}"
    if spec.strategy == "prefix":
        return f"entries 0..{t - 1} issued and landed in order" if t else "nothing issued yet"
    if spec.strategy == "barrier":
        b = entries[t - 1]
        return (f"right after barrier {t - 1} ({b.file}, {b.site}); none of the {units} unit(s) still in "
                "flight reached the disk")
    persisted = sum(1 for _, ch in spec.choices if isinstance(ch, int))
    if spec.strategy == "subset":
        return f"{at}: {persisted} of the {units} in-flight unit(s) reached the disk, the rest did not"
    if spec.strategy == "versions":
        return f"{at}: a page holds an older version written in this epoch (of {units} in-flight units)"
    torn = [u for u, ch in spec.choices if not isinstance(ch, int)]
    return (f"{at}: {p.tl.files[torn[0][0]]} page {torn[0][1]:#x} torn at {p.tl.sector_size}-byte sectors, "
            f"{persisted} other unit(s) of {units} in flight reached the disk")


def _recovery_text(spec: Spec) -> str:
    """What a crash state of a recovery's recording kept (its entries are not in the report)."""
    t, n = spec.point, len(spec.choices)
    persisted = sum(1 for _, ch in spec.choices if isinstance(ch, int))
    if spec.strategy == "prefix":
        return f"its entries 0..{t - 1} issued and landed in order" if t else "nothing of it issued"
    if spec.strategy == "barrier":
        return f"right after its barrier {t - 1}, nothing in flight reached the disk"
    if spec.strategy == "subset":
        return f"before its entry {t}, {persisted} in-flight unit(s) reached the disk, the others did not"
    if spec.strategy == "versions":
        return f"before its entry {t}, a page holds an older version written in the same epoch"
    return f"before its entry {t}, a page torn at sector granularity ({n - 1} other unit(s) in flight landed)"


def _minimize(p: Prepared, c: Candidate) -> tuple[Spec, Judged]:
    """Put in-flight units back to their durable version one at a time while the state still fails."""
    expect = p.ph.expects[c.phase]
    spec = c.spec
    assert c.done is not None
    best = c.done.judged
    for u, ch in list(spec.choices):
        trial = attrs.evolve(spec, choices=tuple(x for x in spec.choices if x[0] != u))
        j = judge(p.tl.materialize(trial), expect)
        if not j.ok:
            spec, best = trial, j
    return spec, best


def _explain(p: Prepared, c: Candidate, opts: Options, oracle_dir: str) -> tuple[str, tuple[Fate, ...], Done]:
    assert c.done is not None
    done = c.done
    j = done.judged
    if c.path:
        parent = p.cands[c.parent] if c.parent is not None else None
        rec = recovery_timeline(state_files(p.tl, c.spec, c.path[:-1]), p.tl.sector_size).rec
        point = c.path[-1].point
        done_steps = [e.name for e in rec.entries[:point] if e.kind == "mark"]
        todo = [e.name for e in rec.entries[point:] if e.kind == "mark"]
        where = (f"recovery had issued {point} of its {len(rec.entries)} entries ({_recovery_text(c.path[-1])}), "
                 f"in the replay of step {todo[0] if todo else '(none: checkpointing)'} (steps replayed before "
                 f"it: {', '.join(done_steps) or 'none'})")
        expect = p.ph.expects[c.phase]
        when = ("the operation had returned, so everything it wrote was durable, but its checkpoint record "
                "was not: recovery replays the whole transaction over the applied image, and its earlier "
                "after-images take the image back to intermediate states" if not expect.inside
                else "the crash interrupted the operation")
        parent_ok = parent is not None and parent.done is not None and parent.done.judged.ok
        why = (f"{j.explanation}. A second crash during the recovery of {'a passing' if parent_ok else 'a failing'} "
               f"state: {where}; {when}")
        return explain.shorten(why), (), done
    spec, mj = _minimize(p, c)
    files = p.tl.materialize(spec)
    if opts.oracle != "none" and done.judged.oracle is None:
        expect = p.ph.expects[c.phase]
        j = judge(p.tl.materialize(c.spec), expect, os.path.join(oracle_dir, "state.qcow2"))
        done = attrs.evolve(done, judged=attrs.evolve(j, recovery=None))
    minimal = fates(p.tl, spec, p.entries, only_chosen=True)
    if minimal:
        what = "; ".join(explain.fate_text(f, p.entries, p.steps) for f in minimal)
        head = f"Fails with only this of what was in flight on disk: {what} (everything else in flight lost)"
    else:
        head = "Fails with nothing in flight on disk (the durable state alone)"
    span = (c.phase - 1) // 2
    old_img = p.ph.images[span] if c.phase % 2 else p.ph.images[c.phase // 2]
    new_img = p.ph.images[span + 1] if c.phase % 2 else old_img
    cs = 1 << read_field(old_img, "cluster_bits")
    fields = explain.provenance(files[IMAGE][:cs], old_img[:cs], new_img[:cs])
    parts = [head, mj.explanation]
    if fields:
        parts.append(f"header fields the operation changes: {fields}")
    has_ac = len(files[IMAGE]) >= field_span("autoclear_features")[1]
    ac = read_field(files[IMAGE], "autoclear_features") if has_ac else 0
    consistent = "set: the header says the bitmaps are consistent"
    parts.append(f"autoclear bit 0 is {consistent if ac & AUTOCLEAR_BITMAPS else 'clear'}")
    orc = done.judged.oracle
    if orc is not None and orc.outcome == "error" and "qemu-img" not in mj.explanation:
        parts.append(f"qemu-img on the unminimized state: check exit {orc.check_exit}"
                     f"{', ' + orc.error if orc.error else ''}")
    return explain.shorten(". ".join(x.rstrip(".") for x in parts if x) + "."), minimal, done


@attrs.define
class _Count:
    generated: int = 0
    unique: int = 0
    outcomes: dict[str, int] = attrs.Factory(dict)


def finish(p: Prepared, opts: Options) -> WorkloadResult:
    """Turn the checked candidates into the report's values; explain a few failures."""
    w, entries = p.w, p.entries
    counts = {s: _Count(p.generated.get(s, 0)) for s in opts.strategies}
    failures = [c for c in p.cands if c.done is not None and not c.done.judged.ok]
    chosen: list[Candidate] = []
    for c in failures:        # distinct invariants first, then in order
        if c.done is not None and c.done.judged.invariant not in {x.done.judged.invariant for x in chosen if x.done}:
            chosen.append(c)
    chosen += [c for c in failures if c not in chosen]
    explained: dict[int, tuple[str, tuple[Fate, ...], Done]] = {}
    with tempfile.TemporaryDirectory(prefix="crashsim-") as d:
        for c in chosen[:MINIMIZE]:
            explained[c.index] = _explain(p, c, opts, d)
    states, verdicts = [], []
    ids: dict[int, str] = {}
    for c in p.cands:
        if c.done is None:
            continue
        strategy = "recovery" if c.path else c.spec.strategy
        cnt = counts.setdefault(strategy, _Count())
        sid = ids[c.index] = f"{w.name}/{strategy}/{cnt.unique}"
        done = c.done
        explanation, minimal = explain.shorten(done.judged.explanation), tuple[Fate, ...]()
        if c.index in explained:
            explanation, minimal, done = explained[c.index]
        j = done.judged
        states.append(CrashState(sid, w.name, strategy, c.spec.point, describe(p, c, ids), done.digest,
                                 fates(p.tl, c.spec, entries), c.spec.seed,
                                 ids.get(c.parent) if c.parent is not None else None, encode_path(c.path),
                                 c.duplicates, encode_choices(c.spec.choices, p.tl.snapshots[c.spec.point].inflight)))
        v = Verdict(sid, j.qjournal, j.plain, j.leaks, j.corruptions, j.recovered, j.idempotent, j.oracle,
                    j.allowed_qjournal, j.allowed_plain, j.ok, j.invariant, explanation, minimal)
        verdicts.append(v)
        cnt.unique += 1
        cnt.outcomes[v.combined] = cnt.outcomes.get(v.combined, 0) + 1
    return WorkloadResult(w.name, w.description, w.expect_failure, w.journaled, w.base.describe(), entries,
                          p.r.returned, _transactions(p), tuple(states), tuple(verdicts),
                          tuple(StrategyCount(s, counts[s].generated, counts[s].unique, counts[s].outcomes)
                                for s in STRATEGIES if s in counts),
                          explain.shorten(p.ph.semantics[0].text()), explain.shorten(p.ph.semantics[-1].text()),
                          time.perf_counter() - p.t0, unsynced=unsynced(p.tl, entries))


def unsynced(tl: Timeline, entries: tuple[EntryInfo, ...]) -> str:
    """What was still in flight once the workload returned and its image was closed: every
    write must be covered by a barrier by then, or a power loss after close loses it."""
    left = tl.snapshots[len(entries)].inflight
    parts = []
    for (f, page), versions in sorted(left.items()):
        e = entries[versions[-1].entry]
        unit = "its size" if page == SIZE else f"page {page:#x}"
        parts.append(f"{tl.files[f]} {unit} (entry {e.index}, {e.site})")
    if not parts:
        return ""
    return explain.shorten(f"{len(parts)} unit(s) written and never synced before close: {'; '.join(parts)}")


def _transactions(p: Prepared) -> tuple[TransactionInfo, ...]:
    out = []
    for i, s in enumerate(p.r.txs):
        lo = max(s.begin, 0)
        span = p.entries[lo:s.end + 1]
        steps = []
        commit_at = None
        for e in span:
            if e.kind == "mark" and e.name == "commit":
                commit_at = e.index
            elif e.kind == "mark" and e.name not in ("tx-begin", "tx-end", "returned"):
                steps.append(e.name)
        barriers = [e for e in span if e.kind == "barrier"]
        effective = sum(1 for e in barriers if any(n > 0 for _, n in e.ranges))
        empty = len(barriers) - effective
        if p.w.journaled:
            precommit = commit_at is not None and any(
                e.kind == "write" and e.file == IMAGE for e in span if e.index < commit_at)
            minimum = int(precommit) + 1 + len(steps)
            reason = (f"{'1 precommit flush of new clusters + ' if precommit else ''}1 journal commit + "
                      f"{len(steps)} step barrier(s)")
        else:
            minimum = p.w.minimum or len(steps)
            reason = f"one barrier after each of the protocol's {minimum} ordered steps"
        if empty:
            reason += f"; not counted: {empty} flush(es) of no range, which cover nothing"
        out.append(TransactionInfo(i, explain.shorten(s.description), lo, s.end, tuple(steps), effective, minimum, reason))
    return tuple(out)


# -- the run -----------------------------------------------------------------------------------
def make_executor(opts: Options) -> tuple[cf.Executor, Callable[[], None]]:
    """The executor ``opts`` asks for, and how to shut it down."""
    if opts.executor.startswith("dask://"):
        from distributed import Client    # lazily: dask is an optional dependency
        client = Client("tcp://" + opts.executor[len("dask://"):])
        return client.get_executor(), client.close
    jobs = opts.jobs or os.cpu_count() or 1
    if opts.executor == "inline" or jobs == 1:
        return InlineExecutor(), lambda: None
    pool = cf.ProcessPoolExecutor(jobs)
    return pool, pool.shutdown


def run(workloads: Sequence[Workload], opts: Options, executor: cf.Executor | None = None,
        progress: bool = False) -> RunResult:
    """Run every workload; ``executor`` defaults to what ``opts`` asks for."""
    for s in opts.strategies:
        if s not in STRATEGIES:
            raise ValueError(f"unknown strategy {s!r}; known: {', '.join(STRATEGIES)}")
    t0 = time.perf_counter()
    shutdown: Callable[[], None] = lambda: None
    if executor is None:
        executor, shutdown = make_executor(opts)
    jobs = opts.jobs or os.cpu_count() or 1
    bar = Progress(0, "crashsim", "batch", minimum=0, show=progress)
    try:
        prepared: list[Prepared | WorkloadResult] = []
        for w in workloads:
            try:
                p = prepare(w, opts)
            except Exception as e:      # the workload itself failed: reported, not raised
                prepared.append(_error_result(w, f"{type(e).__name__}: {e}"))
                continue
            p.futures = _submit(p, executor, p.cands, jobs)
            bar.add(len(p.futures))
            prepared.append(p)
        depth = opts.recovery_depth if "recovery" in opts.strategies else 0
        for level in range(1, depth + 1):
            for item in prepared:
                if isinstance(item, Prepared):
                    _collect(item, item.futures, bar.update)
                    item.futures = _submit(item, executor, _next_wave(item, opts, level), jobs)
                    bar.add(len(item.futures))
        results: list[WorkloadResult] = []
        for item in prepared:
            if isinstance(item, Prepared):
                _collect(item, item.futures, bar.update)
                item = finish(item, opts)
            results.append(item)
    finally:
        bar.close()
        shutdown()
    return RunResult(opts, tuple(results), time.perf_counter() - t0)


def _error_result(w: Workload, error: str) -> WorkloadResult:
    return WorkloadResult(w.name, w.description, w.expect_failure, w.journaled, w.base.describe(), (), -1,
                          (), (), (), (), "", "", 0.0, error)


def encode_choices(choices: Sequence[tuple[tuple[int, int], Choice]],
                   inflight: dict[tuple[int, int], Any] | None = None) -> str:
    """A spec's choices as text: ``file.page.version`` or ``file.page.version.tearmask`` (hex,
    page -1 for a file's size), joined by ``+`` (see :attr:`CrashState.choices`).

    With ``inflight`` (the in-flight units of the spec's crash point and their versions),
    compactly: ``L`` and a hex mask of the units (in sorted order) at their latest version,
    then ``+index.version`` or ``+index.version.tearmask`` for each other one.
    """
    if inflight is not None:
        units = sorted(inflight)
        index = {u: i for i, u in enumerate(units)}
        mask, rest = 0, []
        for u, ch in choices:
            if ch == len(inflight[u]) - 1:
                mask |= 1 << index[u]
            else:
                tail = f"{ch:x}" if isinstance(ch, int) else f"{ch[0]:x}.{ch[1]:x}"
                rest.append(f"{index[u]:x}.{tail}")
        return "+".join([f"L{mask:x}"] + rest) if choices else ""
    out = []
    for (f, page), ch in choices:
        tail = f"{ch:x}" if isinstance(ch, int) else f"{ch[0]:x}.{ch[1]:x}"
        out.append(f"{f:x}.{page:x}.{tail}" if page >= 0 else f"{f:x}.-1.{tail}")
    return "+".join(out)


def encode_path(path: Sequence[Spec]) -> str:
    """A recovery path as text: ``strategy:point:choices:seed`` per level, joined by ``/``."""
    return "/".join(f"{s.strategy}:{s.point}:{encode_choices(s.choices) or '-'}:{'-' if s.seed is None else s.seed}"
                    for s in path)


def decode_path(text: str) -> tuple[Spec, ...]:
    out = []
    for part in filter(None, text.split("/")):
        strategy, point, choices, seed = part.split(":")
        out.append(Spec(strategy, int(point), decode_choices("" if choices == "-" else choices),
                        None if seed == "-" else int(seed)))
    return tuple(out)


def decode_choices(text: str, inflight: dict[tuple[int, int], Any] | None = None
                   ) -> tuple[tuple[tuple[int, int], Choice], ...]:
    """The choices :func:`encode_choices` wrote (``inflight`` for its compact form)."""
    out: list[tuple[tuple[int, int], Choice]] = []
    if text.startswith("L"):
        assert inflight is not None, "compact choices need the crash point's in-flight units"
        units = sorted(inflight)
        head, *rest = text.split("+")
        mask = int(head[1:], 16)
        out = [(u, len(inflight[u]) - 1) for i, u in enumerate(units) if mask >> i & 1]
        for part in rest:
            i, *v = part.split(".")
            out.append((units[int(i, 16)], int(v[0], 16) if len(v) == 1 else (int(v[0], 16), int(v[1], 16))))
        return tuple(sorted(out))
    for part in filter(None, text.split("+")):
        f, page, *rest = part.split(".")
        unit = (int(f, 16), -1 if page == "-1" else int(page, 16))
        out.append((unit, int(rest[0], 16) if len(rest) == 1 else (int(rest[0], 16), int(rest[1], 16))))
    return tuple(out)


def recorded_state(w: Workload, opts: Options, state: CrashState,
                   parent: CrashState | None = None) -> dict[str, bytes]:
    """Rebuild the files of one reported state (for ``crashsim replay``)."""
    r = record(w, opts.seed, opts.medium)
    tl = Timeline(r.rec, opts.sector_size)
    if state.choices or not state.fates:
        spec = Spec(state.strategy, state.point,
                    decode_choices(state.choices, tl.snapshots[state.point].inflight), state.seed)
        return state_files(tl, spec, decode_path(state.recovery))
    base = parent if state.strategy == "recovery" and parent is not None else state
    snap = tl.snapshots[base.point]
    choices: list[tuple[tuple[int, int], Choice]] = []
    by_unit = {(f.file, f.offset if f.unit == "page" else SIZE): f for f in base.fates}
    for u in sorted(snap.inflight):
        fi, page = u
        fate = by_unit.get((tl.files[fi], page))
        if page == SIZE:
            f_size = next((f for f in base.fates if f.unit == "size" and f.file == tl.files[fi]), None)
            if f_size is not None and f_size.fate == "persisted":
                choices.append((u, len(f_size.entries) - 1))
            continue
        if fate is None or fate.fate == "dropped":
            continue
        v = len(fate.entries) - 1
        if fate.fate == "persisted":
            choices.append((u, v))
        else:
            choices.append((u, (v, sum(1 << s for s in fate.new_sectors))))
    spec = Spec(base.strategy, base.point, tuple(choices), base.seed)
    return state_files(tl, spec, decode_path(state.recovery))

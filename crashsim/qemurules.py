"""Judging the crash states of a recorded QEMU command by QEMU's own rules (``crashsim run --trace``).

A trace (see :mod:`crashsim.trace`) becomes a :class:`~crashsim.recorder.Recording`, and
the usual :class:`~crashsim.states.Timeline` and :class:`~crashsim.states.Generator`
enumerate its crash states (``prefix``, ``barrier``, ``subset``, ``versions``, ``torn``;
there is no journal, so no ``recovery``). Identical states are judged once, the first
strategy that produced a content owns it. When there are more than ``max_states``
distinct states, the in-order prefixes and a seeded sample of the others, ``max_states``
in all, are judged, and the summary says so. A strategy stops generating after
``max(4 * max_states, 1000)`` candidates (a large write puts thousands of pages in flight,
and ``torn`` alone would make millions), and the summary says that too: the candidates
kept are the first ones, those of the first pages in flight.

Each state's image bytes go through, in a worker process:

- ``qemu-img check --output=json``: corruptions, leaks, and whether it opens at all;
- ``qemu-img info --output=json -U``: virtual size, bitmaps (name, granularity, flags),
  snapshots, and the rest of the format-specific data;
- ``qemu-img compare``: the guest data, against the image before the command and after it;
  when it is neither, ``qemu-img convert -O raw`` and a comparison sector by sector (512 B):
  each sector must hold its old or its new bytes;
- qjournal's own check (:func:`crashsim.checks.open_view`: read-only, over memory) as a
  second opinion, and qjournal's reading of the bitmaps' bits, which ``info`` does not show.

Outcomes, the first that applies:

========================  ==========================================================
``unopenable``            ``qemu-img info`` or ``check`` cannot open the image
``corrupt``               ``check`` finds corruptions, a guest sector holds neither its
                          old nor its new bytes, or what ``info`` shows is neither the
                          old nor the new image and not one of the two below
``bitmaps dropped``       as old or new, but the bitmaps are gone (the autoclear bit is
                          clear, so QEMU ignores the bitmaps extension)
``bitmap left in_use``    as old or new, but a bitmap is flagged ``in-use`` that is not in
                          that image (QEMU refuses to use it until it is removed)
``leaks only``            as old or new, with more leaked clusters than that image
``old`` / ``new``         ``info`` and the guest data are those of the image before /
                          after the command; when both are the same, the bitmaps' bits
                          as qjournal reads them decide (old wins if they do not)
========================  ==========================================================

The qcow2 specification allows every outcome but ``corrupt`` and ``unopenable`` after a
crash: the autoclear bit exists so that bitmaps can be dropped, ``in-use`` exists so that
a bitmap that may miss writes is refused, leaks cost only space. So ``crashsim run
--trace`` exits 0 when no state is corrupt or unopenable, and 1 otherwise: QEMU's own
protocols are reported, and a state outside what the spec allows fails the run, whoever
wrote it. qjournal's second opinion is reported (as disagreements), never part of the rule.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import attrs
import numpy as np

from qjournal.format.geometry import SECTOR

from .checks import View, open_view
from .recorder import IMAGE
from .states import Generator, Spec, Timeline
from .trace import Trace, final_image, load, to_recording

OUTCOMES = ("old", "new", "bitmaps dropped", "bitmap left in_use", "leaks only", "corrupt", "unopenable")
NOT_ALLOWED = frozenset({"corrupt", "unopenable"})
TRACE_STRATEGIES = ("prefix", "barrier", "subset", "versions", "torn")
QEMU_TIMEOUT = 60.0
#: info keys that change without the image's meaning changing (or that name the file)
VOLATILE = ("filename", "actual-size", "dirty-flag", "children")


@attrs.frozen
class Look:
    """What QEMU (and qjournal, second) see of one image."""

    opened: bool
    error: str                          # first line of a failing qemu-img's stderr, or check's first ERROR
    check_exit: int
    corruptions: int
    leaks: int
    info: dict[str, Any] | None         # normalized: VOLATILE keys removed
    guest: str                          # "old", "new" (equal guest data), "mixed" (each sector old or new),
                                        # "bad N AT" (N sectors neither, the first at AT), "" (not compared)
    qjournal: str                       # "clean", "N leaks", "N corruptions: first message", "error: ..."
    bitmap_bits: Any                    # qjournal's bitmaps (name, granularity, flags, dirty extents), or None


@attrs.frozen
class Refs:
    """The images before and after the command, as files in ``folder`` (qcow2 and raw guest data)."""

    folder: str
    old: Look
    new: Look

    def path(self, which: str, raw: bool = False) -> str:
        return os.path.join(self.folder, f"{which}.{'raw' if raw else 'qcow2'}")


@attrs.frozen
class Judgement:
    id: str                             # "<name>/<strategy>/<n>"
    strategy: str
    point: int
    outcome: str
    reason: str
    corruptions: int
    leaks: int
    qjournal: str
    disagree: str                       # where qjournal's view contradicts QEMU's ("" when it does not)
    duplicates: int = 0


@attrs.frozen
class StrategyTally:
    strategy: str
    generated: int
    unique: int
    stopped: bool = False               # the strategy had more candidates than the generation budget


@attrs.frozen
class TraceResult:
    name: str
    command: tuple[str, ...]
    writes: int
    barriers: int
    tallies: tuple[StrategyTally, ...]
    unique: int                         # distinct states over all strategies
    judged: tuple[Judgement, ...]
    sampled: bool                       # more than max_states: a seeded sample was judged
    seconds: float

    def outcomes(self) -> dict[str, int]:
        out = {o: 0 for o in OUTCOMES}
        for j in self.judged:
            out[j.outcome] += 1
        return {k: v for k, v in out.items() if v}

    @property
    def ok(self) -> bool:
        return not any(j.outcome in NOT_ALLOWED for j in self.judged)


# -- looking at one image --------------------------------------------------------------
def _qemu(args: Sequence[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["qemu-img", *args], capture_output=True, timeout=QEMU_TIMEOUT)


def _first(stderr: bytes) -> str:
    return next((ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()), "")


def look(image: bytes, workdir: str, label: str = "state", refs: Refs | None = None) -> Look:
    """Run qemu-img check and info on ``image`` (written into ``workdir``), compare its guest data
    with the references' (``qemu-img compare``; sector by sector only when it is neither), and
    qjournal's check."""
    path = os.path.join(workdir, label.replace("/", "-") + ".qcow2")
    with open(path, "wb") as f:
        f.write(image)
    chk = _qemu(["check", "--output=json", "-f", "qcow2", path])
    try:
        cj = json.loads(chk.stdout) if chk.stdout.strip() else None
    except json.JSONDecodeError:
        cj = None
    inf = _qemu(["info", "--output=json", "-U", "-f", "qcow2", path])
    view = open_view(image, b"", label)
    qj, bits = _qjournal_text(view)
    if cj is None or chk.returncode == 1 or inf.returncode != 0:
        err = _first(chk.stderr) or _first(inf.stderr) or f"qemu-img check exit {chk.returncode}"
        return Look(False, err, chk.returncode, 0, 0, None, "", qj, bits)
    info = {k: v for k, v in json.loads(inf.stdout).items() if k not in VOLATILE}
    errors = [ln.strip() for ln in chk.stderr.decode(errors="replace").splitlines() if ln.startswith("ERROR")]
    error = (errors[0] if errors else _first(chk.stderr)) if cj.get("corruptions") else ""
    guest = "" if refs is None else _guest(path, refs)
    return Look(True, error, chk.returncode, int(cj.get("corruptions", 0)), int(cj.get("leaks", 0)),
                info, guest, qj, bits)


def _same_guest(a: str, b: str) -> bool | None:
    """``qemu-img compare``: True identical, False different, None it could not read one of them."""
    res = _qemu(["compare", "-q", "-U", "-f", "qcow2", "-F", "qcow2", a, b])
    return {0: True, 1: False}.get(res.returncode)


def _guest(path: str, refs: Refs) -> str:
    for which in ("old", "new"):
        same = _same_guest(path, refs.path(which))
        if same:
            return which
        if same is None:
            return "bad unreadable 0"
    raw = path + ".raw"
    conv = subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", path, raw],
                          capture_output=True, timeout=QEMU_TIMEOUT)
    if conv.returncode != 0:
        return "bad unreadable 0"
    with open(raw, "rb") as f, open(refs.path("old", True), "rb") as o, open(refs.path("new", True), "rb") as n:
        bad = bad_guest_sectors(f.read(), o.read(), n.read())
    os.unlink(raw)
    return f"bad {len(bad)} {bad[0]:#x}" if bad else "mixed"


def make_refs(folder: str, old: bytes, new: bytes) -> Refs:
    """Write the images before and after the command into ``folder``, with their guest data as raw."""
    looks = []
    for which, image in (("old", old), ("new", new)):
        path = os.path.join(folder, f"{which}.qcow2")
        with open(path, "wb") as f:
            f.write(image)
        conv = subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", path, path[:-5] + "raw"],
                              capture_output=True, timeout=QEMU_TIMEOUT)
        if conv.returncode != 0:
            raise ValueError(f"the image {which} the command cannot be read by qemu-img: {_first(conv.stderr)}")
        looks.append(look(image, folder, f"{which}-look"))
    # A reference's guest field says whether the two guest data are the same ("same") or not.
    same = "same" if _same_guest(os.path.join(folder, "old.qcow2"), os.path.join(folder, "new.qcow2")) else ""
    return Refs(folder, attrs.evolve(looks[0], guest=same or "old"), attrs.evolve(looks[1], guest=same or "new"))


def _qjournal_text(v: View) -> tuple[str, Any]:
    if v.semantic is None:
        return "error: " + v.error.splitlines()[0] if v.error else "error", None
    bits = tuple(b for b in v.semantic.bitmaps)
    if v.corruptions:
        return f"{v.corruptions} corruptions: {v.messages[0] if v.messages else ''}".rstrip(": "), bits
    return (f"{v.leaks} leaks" if v.leaks else "clean"), bits


# -- classifying -----------------------------------------------------------------------
def _bitmaps(info: dict[str, Any]) -> list[dict[str, Any]]:
    return list(info.get("format-specific", {}).get("data", {}).get("bitmaps", []))


def _without_bitmaps(info: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(info))
    out.get("format-specific", {}).get("data", {}).pop("bitmaps", None)
    return out


def _without_in_use(info: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(info))
    for b in _bitmaps(out):
        b["flags"] = [f for f in b.get("flags", []) if f != "in-use"]
    return out


def bad_guest_sectors(cur: bytes, old: bytes, new: bytes) -> list[int]:
    """Guest offsets of the sectors of ``cur`` holding neither their old nor their new bytes
    (a sector past the end of ``old`` or ``new`` counts as zeros there)."""
    n = -(-len(cur) // SECTOR) * SECTOR

    def sectors(b: bytes) -> np.ndarray:
        b = b[:n] + bytes(max(0, n - len(b)))
        return np.frombuffer(b, dtype=np.uint8).reshape(-1, SECTOR)

    c, o, w = sectors(cur), sectors(old), sectors(new)
    bad = ~((c == o).all(axis=1) | (c == w).all(axis=1))
    return [int(i) * SECTOR for i in np.nonzero(bad)[0]]


def classify(s: Look, old: Look, new: Look) -> tuple[str, str]:
    """The outcome of a state (see the module docstring) and why, in a few words."""
    if not s.opened or s.info is None:
        return "unopenable", s.error or "qemu-img cannot open it"
    if s.corruptions:
        return "corrupt", f"qemu-img check: {s.corruptions} corruptions ({s.error})"
    if s.guest.startswith("bad"):
        _, n, at = s.guest.split()
        if n == "unreadable":
            return "corrupt", "guest data: qemu-img cannot read it all"
        return "corrupt", f"guest data: {n} sector(s) hold neither old nor new bytes, the first at {at}"
    note = "; guest data part old, part new" if s.guest == "mixed" else ""
    refs = [("old", old), ("new", new)]
    candidates = [n for n, r in refs if s.info == r.info]
    # Between two equal infos, the guest data decides where old and new differ in it, else
    # the bitmaps' bits as qjournal reads them (qemu-img info does not show them: a merge or
    # a clear changes nothing else). Guest data of one under the other's metadata is said so.
    by_bits = [n for n, r in refs if n in candidates and r.bitmap_bits == s.bitmap_bits]
    if old.guest != new.guest and s.guest in candidates:
        match: str | None = s.guest
    elif len(by_bits) == 1:
        match = by_bits[0]
    else:
        match = candidates[0] if candidates else None
    if match is not None and s.guest in ("old", "new") and s.guest != match and old.guest != new.guest:
        note = f"; guest data of the {s.guest} image"
    if match is None:
        dropped = _prefer(s.guest, [n for n, r in refs if not _bitmaps(s.info) and _bitmaps(r.info or {})
                                    and _without_bitmaps(r.info or {}) == s.info])
        if dropped:
            return "bitmaps dropped", f"as {dropped}, without its bitmaps (autoclear bit clear){note}"
        in_use = [b["name"] for b in _bitmaps(s.info) if "in-use" in b.get("flags", [])]
        held = _prefer(s.guest, [n for n, r in refs
                                 if in_use and _without_in_use(r.info or {}) == _without_in_use(s.info)])
        if held:
            return "bitmap left in_use", f"as {held}, with bitmap(s) {', '.join(in_use)} flagged in-use{note}"
        return "corrupt", "qemu-img info shows neither the old nor the new image: " + _info_diff(s.info, old, new)
    ref = old if match == "old" else new
    if s.leaks > ref.leaks:
        return "leaks only", f"as {match}, {s.leaks - ref.leaks} leaked cluster(s){note}"
    return match, f"as {match}{note}"


def _prefer(guest: str, candidates: list[str]) -> str | None:
    """The candidate whose guest data the state holds, else the first (None: no candidate)."""
    return guest if guest in candidates else (candidates[0] if candidates else None)


def _info_diff(info: dict[str, Any], old: Look, new: Look) -> str:
    out = []
    for n, r in (("old", old), ("new", new)):
        ref = r.info or {}
        flat_s, flat_r = _flatten(info), _flatten(ref)
        keys = sorted(k for k in flat_s.keys() | flat_r.keys() if flat_s.get(k) != flat_r.get(k))
        out.append(f"vs {n}: " + ", ".join(f"{k}={flat_s.get(k)!r}" for k in keys[:3]))
    return "; ".join(out)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): json.dumps(d, sort_keys=True)}


def disagreement(s: Look, outcome: str, old: Look, new: Look) -> str:
    """Where qjournal's second opinion contradicts QEMU's ("" when it does not)."""
    qbad = s.qjournal.startswith(("error", "corrupt")) or "corruptions" in s.qjournal
    if outcome in NOT_ALLOWED and not qbad:
        return f"qjournal finds it {s.qjournal}"
    if outcome not in NOT_ALLOWED and qbad:
        return f"qjournal: {s.qjournal}"
    if outcome in ("old", "new") and s.bitmap_bits is not None:
        ref = old if outcome == "old" else new
        if ref.bitmap_bits is not None and s.bitmap_bits != ref.bitmap_bits \
                and s.bitmap_bits != (new if outcome == "old" else old).bitmap_bits:
            return "qjournal: the bitmaps' bits are neither old nor new"
    return ""


# -- workers -------------------------------------------------------------------------
_REFS: list[Refs] = []


def _init(refs: Refs) -> None:
    _REFS[:] = [refs]


def _judge(job: tuple[str, str, int, bytes, int]) -> Judgement:
    sid, strategy, point, image, dups = job
    refs = _REFS[0]
    with tempfile.TemporaryDirectory(prefix="state-", dir=refs.folder) as d:
        s = look(image, d, sid, refs)
    outcome, reason = classify(s, refs.old, refs.new)
    return Judgement(sid, strategy, point, outcome, reason, s.corruptions, s.leaks, s.qjournal,
                     disagreement(s, outcome, refs.old, refs.new), dups)


# -- a whole trace -------------------------------------------------------------------
def check_trace(trace: Trace, name: str, strategies: Sequence[str] = TRACE_STRATEGIES, *, k: int = 2,
                samples: int = 32, seed: int = 0, max_tears: int = 32, sector_size: int = SECTOR,
                max_states: int = 500, jobs: int = 0, max_candidates: int | None = None) -> TraceResult:
    """Generate every crash state of ``trace`` and judge each (a seeded sample of at most
    ``max_states`` distinct ones when there are more), in ``jobs`` worker processes.
    ``max_candidates``: the generation budget per strategy (default ``max(4 * max_states, 1000)``)."""
    t0 = time.monotonic()
    rec = to_recording(trace)
    tl = Timeline(rec, sector_size)
    gen = Generator(tl, name, k=k, samples=samples, seed=seed, max_tears=max_tears)
    owner: dict[Any, tuple[str, Spec, int]] = {}
    dups: dict[Any, int] = {}
    tallies = []
    budget = max_candidates if max_candidates is not None else max(4 * max_states, 1000)
    for strategy in strategies:
        generated, unique, stopped = 0, 0, False
        for spec in gen.generate(strategy):
            if generated == budget:
                stopped = True
                break
            generated += 1
            key = tl.key(spec)
            if key in owner:
                dups[key] = dups.get(key, 0) + 1
                continue
            unique += 1
            owner[key] = (f"{name}/{strategy}/{unique - 1}", spec, len(owner))
        tallies.append(StrategyTally(strategy, generated, unique, stopped))
    chosen = list(owner.items())
    sampled = len(chosen) > max_states
    if sampled:
        # Every in-order prefix is kept (the old and new states among them), the rest sampled.
        first = [i for i, (_, (_, spec, _)) in enumerate(chosen) if spec.strategy == "prefix"][:max_states]
        taken = set(first)
        rest = [i for i in range(len(chosen)) if i not in taken]
        keep = taken | set(random.Random(f"{seed}:{name}:sample").sample(rest, max_states - len(first)))
        chosen = [c for i, c in enumerate(chosen) if i in keep]

    def job(item: tuple[Any, tuple[str, Spec, int]]) -> tuple[str, str, int, bytes, int]:
        key, (sid, spec, _) = item
        return sid, spec.strategy, spec.point, tl.materialize(spec)[IMAGE], dups.get(key, 0)

    workers = jobs or os.cpu_count() or 1
    judged: list[Judgement] = []
    with tempfile.TemporaryDirectory(prefix="crashsim-qemu-") as d:
        refs = make_refs(d, trace.initial, final_image(trace))
        if workers == 1:
            _init(refs)
            judged = [_judge(job(c)) for c in chosen]
        else:
            # States are materialized a window at a time: a trace of a large write makes large states.
            window = workers * 2
            with cf.ProcessPoolExecutor(workers, initializer=_init, initargs=(refs,)) as ex:
                for i in range(0, len(chosen), window):
                    judged += ex.map(_judge, [job(c) for c in chosen[i:i + window]])
    writes = sum(1 for e in rec.entries if e.kind == "write")
    barriers = sum(1 for e in rec.entries if e.kind == "barrier")
    command = trace.header.get("template") or trace.header.get("command", ())
    return TraceResult(name, tuple(command), writes, barriers, tuple(tallies),
                       len(owner), tuple(judged), sampled, time.monotonic() - t0)


def summary_lines(r: TraceResult, verbose: bool = True) -> list[str]:
    """The report of one trace: a line per strategy, the distribution of outcomes, the states
    the spec does not allow (at most 5 shown), and qjournal's disagreements."""
    lines = [f"{r.name}: {' '.join(r.command)}",
             f"  {r.writes} writes, {r.barriers} barriers; {r.unique} distinct states"
             + (f", a seeded sample of {len(r.judged)} judged" if r.sampled else ", all judged")]
    by_strategy: dict[str, dict[str, int]] = {}
    for j in r.judged:
        d = by_strategy.setdefault(j.strategy, {})
        d[j.outcome] = d.get(j.outcome, 0) + 1
    for t in r.tallies:
        dist = ", ".join(f"{o} {n}" for o, n in sorted(by_strategy.get(t.strategy, {}).items(),
                                                         key=lambda x: OUTCOMES.index(x[0])))
        lines.append(f"  {t.strategy}: {t.unique}/{t.generated} states"
                     + (" (generation stopped there: the first candidates only)" if t.stopped else "")
                     + (f": {dist}" if dist else ""))
    lines.append("  outcomes: " + ", ".join(f"{o} {n}" for o, n in r.outcomes().items()))
    if verbose:
        bad = [j for j in r.judged if j.outcome in NOT_ALLOWED]
        for j in bad[:5]:
            lines.append(f"  {j.id} {j.outcome.upper()}: {j.reason}")
        if len(bad) > 5:
            lines.append(f"  ... and {len(bad) - 5} more not allowed by the qcow2 spec")
        odd = [j for j in r.judged if j.disagree]
        for j in odd[:3]:
            lines.append(f"  {j.id} ({j.outcome}) second opinion differs: {j.disagree}")
        if len(odd) > 3:
            lines.append(f"  ... and {len(odd) - 3} more where qjournal's check disagrees")
    return lines


def run_trace(path: str, strategies: Sequence[str], *, k: int = 2, samples: int = 32, seed: int = 0,
              max_tears: int = 32, sector_size: int = SECTOR, max_states: int = 500, jobs: int = 0,
              quiet: bool = False) -> int:
    """``crashsim run --trace``: print the report; 0 when no state is corrupt or unopenable, else 1."""
    try:
        trace = load(path)
    except (OSError, ValueError) as e:
        print(f"crashsim: {e}", file=sys.stderr)
        return 1
    skipped = [s for s in strategies if s not in TRACE_STRATEGIES]
    used = [s for s in strategies if s in TRACE_STRATEGIES]
    name = os.path.basename(path).removesuffix(".trace")
    r = check_trace(trace, name, used, k=k, samples=samples, seed=seed, max_tears=max_tears,
                    sector_size=sector_size, max_states=max_states, jobs=jobs)
    if not quiet:
        print("\n".join(summary_lines(r)))
    if skipped:
        print(f"crashsim: a trace has no journal to recover: strategy {', '.join(skipped)} does not apply")
    bad = sum(1 for j in r.judged if j.outcome in NOT_ALLOWED)
    verdict = "PASS" if r.ok else "FAIL (states the qcow2 spec does not allow)"
    print(f"crashsim: trace {name}: {len(r.judged)} states judged in {r.seconds:.1f} s: {bad} corrupt or "
          f"unopenable: {verdict}")
    return 0 if r.ok else 1

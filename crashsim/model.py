"""The data of a crashsim run, as the report renders it: plain attrs values and their JSON.

This module is the contract between the engine (recorder, states, checks, runner) and
the report (``crashsim.report``). Everything here is a frozen value that survives a
round trip through :meth:`RunResult.to_json` / :meth:`RunResult.from_json` unchanged.

Vocabulary
==========

- An *entry* is one thing a recording medium saw: a ``write`` (with its data, which the
  report does not get), a ``barrier`` (msync of ranges on the image, fdatasync of the
  whole journal), a ``resize`` or a named ``mark`` (``commit``, step names such as
  ``autoclear-cleared``, ``tx-begin``/``tx-end``, ``returned``). Entries are numbered
  from 0 in the one global order of both files.
- A *crash point* ``T`` means the entries ``0 .. T-1`` were issued and ``T ..`` were not.
- A *unit* is one 4 KiB page of one file (page-aligned), or the pseudo-unit ``size`` of
  a file. A unit is *in flight* at ``T`` when it was written since the last barrier of
  its file that covers it; it then holds its durable content or any version written to
  it since. A *fate* says which, for one unit of one crash state.
- A *state* is the content of both files after a crash: one choice per in-flight unit.
  States with identical content are checked once (the first strategy that produced the
  content owns it; the others count it as a duplicate).
- Each state is judged through two *views*: ``qjournal`` (open with the journal, which
  recovers; then a second recovery must change nothing) and ``plain`` (a reader that
  ignores the journal: qjournal opened without it, and optionally qemu-img as oracle).
"""
from __future__ import annotations

import json
from typing import Any

import attrs

from qjournal.format.geometry import SECTOR

SECTOR_SIZES = tuple(SECTOR << i for i in range(4))   # the tear units crashsim models: 512 .. 4096 bytes

#: Strategies, in the order they are generated and reported.
STRATEGIES = ("prefix", "barrier", "subset", "versions", "torn", "recovery")

#: What a view can conclude about one state.
#: - ``old`` / ``new``: the semantic state before / after the operation the crash interrupted
#:   (for a crash between two transactions of a workload, "new" is the state after the last
#:   one that returned, and "old" is not allowed);
#: - ``dropped``: the bitmaps are gone through a clear autoclear bit (plain view only);
#: - ``other``: opened, but the state is none of the above;
#: - ``error``: the reader refused or failed to open the image (corrupt, recovery refused).
OUTCOMES = ("old", "new", "dropped", "other", "error")

#: The combined outcome of a state, for counts and colours: the qjournal view's outcome,
#: or ``dropped`` when the plain view dropped the bitmaps, or ``fail`` when any check failed.
COMBINED = ("old", "new", "dropped", "fail")


@attrs.frozen
class EntryInfo:
    """One recorded entry, without its data."""

    index: int
    kind: str                               # write | barrier | resize | mark
    file: str                               # image | journal
    offset: int = 0                         # write: first byte
    length: int = 0                         # write: bytes; resize: the new size
    # barrier: the (offset, length) ranges it was given. A flush of the whole file is recorded as
    # ((0, size),); an empty tuple is a flush of no range, which covers nothing. A journal barrier
    # (fdatasync) covers the whole journal whatever its ranges say.
    ranges: tuple[tuple[int, int], ...] = ()
    name: str = ""                          # mark: its name
    site: str = ""                          # "module:line function" in qjournal or the workload


@attrs.frozen
class TransactionInfo:
    """One transaction (or, for a workload that bypasses the journal, the whole workload).

    ``barriers`` counts the barriers issued from ``first_entry`` to ``last_entry``, both
    files. ``minimum`` is what the ordering rule needs, and ``minimum_reason`` says why:

    - the precommit flush of new clusters, when the transaction writes any (1): ordered
      mode, the data must be durable before the commit that makes anything point at it;
    - the journal commit (1): one fdatasync of the journal is the commit point;
    - one image barrier per step (``len(steps)``): each step must be durable before the
      next one starts, or a crash could leave a later step without an earlier one;
    - closing the journal after the checkpoint (0 here: it belongs to close, not to the
      transaction; a crash before it only makes recovery replay its own after-images).

    So ``minimum = precommit + 1 + steps``: e.g. 1 + 1 + 3 = 5 for the seed protocol with
    a new cluster (none for ``set_in_use``: 1 + 3 = 4), and for a directory rewrite
    (refcounts-increased, header-switched, clusters-freed) 1 + 1 + 3 = 5. For a workload
    that bypasses the journal, the minimum is the number of ordered steps its protocol
    declares (one barrier after each).
    """

    index: int
    description: str
    first_entry: int
    last_entry: int
    steps: tuple[str, ...]
    barriers: int
    minimum: int
    minimum_reason: str


@attrs.frozen
class Fate:
    """What one in-flight unit holds in one crash state.

    ``fate`` is ``persisted`` (it holds the version written by ``entries[-1]``),
    ``dropped`` (it holds its durable content; ``entries`` are the writes that were lost),
    ``torn`` (``new_sectors`` of size ``sector_size`` hold the version of ``entries[-1]``,
    the other sectors the durable content) or, for the ``size`` unit, ``persisted`` /
    ``dropped`` growth or shrink (``offset`` is the size it holds).
    """

    file: str
    unit: str                   # "page" | "size"
    offset: int                 # page offset, or the file size held
    fate: str                   # persisted | dropped | torn
    entries: tuple[int, ...]    # entry indices of the writes involved, in order
    sites: tuple[str, ...]      # their call sites (deduplicated, in order)
    new_sectors: tuple[int, ...] = ()
    sector_size: int = 0


@attrs.frozen
class CrashState:
    """One unique crash state: where the crash happened and what reached the disk.

    ``point`` is the crash point T. ``fates`` lists every unit in flight at T (persisted,
    dropped or torn); units not listed hold their durable content. For the ``recovery``
    strategy, ``parent`` is the id of the state whose recovery was interrupted, ``recovery``
    the path of crash states of the recoveries, one per level, as ``strategy:point:choices:seed``
    joined by ``/`` (see ``crashsim.runner.encode_path``), and ``point`` and ``fates`` are
    those of the first crash.
    ``seed`` is set when the state came from seeded random sampling (subset samples, tear
    samples): the run's seed, so ``crashsim run --seed`` replays it; ``replay`` rebuilds it.
    """

    id: str                     # "<workload>/<strategy>/<n>"
    workload: str
    strategy: str
    point: int
    description: str
    digest: str                 # content hash (blake2b of both files)
    fates: tuple[Fate, ...] = ()
    seed: int | None = None
    parent: str | None = None
    recovery: str = ""
    duplicates: int = 0         # how many more generated candidates had this content
    choices: str = ""           # the units not at their durable version, compactly: "L" and a hex mask of
                                # the in-flight units at their latest version, then "+unit.version[.tearmask]"
                                # (see crashsim.runner.encode_choices): what ``replay`` rebuilds the state from


@attrs.frozen
class OracleResult:
    """qemu-img's view of the image file of one state (a reader that ignores the journal)."""

    check_exit: int             # qemu-img check: 0 clean, 2 corruptions, 3 leaks, 1 incomplete
    corruptions: int
    leaks: int
    bitmaps: tuple[tuple[str, int, tuple[str, ...]], ...] | None  # (name, granularity, flags); None: info failed
    outcome: str                # one of OUTCOMES
    error: str = ""             # stderr of a failing qemu-img


@attrs.frozen
class Verdict:
    """The judgement of one state.

    ``allowed`` lists the outcomes the crash point permits (see DESIGN.md, "Outcomes a
    crash may leave"). ``invariant`` names the first rule broken (empty when ``ok``), and
    ``explanation`` says, minimally, which in-flight writes made it fail and what each
    reader saw (for header tears: which header fields hold old and which new values).
    """

    state_id: str
    qjournal: str               # one of OUTCOMES, after recovery
    plain: str                  # one of OUTCOMES, without the journal
    leaks: int                  # plain view: leaked clusters (qjournal.check)
    corruptions: int            # plain view: corruptions (qjournal.check)
    recovered: bool             # the qjournal view replayed something
    idempotent: bool            # a second recovery changed nothing
    oracle: OracleResult | None
    allowed_qjournal: tuple[str, ...]
    allowed_plain: tuple[str, ...]
    ok: bool
    invariant: str = ""
    explanation: str = ""
    minimal: tuple[Fate, ...] = ()  # a smallest set of in-flight fates that still fails

    @property
    def combined(self) -> str:
        if not self.ok:
            return "fail"
        if self.plain == "dropped":
            return "dropped"
        return self.qjournal


@attrs.frozen
class StrategyCount:
    """Candidates generated by one strategy, unique after dedupe, and their outcomes."""

    strategy: str
    generated: int
    unique: int
    outcomes: dict[str, int]    # COMBINED outcome -> states


@attrs.frozen
class WorkloadResult:
    name: str
    description: str
    expect_failure: bool        # a negative control: the checker must find failing states
    journaled: bool             # goes through the journal (else only the plain view's rules apply)
    base: str                   # how the starting image is made (the commands)
    entries: tuple[EntryInfo, ...]
    returned_at: int            # index of the "returned" mark: crashes after it allow "new" only
    transactions: tuple[TransactionInfo, ...]
    states: tuple[CrashState, ...]
    verdicts: tuple[Verdict, ...]   # one per state, same order
    counts: tuple[StrategyCount, ...]
    old: str                    # the semantic state before the workload, as text
    new: str                    # ... and after it
    seconds: float
    error: str = ""             # the workload itself could not run (then there are no states)
    unsynced: str = ""          # what was still in flight (written, no barrier) after the image closed

    @property
    def failures(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if not v.ok)

    @property
    def deficits(self) -> tuple[TransactionInfo, ...]:
        """Transactions with fewer barriers than their minimum: a failure, as a state not allowed is."""
        return tuple(t for t in self.transactions if t.barriers < t.minimum)

    @property
    def failed(self) -> bool:
        """A state not allowed, a barrier deficit, or writes left unsynced at close."""
        return bool(self.failures or self.deficits or self.unsynced)

    @property
    def ok(self) -> bool:
        """As expected: nothing failed (or, for a negative control, something did)."""
        if self.error:
            return False
        return self.failed == self.expect_failure


@attrs.frozen
class Options:
    strategies: tuple[str, ...] = STRATEGIES
    k: int = 2
    samples: int = 32
    seed: int = 0
    sector_size: int = SECTOR
    max_tears: int = 32
    oracle: str = "sample"      # all | sample | none
    oracle_samples: int = 24
    jobs: int = 0               # 0: os.cpu_count()
    executor: str = ""          # "" (process pool) | "dask://HOST:PORT" | "inline"
    medium: str = "memory"      # memory (a recording medium) | real (the real media on files, see realmedium)
    recovery_depth: int = 2     # crashes during recovery, nested this deep
    recovery_states: int = 16   # per recovery: besides its prefixes, at most this many sampled crash states


@attrs.frozen
class RunResult:
    options: Options
    workloads: tuple[WorkloadResult, ...]
    seconds: float
    version: int = 1

    @property
    def states(self) -> int:
        return sum(len(w.states) for w in self.workloads)

    @property
    def ok(self) -> bool:
        return all(w.ok for w in self.workloads)

    def to_json(self, compact: bool = False) -> dict[str, Any]:
        """The run as JSON. ``compact``: states that passed are summarized, one line each (see
        :func:`summarize`), failures (and the states their recovery crashes came from) in full."""
        data = attrs.asdict(self, recurse=True)
        if compact:
            for w, wd in zip(self.workloads, data["workloads"]):
                keep = {v.state_id for v in w.verdicts if not v.ok}
                keep |= {s.parent for s in w.states if s.id in keep and s.parent}
                wd["summarized"] = [summarize(s, v) for s, v in zip(w.states, w.verdicts) if s.id not in keep]
                wd["states"] = [d for s, d in zip(w.states, wd["states"]) if s.id in keep]
                wd["verdicts"] = [d for v, d in zip(w.verdicts, wd["verdicts"]) if v.state_id in keep]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunResult":
        for wd in data.get("workloads", []):
            lines = wd.pop("summarized", None)
            if lines:
                full = {d["id"]: (d, v) for d, v in zip(wd["states"], wd["verdicts"])}
                for line in lines:
                    s, v = unsummarize(wd["name"], line)
                    full[s.id] = (attrs.asdict(s), attrs.asdict(v))
                order = sorted(full, key=_state_order)
                wd["states"] = [full[i][0] for i in order]
                wd["verdicts"] = [full[i][1] for i in order]
        return _build(cls, data)

    def dumps(self, compact: bool = False) -> str:
        return json.dumps(self.to_json(compact), indent=None if compact else 1, sort_keys=False,
                          separators=(",", ":") if compact else None)

    @classmethod
    def loads(cls, text: str) -> "RunResult":
        return cls.from_json(json.loads(text))


# -- compact reports: a passing state as one line ------------------------------------
SHORT_DIGEST = 12       # hex digits of a summarized state's digest (replay compares this prefix)


def summarize(s: CrashState, v: Verdict) -> str:
    """A passing state as ``strategy/n point digest-prefix choices seed parent recovery
    duplicates qjournal plain leaks`` (space-separated, "-" for none): enough to list it,
    count it and ``replay`` it; its description and fates are rebuilt by replay."""
    _, strategy, n = s.id.rsplit("/", 2)
    parent = s.parent[len(s.workload) + 1:] if s.parent else None
    opt = [x if x is not None and x != "" else "-" for x in (s.seed, parent, s.recovery)]
    return " ".join(str(x) for x in (f"{strategy}/{n}", s.point, s.digest[:SHORT_DIGEST], s.choices or "-", *opt,
                                     s.duplicates,
                                     v.qjournal, v.plain, v.leaks))


def unsummarize(workload: str, line: str) -> tuple[CrashState, Verdict]:
    """The state and verdict a :func:`summarize` line stands for (fates and description left out)."""
    sid, point, dg, choices, seed, parent, rp, dups, qj, plain, leaks = line.split(" ")
    state_id = f"{workload}/{sid}"
    s = CrashState(state_id, workload, sid.split("/")[0], int(point), "(summarized: replay rebuilds it)", dg, (),
                   None if seed == "-" else int(seed), None if parent == "-" else f"{workload}/{parent}",
                   "" if rp == "-" else rp, int(dups), "" if choices == "-" else choices)
    v = Verdict(state_id, qj, plain, int(leaks), 0, True, True, None, (), (), True)
    return s, v


def _state_order(state_id: str) -> tuple[int, int]:
    _, strategy, n = state_id.rsplit("/", 2)
    return (STRATEGIES.index(strategy) if strategy in STRATEGIES else len(STRATEGIES), int(n))


# -- JSON decoding: attrs classes are rebuilt from their field types ----------------
_CLASSES = {c.__name__: c for c in (EntryInfo, TransactionInfo, Fate, CrashState, OracleResult, Verdict,
                                     StrategyCount, WorkloadResult, Options, RunResult)}


def _build(cls: type, data: dict[str, Any]) -> Any:
    kwargs = {}
    for f in attrs.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(f.type, data[f.name])
    return cls(**kwargs)


def _convert(tp: Any, value: Any) -> Any:
    """Turn JSON ``value`` back into the declared type ``tp`` (a string annotation)."""
    if value is None:
        return None
    t = str(tp).replace(" ", "")
    if t.endswith("|None"):
        t = t[:-len("|None")]
    if t in _CLASSES:
        return _build(_CLASSES[t], value)
    if t.startswith("tuple[") and t.endswith(",...]"):
        inner = t[len("tuple["):-len(",...]")]
        return tuple(_convert(inner, v) for v in value)
    if t.startswith("tuple["):
        parts = _split(t[len("tuple["):-1])
        return tuple(_convert(p, v) for p, v in zip(parts, value))
    return value


def _split(s: str) -> list[str]:
    """Split a comma-separated list of type expressions at the top level."""
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur += ch
    out.append(cur)
    return out

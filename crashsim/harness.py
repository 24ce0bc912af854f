"""crashsim for a test suite: one call records a scenario, crashes it everywhere, judges every state.

A test that simulates crashes declares its scenario as a :class:`~crashsim.workloads.Workload`
(a function that changes an open, writable image, and the :class:`~crashsim.workloads.Base`
image it starts from) and hands it to :func:`check`. Everything else is crashsim's own, the
same code ``crashsim run`` uses: the recorder (``crashsim.recorder``), the crash states
(``crashsim.states``), the allowed outcomes of each phase (``crashsim.runner.phases``) and
the judge (``crashsim.checks.judge``: qjournal after recovery exactly old or new, a second
recovery changes nothing, a reader that ignores the journal sees no corruption and only
old, new or dropped bitmaps, and ``qemu-img check``/``info`` agree). A test never copies them.

    from crashsim import harness
    from crashsim.workloads import IMG, Base, Workload, qemu_img_cmd

    BASE = Base("grow", (qemu_img_cmd("create", "-q", "-f", "qcow2", IMG, "1M"),))
    w = harness.check(Workload("grow", "resize 1M -> 8M", lambda img: img.resize(8 << 20), base=BASE))
    harness.assert_passes(w, qjournal={"old", "new"})

:data:`TEST_OPTIONS` checks every in-order prefix of the recorded writes (the state a
crash leaves when the writes landed in the order they were issued, at every point) and
the state right after each barrier (only what the barriers made durable, so that a
write no barrier covered by the time its operation returned is caught: the state after
a later barrier then lacks it, which no in-order prefix shows), each with the qemu-img
oracle, in this process. Together they cost about one state per write. Pass other
:class:`~crashsim.model.Options` (``attrs.evolve(TEST_OPTIONS, strategies=STRATEGIES)``)
for the full crash model (subsets, versions, tears, crashes during recovery), which
costs minutes for a guest write of a few hundred KiB.
"""
from __future__ import annotations

from typing import Iterable

from .model import Options, WorkloadResult
from .runner import InlineExecutor, run
from .workloads import Workload

#: Every in-order prefix and the state right after each barrier, each judged with the
#: qemu-img oracle, inline (no worker processes).
TEST_OPTIONS = Options(strategies=("prefix", "barrier"), oracle="all", jobs=1, executor="inline")

SHOWN = 5           # failing states an assertion message lists


def check(workload: Workload, opts: Options = TEST_OPTIONS) -> WorkloadResult:
    """Record ``workload`` on its base, generate the crash states ``opts`` asks for, judge
    each one; returns the workload's states and verdicts (``w.states``, ``w.verdicts``, same
    order). A workload that raises is reported in ``w.error``, not raised.
    Cost: one recording, then per unique state two to four in-memory opens of the image
    and, with the oracle, one ``qemu-img check`` and one ``qemu-img info``."""
    (result,) = run([workload], opts, executor=InlineExecutor()).workloads
    return result


def problems(w: WorkloadResult, qjournal: Iterable[str] = (), plain: Iterable[str] = ()) -> list[str]:
    """What is wrong with ``w``, one line each ([] when nothing): the workload's error, each
    state not allowed (its id, where the crash hit, the invariant broken and why), each
    transaction short of its minimum barriers, writes left unsynced at close, and each
    outcome of ``qjournal`` (after recovery) or ``plain`` (a reader that ignores the journal)
    that no state reached: a sanity check that the states span the operation."""
    if w.error:
        return [f"{w.name}: the workload could not run: {w.error}"]
    out = []
    described = {s.id: s.description for s in w.states}
    for v in w.failures:
        out.append(f"{v.state_id} ({described.get(v.state_id, '?')}): {v.invariant}: {v.explanation}")
    if len(out) > SHOWN:
        out[SHOWN:] = [f"... and {len(out) - SHOWN} more failing state(s)"]
    for t in w.deficits:
        out.append(f"{w.name}: transaction {t.index} ({t.description}): {t.barriers} barriers, minimum "
                   f"{t.minimum} ({t.minimum_reason})")
    if w.unsynced:
        out.append(f"{w.name}: {w.unsynced}")
    for view, wanted, seen in (("qjournal after recovery", qjournal, {v.qjournal for v in w.verdicts}),
                               ("a reader that ignores the journal", plain, {v.plain for v in w.verdicts})):
        missing = sorted(set(wanted) - seen)
        if missing:
            out.append(f"{w.name}: {view} never sees {', '.join(missing)} in {len(w.verdicts)} state(s) "
                       f"(it sees {', '.join(sorted(seen)) or 'nothing'})")
    return out


def assert_passes(w: WorkloadResult, qjournal: Iterable[str] = ("old", "new"), plain: Iterable[str] = ()) -> None:
    """Raise AssertionError, listing :func:`problems`, unless every state of ``w`` is allowed
    and each named outcome was reached (by default: qjournal recovers to the old state and to
    the new one, so the states lie on both sides of the commit)."""
    found = problems(w, qjournal, plain)
    if found:
        raise AssertionError(f"{w.name}: {len(w.verdicts)} crash state(s) checked\n" + "\n".join(found))

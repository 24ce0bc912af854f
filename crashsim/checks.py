"""Judging one crash state: recovery, idempotence, structure, semantics, and the qemu-img oracle.

Two readers look at the files a crash left (DESIGN.md, "Outcomes a crash may leave"):

- **qjournal**, which opens the image with its journal and so recovers first. Recovery
  runs on a copy (in memory, recorded, so that the runner can crash it again at every
  point); a second recovery on its result must change neither file. Its outcome must be
  exactly the old or the new state (for a workload that bypasses the journal, the plain
  reader's rules apply instead), and ``qjournal.check`` must find no corruption and no
  more leaks than that state had.
- **plain**, a reader that ignores the journal: qjournal opened read-only without it,
  and, as an independent oracle, ``qemu-img check`` and ``qemu-img info``. Its outcome
  may be old, new, or the bitmaps dropped through a clear autoclear bit; leaks are
  allowed; corruption never.

After an operation returned (and before it started) only one state is allowed: the
state of that moment, with no more leaks than it has.
"""
from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import attrs

from qjournal.check import check
from qjournal.errors import QcowError
from qjournal.format.bitmaps import FLAG_AUTO, FLAG_IN_USE
from qjournal.image import Image
from qjournal.medium import MemoryMedium

from .model import OracleResult
from .recorder import IMAGE, JOURNAL, Recording, RecordingMedium

Bitmap = tuple[str, int, int, Any]       # name, granularity, flags, dirty extents (or "in-use")


@attrs.frozen
class Semantic:
    """What a reader sees that an operation may change: the disk size and the bitmaps."""

    virtual_size: int
    bitmaps: tuple[Bitmap, ...]

    def qemu(self) -> tuple[tuple[str, int, tuple[str, ...]], ...]:
        """The part ``qemu-img info`` shows: name, granularity and flags of each bitmap."""
        return tuple((n, g, flag_names(f)) for n, g, f, _ in self.bitmaps)

    def text(self) -> str:
        if not self.bitmaps:
            return "no bitmaps"
        parts = []
        for n, g, f, bits in self.bitmaps:
            flags = ",".join(flag_names(f)) or "-"
            dirty = "in use" if bits == "in-use" else f"{len(bits)} dirty extent{'s' * (len(bits) != 1)}"
            parts.append(f"{n} (g={g}, {flags}, {dirty})")
        return "; ".join(parts)


def flag_names(flags: int) -> tuple[str, ...]:
    return tuple(name for name, bit in (("in-use", FLAG_IN_USE), ("auto", FLAG_AUTO)) if flags & bit)


def semantic(img: Image) -> Semantic:
    out = []
    for name in img.bitmaps:
        b = img.bitmaps[name]
        bits = "in-use" if b.in_use else tuple(b.dirty_extents())
        out.append((name, b.granularity, b.entry.flags, bits))
    return Semantic(img.header.size, tuple(out))


@attrs.frozen
class Expect:
    """What a crash at one phase of the workload may leave.

    Inside an operation (``only`` is empty): old or new, and for the plain reader also
    dropped bitmaps and any leaks. Outside one (before the first started, or after one
    returned): only the state ``only`` names, with no more leaks than it has.
    """

    old: Semantic
    new: Semantic
    old_leaks: int
    new_leaks: int
    only: str                                # "" inside an operation, else "old" or "new"
    journaled: bool

    @property
    def inside(self) -> bool:
        return not self.only

    @property
    def allowed_qjournal(self) -> tuple[str, ...]:
        if not self.journaled:
            return self.allowed_plain
        return ("old", "new") if self.inside else (self.only,)

    @property
    def allowed_plain(self) -> tuple[str, ...]:
        return ("old", "new", "dropped") if self.inside else (self.only,)

    def leaks_of(self, outcome: str) -> int:
        return self.old_leaks if outcome == "old" else self.new_leaks

    def classify(self, sem: Semantic, allowed: tuple[str, ...]) -> str:
        hits = [label for label, s in (("old", self.old), ("new", self.new)) if sem == s]
        for label in hits:
            if label in allowed:
                return label
        if hits:
            return hits[0]
        if not sem.bitmaps and sem.virtual_size in (self.old.virtual_size, self.new.virtual_size):
            return "dropped"
        return "other"

    def classify_qemu(self, bitmaps: tuple[tuple[str, int, tuple[str, ...]], ...]) -> str:
        hits = [label for label, s in (("old", self.old), ("new", self.new)) if bitmaps == s.qemu()]
        allowed = self.allowed_plain
        for label in hits:
            if label in allowed:
                return label
        if hits:
            return hits[0]
        return "dropped" if not bitmaps else "other"


@attrs.frozen
class View:
    outcome: str
    semantic: Semantic | None
    leaks: int = 0
    corruptions: int = 0
    error: str = ""
    messages: tuple[str, ...] = ()


def open_view(image: bytes, journal: bytes, label: str) -> View:
    """Open read-only (with ``journal``, which must hold nothing pending) and look."""
    try:
        with Image(label, "r", medium=MemoryMedium(image), journal_medium=MemoryMedium(journal)) as img:
            sem = semantic(img)
            res = check(img)
    except QcowError as e:
        return View("error", None, error=f"{type(e).__name__}: {e}")
    errors = tuple(m for m in res.messages if m.startswith("ERROR"))[:3]
    return View("", sem, res.leaks, res.corruptions, messages=errors)


@attrs.frozen
class Recovered:
    """The qjournal view: the files after recovery, and its recording."""

    image: bytes
    journal: bytes
    recording: Recording | None    # None: recovery refused or failed
    wrote: bool
    error: str = ""


def recover(files: dict[str, bytes]) -> Recovered:
    """Open writable with the journal (recovery runs), recorded, on copies of ``files``."""
    rec = Recording({IMAGE: files[IMAGE], JOURNAL: files[JOURNAL]})
    im, jm = RecordingMedium(rec, IMAGE), RecordingMedium(rec, JOURNAL)
    try:
        with Image("crashed.qcow2", "r+", medium=im, journal_medium=jm):
            pass
    except QcowError as e:
        return Recovered(files[IMAGE], files[JOURNAL], None, False, f"{type(e).__name__}: {e}")
    wrote = any(e.kind in ("write", "resize") for e in rec.entries)
    return Recovered(bytes(im.buf), bytes(jm.buf), rec, wrote)


def recover_again_changes(image: bytes, journal: bytes) -> str:
    """Run recovery once more on the recovered files: what it changed ("" when nothing)."""
    im, jm = MemoryMedium(image), MemoryMedium(journal)
    try:
        with Image("recovered.qcow2", "r+", medium=im, journal_medium=jm):
            pass
    except QcowError as e:
        return f"the second recovery failed: {type(e).__name__}: {e}"
    changed = [name for name, before, m in (("image", image, im), ("journal", journal, jm)) if m.buf != before]
    return f"the second recovery changed the {' and the '.join(changed)}" if changed else ""


# -- the oracle -------------------------------------------------------------------------
def oracle(image: bytes, path: str, expect: Expect) -> OracleResult:
    """qemu-img check and info on ``image`` written to ``path``."""
    with open(path, "wb") as f:
        f.write(image)
    res = subprocess.run(["qemu-img", "check", "--output=json", path], capture_output=True, text=True)
    try:
        out = json.loads(res.stdout) if res.stdout.strip() else {}
    except json.JSONDecodeError:
        out = {}
    err = res.stderr.strip().splitlines()[0] if res.stderr.strip() else ""
    corr, leaks = int(out.get("corruptions", 0)), int(out.get("leaks", 0))
    info = subprocess.run(["qemu-img", "info", "--output=json", "-U", path], capture_output=True, text=True)
    bitmaps = None
    if info.returncode == 0:
        data = json.loads(info.stdout)["format-specific"]["data"]
        bitmaps = tuple((b["name"], b["granularity"], tuple(b["flags"])) for b in data.get("bitmaps", []))
    elif not err:
        err = info.stderr.strip().splitlines()[0] if info.stderr.strip() else f"qemu-img info: exit {info.returncode}"
    os.unlink(path)
    if res.returncode not in (0, 3) or bitmaps is None:
        outcome = "error"
    else:
        outcome = expect.classify_qemu(bitmaps)
    return OracleResult(res.returncode, corr, leaks, bitmaps, outcome, err)


# -- judging ------------------------------------------------------------------------------
@attrs.frozen
class Judged:
    """A verdict without the state's identity (the runner adds it)."""

    qjournal: str
    plain: str
    leaks: int
    corruptions: int
    recovered: bool
    idempotent: bool
    oracle: OracleResult | None
    allowed_qjournal: tuple[str, ...]
    allowed_plain: tuple[str, ...]
    ok: bool
    invariant: str
    explanation: str
    recovery: Recording | None      # the recording of the recovery, when it wrote anything


def judge(files: dict[str, bytes], expect: Expect, oracle_path: str | None = None,
          require: str | None = None, cache: dict[bytes, View] | None = None) -> Judged:
    """Check one state. ``require``: the qjournal outcome recovery must reach (a crash during
    recovery must not change what recovery decides). ``cache`` holds plain views by image bytes."""
    aq, ap = expect.allowed_qjournal, expect.allowed_plain
    problems: list[tuple[str, str]] = []

    # The reader that ignores the journal.
    image = files[IMAGE]
    plain = cache.get(image) if cache is not None else None
    if plain is None:
        plain = open_view(image, b"", "plain")
        if cache is not None:
            cache[image] = plain
    if plain.semantic is not None:
        plain = attrs.evolve(plain, outcome=expect.classify(plain.semantic, ap))
    if plain.outcome == "error":
        problems.append(("plain-unreadable", f"a reader that ignores the journal cannot open the image: {plain.error}"))
    elif plain.corruptions:
        problems.append(("corruption", f"without the journal, qjournal check finds {plain.corruptions} "
                                       f"corruption(s): {'; '.join(plain.messages)}"))
    elif plain.outcome not in ap:
        problems.append(("plain-not-allowed", f"a reader that ignores the journal sees {plain.outcome} "
                                              f"({_sem(plain)}), allowed: {', '.join(ap)}"))
    elif not expect.inside and plain.leaks > expect.leaks_of(expect.only):
        problems.append(("leaks-outside-operation", f"a reader that ignores the journal finds {plain.leaks} leaked "
                                                    f"cluster(s) where the {expect.only} state has "
                                                    f"{expect.leaks_of(expect.only)}"))

    # qjournal, after recovery.
    rec = recover(files)
    idempotent = True
    if rec.recording is None:
        qview = View("error", None, error=rec.error)
        problems.append(("recovery-refused", f"qjournal cannot open the image with its journal: {rec.error}"))
    else:
        if rec.wrote:
            again = recover_again_changes(rec.image, rec.journal)
            if again:
                idempotent = False
                problems.append(("recovery-not-idempotent", again))
            qview = open_view(rec.image, rec.journal, "recovered")
        else:
            qview = plain
        if qview.semantic is not None:
            qview = attrs.evolve(qview, outcome=expect.classify(qview.semantic, aq))
        if qview.outcome == "error":
            problems.append(("recovered-unreadable", f"after recovery qjournal cannot open the image: {qview.error}"))
        elif qview.corruptions:
            problems.append(("corruption", f"after recovery, qjournal check finds {qview.corruptions} "
                                           f"corruption(s): {'; '.join(qview.messages)}"))
        elif qview.outcome not in aq:
            problems.append(("qjournal-not-allowed", f"after recovery qjournal sees {qview.outcome} "
                                                     f"({_sem(qview)}), allowed: {', '.join(aq)}"))
        elif require is not None and qview.outcome != require:
            problems.append(("recovery-changed-its-mind", f"a crash during recovery, then recovery, gives "
                                                          f"{qview.outcome}; recovery without that crash gave {require}"))
        elif expect.journaled and qview.leaks > expect.leaks_of(qview.outcome):
            problems.append(("leaks-after-recovery", f"after recovery qjournal check finds {qview.leaks} leaked "
                                                     f"cluster(s) where the {qview.outcome} state has "
                                                     f"{expect.leaks_of(qview.outcome)}"))

    orc = None
    if oracle_path is not None:
        orc = oracle(image, oracle_path, expect)
        if orc.outcome == "error":
            problems.append(("qemu-img-refuses", f"qemu-img check exits {orc.check_exit}"
                                                 f"{f' ({orc.corruptions} corruptions)' if orc.corruptions else ''}"
                                                 f"{': ' + orc.error if orc.error else ''}"))
        elif orc.outcome not in ap:
            problems.append(("qemu-img-not-allowed", f"qemu-img info sees {orc.outcome} bitmaps {list(orc.bitmaps or ())}, "
                                                     f"allowed: {', '.join(ap)}"))
        elif orc.outcome != plain.outcome:
            problems.append(("qemu-img-disagrees", f"qemu-img info sees {orc.outcome}, qjournal without the journal "
                                                   f"sees {plain.outcome}"))
    invariant, explanation = problems[0] if problems else ("", "")
    if len(problems) > 1:
        explanation += "; also " + "; ".join(f"{name}: {text}" for name, text in problems[1:])
    return Judged(qview.outcome, plain.outcome, plain.leaks, plain.corruptions, rec.wrote, idempotent, orc,
                  aq, ap, not problems, invariant, explanation,
                  rec.recording if rec.wrote else None)


def _sem(v: View) -> str:
    return v.semantic.text() if v.semantic is not None else v.error


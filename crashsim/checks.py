"""Judging one crash state: recovery, idempotence, structure, semantics, and the qemu-img oracle.

Two readers look at the files a crash left (DESIGN.md, "Outcomes a crash may leave"):

- **qjournal**, which opens the image with its journal and so recovers first. Recovery
  runs on a copy (in memory, recorded, so that the runner can crash it again at every
  point); a second recovery on its result must change neither file. Its outcome must be
  exactly the old or the new state (for a workload that bypasses the journal, the plain
  reader's rules apply instead), and ``qjournal.check`` must find no corruption and no
  more leaks than that state had. When recovery wrote, two more rules hold: when the open
  returns, everything recovery wrote is durable and its checkpoint too, so nothing is
  pending (a power loss right after recovery must not bring the transaction back); and
  on the same files with one piece the pending transaction writes changed by someone
  else (QEMU opened the image after the crash), recovery refuses and writes nothing.
- **plain**, a reader that ignores the journal: qjournal opened read-only without it,
  and, as an independent oracle, ``qemu-img check`` and ``qemu-img info``. Its outcome
  may be old, new, or the bitmaps dropped through a clear autoclear bit; leaks are
  allowed; corruption never.

The semantic state is the disk size, every bitmap (name, granularity, flags, dirty
extents) and the guest data (every cluster that does not read as zeros). Guest data
compares exactly for qjournal after recovery. A plain reader may see, in the middle of
an operation, each 512-byte sector of the guest disk as it was before or after (the
data of a request is not atomic for QEMU either), but never bytes that were there at
neither time. A workload marked *relaxed* (a guest write: bitmap bits are set before the data and
its mapping) may also leave, for a plain reader and before it returns, bitmaps with
more dirty bits than before and no more than after: the ordering rule's "a bit set
early only costs a backup some extra bytes". When it also writes data *in place*
(outside the journal, as QEMU does), qjournal after recovery gets the same latitude.

After an operation returned (and before it started) only one state is allowed: the
state of that moment, with no more leaks than it has.
"""
from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import attrs
import numpy as np

from qjournal.read import guest
from qjournal.ops.check import check
from qjournal.errors import QcowError
from qjournal.format.bitmaps import FLAG_AUTO, FLAG_IN_USE
from qjournal.format.geometry import SECTOR
from qjournal.format.header import field_span, read_field
from qjournal.format.tables import L1E_OFFSET_MASK
from qjournal import Image
from qjournal.journal import Journal
from qjournal.journal.crc32c import crc32c
from qjournal.storage.medium import MemoryMedium

from .model import OracleResult
from .recorder import IMAGE, JOURNAL, Recording, RecordingMedium
from .states import SIZE, Timeline

Bitmap = tuple[str, int, int, Any]       # name, granularity, flags, dirty extents (or "in-use")
Guest = tuple[tuple[int, bytes], ...]     # (guest offset, cluster content) of every cluster not all zeros


@attrs.frozen
class Semantic:
    """What a reader sees that an operation may change: disk size, bitmaps, guest data and
    the internal snapshots (id, name, disk size and L1 size of each)."""

    virtual_size: int
    bitmaps: tuple[Bitmap, ...]
    guest: Guest = ()
    snapshots: tuple[tuple[str, str, int | None, int], ...] = ()

    def meta(self) -> tuple[int, tuple[Bitmap, ...], tuple[tuple[str, str, int | None, int], ...]]:
        return self.virtual_size, self.bitmaps, self.snapshots

    def qemu(self) -> tuple[tuple[str, int, tuple[str, ...]], ...]:
        """The part ``qemu-img info`` shows: name, granularity and flags of each bitmap."""
        return tuple((n, g, flag_names(f)) for n, g, f, _ in self.bitmaps)

    def text(self) -> str:
        data = f"{len(self.guest)} data cluster{'s' * (len(self.guest) != 1)}"
        if not self.bitmaps:
            return f"no bitmaps, {data}"
        return "; ".join(bitmap_text(b) for b in self.bitmaps) + f"; {data}"


def semantic_diff(want: Semantic, got: Semantic) -> str:
    """How ``got`` differs from ``want`` in size, bitmaps, guest data and internal snapshots
    (id, name, disk size, L1 size: not their dates); "" when it does not."""
    out = []
    if want.virtual_size != got.virtual_size:
        out.append(f"disk size {got.virtual_size}, not {want.virtual_size}")
    if want.snapshots != got.snapshots:
        out.append(f"snapshots {list(got.snapshots)}, not {list(want.snapshots)}")
    theirs, ours = {b[0]: b for b in want.bitmaps}, {b[0]: b for b in got.bitmaps}
    for name in theirs.keys() | ours.keys():
        if theirs.get(name) != ours.get(name):
            out.append(f"bitmap {name!r}: {bitmap_text(ours[name]) if name in ours else 'missing'}, not "
                       f"{bitmap_text(theirs[name]) if name in theirs else 'absent'}")
    if want.guest != got.guest:
        a, b = dict(want.guest), dict(got.guest)
        bad = sorted(o for o in a.keys() | b.keys() if a.get(o) != b.get(o))
        out.append(f"guest data differs in {len(bad)} cluster(s), the first at {bad[0]:#x}")
    return "; ".join(out)


def bitmap_text(b: Bitmap) -> str:
    n, g, f, bits = b
    flags = ",".join(flag_names(f)) or "-"
    dirty = "in use" if bits == "in-use" else f"{len(bits)} dirty extent{'s' * (len(bits) != 1)}"
    shown = n if len(n) <= 24 else f"{n[:16]}...({len(n)} chars)"
    return f"{shown} (g={g}, {flags}, {dirty})"


def bad_sectors(cur: Guest, old: Guest, new: Guest) -> list[int]:
    """Guest offsets of the sectors of ``cur`` that hold neither their old nor their new bytes."""
    c, o, n = dict(cur), dict(old), dict(new)
    out: list[int] = []
    for off in sorted(set(c) | set(o) | set(n)):
        x, a, b = c.get(off), o.get(off), n.get(off)
        if x == a or x == b:
            continue
        size = len(next(v for v in (x, a, b) if v is not None))
        zero = bytes(size)
        xs, as_, bs = (np.frombuffer(v if v is not None else zero, dtype=np.uint8).reshape(-1, SECTOR)
                       for v in (x, a, b))
        bad = ~((xs == as_).all(axis=1) | (xs == bs).all(axis=1))
        out += [off + int(i) * SECTOR for i in np.nonzero(bad)[0]]
    return out


def changed_sectors(cur: Guest, old: Guest) -> list[int]:
    """Guest offsets of the sectors of ``cur`` whose bytes differ from ``old``'s."""
    c, o = dict(cur), dict(old)
    out: list[int] = []
    for off in sorted(set(c) | set(o)):
        x, a = c.get(off), o.get(off)
        if x == a:
            continue
        size = len(x if x is not None else a)  # type: ignore[arg-type]
        xs, as_ = (np.frombuffer(v if v is not None else bytes(size), dtype=np.uint8).reshape(-1, SECTOR)
                   for v in (x, a))
        out += [off + int(i) * SECTOR for i in np.nonzero(~(xs == as_).all(axis=1))[0]]
    return out


def missed_writes(sem: Semantic, old: Semantic) -> str:
    """The first changed guest sector that a bitmap, enabled before and after and consistent,
    does not mark dirty ("" when there is none): a backup built on it would miss that write.
    Data past ``sem``'s disk size was cut off by a shrink, not written: it needs no bit."""
    was_enabled = {b[0] for b in old.bitmaps if b[2] & FLAG_AUTO and b[3] != "in-use"}
    watching = [b for b in sem.bitmaps if b[0] in was_enabled and b[2] & FLAG_AUTO and b[3] != "in-use"]
    if not watching:
        return ""
    changed = [pos for pos in changed_sectors(sem.guest, old.guest) if pos < sem.virtual_size]
    runs: list[tuple[int, int]] = []
    for pos in changed:
        if runs and runs[-1][0] + runs[-1][1] == pos:
            runs[-1] = (runs[-1][0], runs[-1][1] + SECTOR)
        else:
            runs.append((pos, SECTOR))
    for name, _, _, extents in watching:
        if _intervals_cover(extents, runs):
            continue
        pos = next(p for p in changed if not _intervals_cover(extents, ((p, SECTOR),)))
        return (f"bitmap {name}, enabled and marked consistent, has no dirty bit for guest offset {pos:#x}: "
                "a backup built on it would miss that write")
    return ""


def _intervals_cover(outer: Any, inner: Any) -> bool:
    """Every byte of the extents ``inner`` lies in the extents ``outer`` (both sorted, merged)."""
    i = 0
    for start, length in inner:
        end = start + length
        while i < len(outer) and outer[i][0] + outer[i][1] <= start:
            i += 1
        if i == len(outer) or outer[i][0] > start or outer[i][0] + outer[i][1] < end:
            return False
    return True


def bits_between(cur: tuple[Bitmap, ...], old: tuple[Bitmap, ...], new: tuple[Bitmap, ...]) -> bool:
    """The same bitmaps as ``old`` (names, granularities, flags), each with at least the old
    dirty bits and, when ``new`` has a bitmap of that name and granularity, at most its bits.
    (A transaction that also adds or removes bitmaps keeps the old directory until its
    switch: bits set early in the old bitmaps are allowed there too.)"""
    if len(cur) != len(old):
        return False
    later = {b[0]: b for b in new}
    for x, a in zip(cur, old):
        b = later.get(x[0])
        if x[:3] != a[:3]:
            return False
        if "in-use" in (x[3], a[3]) or (b is not None and "in-use" == b[3]):
            if not (x[3] == a[3] and (b is None or b[3] == a[3])):
                return False
            continue
        if not _intervals_cover(x[3], a[3]):
            return False
        if b is not None and b[1] == a[1] and not _intervals_cover(b[3], x[3]):
            return False
    return True


def mixture(sem: Semantic, old: Semantic, new: Semantic) -> str:
    """Which of ``sem``'s bitmaps are as in ``old``, as in ``new``, or as in neither."""
    o = {b[0]: b for b in old.bitmaps}
    n = {b[0]: b for b in new.bitmaps}
    parts = []
    for b in sem.bitmaps:
        which = "as new" if n.get(b[0]) == b else "as old" if o.get(b[0]) == b else "as neither"
        if o.get(b[0]) == b and n.get(b[0]) == b:
            continue
        parts.append(f"{which}: {bitmap_text(b)}")
    missing = [name for name in dict.fromkeys([*o, *n]) if name not in {b[0] for b in sem.bitmaps}]
    if missing:
        parts.append(f"missing: {', '.join(missing)}")
    if sem.virtual_size not in (old.virtual_size, new.virtual_size):
        parts.append(f"disk size {sem.virtual_size}")
    bad = bad_sectors(sem.guest, old.guest, new.guest)
    if bad:
        parts.append(f"guest data: {len(bad)} sector(s) hold bytes that were there neither before nor after, "
                     f"the first at guest offset {bad[0]:#x}")
    elif sem.guest not in (old.guest, new.guest):
        parts.append("guest data: some sectors as before, some as after")
    return "; ".join(parts) or "the same bitmaps as both"


def flag_names(flags: int) -> tuple[str, ...]:
    return tuple(name for name, bit in (("in-use", FLAG_IN_USE), ("auto", FLAG_AUTO)) if flags & bit)


def semantic(img: Image) -> Semantic:
    out = []
    for name in img.bitmaps:
        b = img.bitmaps[name]
        bits = "in-use" if b.in_use else tuple(b.dirty_extents())
        out.append((name, b.granularity, b.entry.flags, bits))
    snaps = tuple((s.id, s.name, s.disk_size, s.l1_size) for s in img.snapshots)
    return Semantic(img.header.size, tuple(out), guest_data(img), snaps)


def guest_data(img: Image) -> Guest:
    """Every guest cluster that does not read as zeros, with its content. Reads only the
    allocated runs; O(L2 entries + data)."""
    cs = img.header.cluster_size
    out = []
    try:
        reader = guest.reader(img)
        if img.backing_name is None:
            # Without a backing file an unallocated L1 entry reads as zeros: walk only the others.
            span = reader.table_span
            l1 = img.l1_table() & np.uint64(L1E_OFFSET_MASK)
            ranges = [(int(i) * span, min(img.header.size, (int(i) + 1) * span)) for i in np.nonzero(l1)[0]]
        else:
            ranges = [(0, img.header.size)]
        runs = [r for lo, hi in ranges for r in reader.runs(lo, hi)]
        # Whole clusters, keyed by their offset (a run of subclusters starts anywhere in one).
        clusters: set[int] = set()
        for g, n, kind, _ in runs:
            if kind not in (guest.UNALLOCATED, guest.ZERO):
                clusters.update(range(g // cs, (g + n - 1) // cs + 1))
        order = sorted(clusters)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and order[j + 1] == order[j] + 1:
                j += 1
            start = order[i] * cs
            data = img.read(start, min((order[j] + 1) * cs, img.header.size) - start)
            for k in range(0, len(data), cs):
                chunk = data[k:k + cs]
                if chunk.count(0) != len(chunk):
                    out.append((start + k, chunk))
            i = j + 1
    finally:
        guest.release(img)
    return tuple(out)


@attrs.frozen
class Expect:
    """What a crash at one phase of the workload may leave.

    Inside an operation (``only`` is empty): old or new, and for the plain reader also
    dropped bitmaps, any leaks, and guest sectors each old or new. Outside one (before
    the first started, or after one returned): only the state ``only`` names, with no
    more leaks than it has. ``relaxed``: see the module docstring.
    """

    old: Semantic
    new: Semantic
    old_leaks: int
    new_leaks: int
    only: str                                # "" inside an operation, else "old" or "new"
    journaled: bool
    relaxed: bool = False                    # a guest write: bitmap bits may be set early
    in_place: bool = False                   # ... and its data written in place, outside the journal
    damage: int = 0                          # corruptions the base already had (qjournal check) ...
    qemu_damage: int = 0                     # ... and qemu-img check: allowed in every state, never more

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

    def cut_early(self, sem: Semantic) -> bool:
        """A shrink dropped data a reader of the old size still sees: past the new end,
        every sector must hold its old bytes as long as the size is not the new one."""
        end = self.new.virtual_size
        if not end < self.old.virtual_size or sem.virtual_size <= end:
            return False
        return any(pos >= end for pos in changed_sectors(sem.guest, self.old.guest))

    def classify(self, sem: Semantic, allowed: tuple[str, ...], plain: bool) -> str:
        """old, new, dropped or other. Guest data compares exactly, or (for a plain reader, and
        for a relaxed workload, in the middle of an operation) sector by sector."""
        # What the journal does not make atomic: everything for a plain reader, the in-place
        # part of a guest write for qjournal too.
        loose = self.inside and (plain or self.in_place or not self.journaled)
        mix = loose
        data_ok = (sem.guest in (self.old.guest, self.new.guest) or (
            mix and not bad_sectors(sem.guest, self.old.guest, self.new.guest))) and not self.cut_early(sem)
        hits = []
        for label, s in (("old", self.old), ("new", self.new)):
            if sem.meta() == s.meta() and (sem.guest == s.guest or data_ok and mix):
                hits.append(label)
        if not hits and self.relaxed and loose and data_ok and sem.virtual_size == self.old.virtual_size \
                and bits_between(sem.bitmaps, self.old.bitmaps, self.new.bitmaps):
            hits.append("old")     # bits set early, data in place: the write has not happened yet
        for label in hits:
            if label in allowed:
                return label
        if hits:
            return hits[0]
        if not sem.bitmaps and data_ok and sem.virtual_size in (self.old.virtual_size, self.new.virtual_size) \
                and sem.snapshots in (self.old.snapshots, self.new.snapshots):
            return "dropped"
        return "other"

    def classify_qemu(self, bitmaps: tuple[tuple[str, int, tuple[str, ...]], ...], prefer: str = "") -> str:
        """Like :meth:`classify` on what qemu-img info shows (names, granularities, flags): when
        that cannot tell old from new (only bits changed), ``prefer`` (the plain reader's) wins."""
        hits = [label for label, s in (("old", self.old), ("new", self.new)) if bitmaps == s.qemu()]
        if prefer in hits:
            return prefer
        for label in hits:
            if label in self.allowed_plain:
                return label
        if hits:
            return hits[0]
        return "dropped" if not bitmaps else "other"


@attrs.frozen
class View:
    outcome: str
    semantic: Semantic | None
    leaks: int = 0
    corruptions: int = 0       # COPIED flags too few not included (see CheckResult.copied_too_few)
    error: str = ""
    messages: tuple[str, ...] = ()
    copied_too_few: int = 0


def open_view(image: bytes, journal: bytes, label: str) -> View:
    """Open read-only (with ``journal``, which must hold nothing pending) and look."""
    try:
        with Image(label, "r", medium=MemoryMedium(image), journal_medium=MemoryMedium(journal)) as img:
            sem = semantic(img)
            res = check(img)
    except QcowError as e:
        return View("error", None, error=f"{type(e).__name__}: {e}")
    errors = tuple(m for m in res.messages if m.startswith("ERROR") and not _flag_too_few(m))[:3]
    return View("", sem, res.leaks, res.corruptions - res.copied_too_few, messages=errors,
                copied_too_few=res.copied_too_few)


def _flag_too_few(message: str) -> bool:
    """A check message about an entry without COPIED whose refcount is 1 (harmless: it
    costs a copy-on-write), from qjournal check or qemu-img check."""
    return "OFLAG_COPIED" in message and message.rstrip().endswith("refcount=1")


@attrs.frozen
class Recovered:
    """The qjournal view: the files after recovery, its recording, and what it shows."""

    image: bytes
    journal: bytes
    recording: Recording | None    # None: recovery refused or failed
    wrote: bool
    error: str = ""
    view: View | None = None       # the recovered image, judged while it was open


def recover(files: dict[str, bytes], look: bool = False) -> Recovered:
    """Open writable with the journal (recovery runs), recorded, on copies of ``files``;
    with ``look``, also take the semantic state and the check of the recovered image."""
    rec = Recording({IMAGE: files[IMAGE], JOURNAL: files[JOURNAL]})
    im, jm = RecordingMedium(rec, IMAGE), RecordingMedium(rec, JOURNAL)
    view = None
    try:
        with Image("crashed.qcow2", "r+", medium=im, journal_medium=jm) as img:
            rec.mark(RECOVERED)
            if look:
                try:
                    res = check(img)
                    view = View("", semantic(img), res.leaks, res.corruptions,
                                messages=tuple(m for m in res.messages if m.startswith("ERROR"))[:3])
                except QcowError as e:
                    view = View("error", None, error=f"{type(e).__name__}: {e}")
    except QcowError as e:
        return Recovered(files[IMAGE], files[JOURNAL], None, False, f"{type(e).__name__}: {e}")
    wrote = any(e.kind in ("write", "resize") for e in rec.entries)
    return Recovered(bytes(im.buf), bytes(jm.buf), rec, wrote, view=view)


RECOVERED = "recovered"          # the mark where the writable open (so recovery) returned


def recovery_leftovers(rec: Recording) -> str:
    """What recovery left undone when the open returned: units still in flight (a power
    loss right then would lose them) or a transaction still pending ("" when nothing)."""
    at = next(i for i, e in enumerate(rec.entries) if e.kind == "mark" and e.name == RECOVERED)
    tl = Timeline(rec)
    left = sorted(tl.snapshots[at].inflight)
    if left:
        where = ", ".join(f"{tl.files[f]} {'size' if page == SIZE else hex(page)}" for f, page in left[:4])
        return f"when recovery returned, {len(left)} unit(s) it wrote were not yet durable ({where})"
    if pending(rec.state(at)[JOURNAL]):
        return "when recovery returned, the journal still held a pending transaction (no durable checkpoint)"
    return ""


def changed_by_another(files: dict[str, bytes]) -> tuple[bytes, int] | None:
    """The image as if someone else (QEMU) had written after the crash: one 512-byte piece
    that the first pending transaction writes, set to bytes that are neither its
    before-image nor any after-image of it. The piece is the last such one past cluster 0
    (a changed header would stop the open before recovery is even tried). None when there
    is no such piece."""
    image = files[IMAGE]
    try:
        pend = Journal(MemoryMedium(image), MemoryMedium(files[JOURNAL])).pending()
    except QcowError:
        return None
    if not pend or len(image) < field_span("cluster_bits")[1]:
        return None
    t = pend[0]
    cluster = 1 << read_field(image, "cluster_bits")
    pieces = sorted(((off, si, wi) for si, step in enumerate(t.steps) for wi, (off, data) in enumerate(step.writes)
                     if len(data) >= SECTOR and off + SECTOR <= len(image)), key=lambda x: (x[0] >= cluster, x[0]))
    for off, si, wi in reversed(pieces):
        afters = {d[off - o:off - o + SECTOR] for s in t.steps for o, d in s.writes if o <= off < o + len(d)}
        cur = image[off:off + SECTOR]
        for x in (0x5A, 0xA5, 0x3C):
            piece = bytes(b ^ x for b in cur)
            if piece not in afters and crc32c(piece) != t.checksums[si][wi][0]:
                return image[:off] + piece + image[off + SECTOR:], off
    return None


def recovery_ignores_change(files: dict[str, bytes]) -> str:
    """Check (d): with the image changed by someone else after the crash, recovery must
    refuse and write nothing ("" when it does)."""
    changed = changed_by_another(files)
    if changed is None:
        return ""
    image, off = changed
    im, jm = MemoryMedium(image), MemoryMedium(files[JOURNAL])
    try:
        with Image("changed.qcow2", "r+", medium=im, journal_medium=jm):
            pass
    except QcowError:       # the binding check, or an open that fails earlier (a changed header)
        if im.buf != image or jm.buf != files[JOURNAL]:
            return f"recovery refused an image changed at {off:#x} by someone else, but wrote to it"
        return ""
    return (f"recovery replayed the journal over an image someone else changed after the crash (the "
            f"512-byte piece at {off:#x}) instead of refusing")


@attrs.define
class Caches:
    """What one worker learned about file contents it met before (per recording)."""

    plain: dict[bytes, View] = attrs.Factory(dict)        # image bytes -> the plain reader's view
    pending: dict[bytes, bool] = attrs.Factory(dict)      # journal bytes -> holds something to recover


def pending(journal: bytes, cache: dict[bytes, bool] | None = None) -> bool:
    """Whether ``journal`` holds a committed transaction without a checkpoint (reads it only)."""
    if not journal:
        return False
    if cache is not None and journal in cache:
        return cache[journal]
    try:
        found = bool(Journal(MemoryMedium(b""), MemoryMedium(journal)).pending())
    except QcowError:
        found = True           # let recovery say what is wrong with it
    if cache is not None:
        cache[journal] = found
    return found


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
def oracle(image: bytes, path: str, expect: Expect | None, prefer: str = "") -> OracleResult:
    """qemu-img check and info on ``image`` written to ``path`` (``expect`` None: only count)."""
    with open(path, "wb") as f:
        f.write(image)
    res = subprocess.run(["qemu-img", "check", "--output=json", path], capture_output=True, text=True)
    try:
        out = json.loads(res.stdout) if res.stdout.strip() else {}
    except json.JSONDecodeError:
        out = {}
    errors = [line for line in res.stderr.splitlines() if line.startswith("ERROR")]
    harmless = sum(_flag_too_few(line) for line in errors)
    err = res.stderr.strip().splitlines()[0].replace(path, "STATE") if res.stderr.strip() else ""
    corr, leaks = int(out.get("corruptions", 0)), int(out.get("leaks", 0))
    check_exit = res.returncode
    if corr and harmless == corr == len(errors):
        # Only COPIED flags too few: allowed, as leaks are.
        corr, err, check_exit = 0, "", 3 if leaks else 0
    if expect is None:
        os.unlink(path)
        return OracleResult(check_exit, corr, leaks, None, "", err)
    if corr and corr <= expect.qemu_damage and check_exit == 2:
        err, check_exit = "", 3 if leaks else 0        # the base's own damage, no more
    info = subprocess.run(["qemu-img", "info", "--output=json", "-U", path], capture_output=True, text=True)
    bitmaps = None
    if info.returncode == 0:
        data = json.loads(info.stdout)["format-specific"]["data"]
        bitmaps = tuple((b["name"], b["granularity"], tuple(b["flags"])) for b in data.get("bitmaps", []))
    elif not err:
        err = (info.stderr.strip().splitlines()[0].replace(path, "STATE") if info.stderr.strip()
               else f"qemu-img info: exit {info.returncode}")
    os.unlink(path)
    if check_exit not in (0, 3) or bitmaps is None:
        outcome = "error"
    else:
        outcome = expect.classify_qemu(bitmaps, prefer)
    return OracleResult(check_exit, corr, leaks, bitmaps, outcome, err)


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
          require: str | None = None, caches: Caches | None = None) -> Judged:
    """Check one state. ``require``: the qjournal outcome recovery must reach (a crash during
    recovery must not change what recovery decides)."""
    caches = caches if caches is not None else Caches()
    aq, ap = expect.allowed_qjournal, expect.allowed_plain
    problems: list[tuple[str, str]] = []

    # The reader that ignores the journal.
    image = files[IMAGE]
    plain = caches.plain.get(image)
    if plain is None:
        plain = caches.plain[image] = open_view(image, b"", "plain")
    if plain.semantic is not None:
        plain = attrs.evolve(plain, outcome=expect.classify(plain.semantic, ap, True))
    if plain.outcome == "error":
        problems.append(("plain-unreadable", f"a reader that ignores the journal cannot open the image: {plain.error}"))
    elif plain.corruptions > expect.damage:
        problems.append(("corruption", f"without the journal, qjournal check finds {plain.corruptions} "
                                       f"corruption(s){_had(expect)}: {'; '.join(plain.messages)}"))
    elif plain.outcome not in ap:
        problems.append(("plain-not-allowed", f"a reader that ignores the journal sees {_seen(plain, expect)}, "
                                              f"allowed: {', '.join(ap)}"))
    elif not expect.inside and plain.leaks > expect.leaks_of(expect.only):
        problems.append(("leaks-outside-operation", f"a reader that ignores the journal finds {plain.leaks} leaked "
                                                    f"cluster(s) where the {expect.only} state has "
                                                    f"{expect.leaks_of(expect.only)}"))

    # qjournal, after recovery (one open fewer when there is nothing to recover: the
    # image then looks the same with and without its journal).
    if pending(files[JOURNAL], caches.pending):
        rec = recover(files, look=True)
    else:
        rec = Recovered(image, files[JOURNAL], Recording(dict(files)), False)
    idempotent = True
    if rec.recording is None:
        qview = View("error", None, error=rec.error)
        if plain.outcome != "error":
            problems.append(("recovery-refused", f"qjournal cannot open the image with its journal: {rec.error}"))
    else:
        if rec.wrote:
            again = recover_again_changes(rec.image, rec.journal)
            if again:
                idempotent = False
                problems.append(("recovery-not-idempotent", again))
            left = recovery_leftovers(rec.recording)
            if left:
                problems.append(("recovery-not-durable", left))
            ignored = recovery_ignores_change(files)
            if ignored:
                problems.append(("recovery-ignores-change", ignored))
        qview = rec.view if rec.view is not None else plain
        if qview.semantic is not None:
            qview = attrs.evolve(qview, outcome=expect.classify(qview.semantic, aq, False))
        if qview.outcome == "error":
            problems.append(("recovered-unreadable", f"after recovery qjournal cannot open the image: {qview.error}"))
        elif qview.corruptions > expect.damage:
            problems.append(("corruption", f"after recovery, qjournal check finds {qview.corruptions} "
                                           f"corruption(s){_had(expect)}: {'; '.join(qview.messages)}"))
        elif qview.outcome not in aq and (rec.wrote or not problems):
            problems.append(("qjournal-not-allowed", f"after recovery qjournal sees {_seen(qview, expect)}, "
                                                     f"allowed: {', '.join(aq)}"))
        elif require is not None and qview.outcome != require:
            problems.append(("recovery-changed-its-mind", f"a crash during recovery, then recovery, gives "
                                                          f"{qview.outcome}; recovery without that crash gave {require}"))
        elif expect.journaled and qview.leaks > expect.leaks_of(qview.outcome):
            problems.append(("leaks-after-recovery", f"after recovery qjournal check finds {qview.leaks} leaked "
                                                     f"cluster(s) where the {qview.outcome} state has "
                                                     f"{expect.leaks_of(qview.outcome)}"))

    for who, view in (("a reader that ignores the journal", plain), ("qjournal after recovery", qview)):
        if view.semantic is not None and view.outcome != "error":
            missed = missed_writes(view.semantic, expect.old)
            if missed:
                problems.append(("bitmap-misses-write", f"{who} sees new guest data; {missed}"))
                break

    orc = None
    if oracle_path is not None:
        orc = oracle(image, oracle_path, expect, plain.outcome)
        if orc.outcome == "error":
            problems.append(("qemu-img-refuses", f"qemu-img check exits {orc.check_exit}"
                                                 f"{f' ({orc.corruptions} corruptions)' if orc.corruptions else ''}"
                                                 f"{': ' + orc.error if orc.error else ''}"))
        elif orc.outcome not in ap:
            seen = "the same" if orc.outcome == plain.outcome else f"{orc.outcome}: {list(orc.bitmaps or ())}"
            problems.append(("qemu-img-not-allowed", f"qemu-img info sees {seen}, allowed: {', '.join(ap)}"))
        elif orc.outcome != plain.outcome:
            problems.append(("qemu-img-disagrees", f"qemu-img info sees {orc.outcome}, qjournal without the journal "
                                                   f"sees {plain.outcome}"))
    invariant, explanation = problems[0] if problems else ("", "")
    if len(problems) > 1:
        explanation += "; also " + "; ".join(f"{name}: {text}" for name, text in problems[1:])
    return Judged(qview.outcome, plain.outcome, plain.leaks, plain.corruptions, rec.wrote, idempotent, orc,
                  aq, ap, not problems, invariant, explanation,
                  rec.recording if rec.wrote else None)


def _had(expect: Expect) -> str:
    return f" where the base had {expect.damage}" if expect.damage else ""


def _seen(v: View, expect: Expect) -> str:
    if v.semantic is None:
        return v.error
    if v.outcome == "other":
        return f"a state that is neither the old nor the new one: {mixture(v.semantic, expect.old, expect.new)}"
    return f"{v.outcome} ({v.semantic.text()})"


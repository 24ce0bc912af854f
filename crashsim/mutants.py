"""Planted bugs: crashsim must catch every one (DESIGN.md, "Reach").

    crashsim mutants [NAME...] [--sample N] [--seed S] [--jobs N] [--timeout S] [--quick] [--list] [--markdown]
    python -m crashsim.mutants ...

Each :class:`Mutant` is a small textual patch of one function of qjournal: one or more
``(old, new)`` replacements, each of which must match the file exactly once. A mutant is
applied to a scratch copy of the ``qjournal`` and ``crashsim`` packages (a temporary
directory); the built-in workloads then run in a subprocess with ``PYTHONPATH`` at the
copy, the mutant's own workloads first (those that exercise the code it breaks), and the
rest only when those catch nothing. The mutant is

- **caught** when a workload has a state that is not allowed (the check is the
  invariant that failed, e.g. ``plain-not-allowed``), a transaction with fewer barriers
  than its minimum (``barrier-deficit``), writes left unsynced when the image is closed
  (``unsynced-at-close``), or when the workload itself fails (``workload-error``: an
  exception, or a workload's own check of its result);
- **missed** when every workload passes;
- **stale** when a replacement's target text is not found (exactly once) in the file:
  the code moved, and the mutant must be re-planted from its description (``breaks``
  and ``where``), never silently counted as passing.

Exit status: 0 every mutant caught, 1 some mutant missed or stale, 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import attrs

from .model import Options
from .runner import run
from .workloads import WORKLOADS

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("qjournal", "crashsim")


@attrs.frozen
class Mutant:
    """One planted bug: what it breaks, where (file, function, phase), and the patch."""

    name: str
    klass: str                              # the class of bug (step order, missing barrier, ...)
    where: str                              # path of the file under the repository root
    function: str                           # the function (and phase or step) it changes
    breaks: str                             # what goes wrong for a user, so it can be re-planted
    edits: tuple[tuple[str, str], ...]      # (old, new): old must occur exactly once
    workloads: tuple[str, ...] = ()         # tried first: the workloads that exercise the code
    known_miss: str = ""                    # why crashsim cannot catch it yet (left out of the CI sample)
    medium: str = "memory"                  # how crashsim records it (real: the real media's system calls)


@attrs.frozen
class Outcome:
    name: str
    klass: str
    status: str                             # caught | missed | stale
    caught_by: str = ""                     # "workload: check" (the first that caught it)
    detail: str = ""
    seconds: float = 0.0


def M(name: str, klass: str, where: str, function: str, breaks: str, old: str, new: str,
      workloads: tuple[str, ...] = (), *more: tuple[str, str], known_miss: str = "", medium: str = "memory") -> Mutant:
    return Mutant(name, klass, where, function, breaks, ((old, new),) + tuple(more), workloads, known_miss,
                  medium)


ORDERING = "qjournal/core/ordering.py"
JOURNAL = "qjournal/journal/journal.py"
RECORDS = "qjournal/journal/records.py"
MEDIUM = "qjournal/storage/medium.py"
GUESTMAP = "qjournal/write/guestmap.py"
BITS = "qjournal/write/bits.py"
DATA = "qjournal/write/data.py"
RESIZE = "qjournal/ops/resize.py"
OVERLAP = "qjournal/core/overlap.py"
IMAGE = "qjournal/core/image.py"
GUEST = ("guest-write", "guest-batch", "guest-write-mixed")
MASKED = ("masked by the two other defences: a record of an older generation carries the old salt, a "
          "sequence number below the new generation's first, and a checksum chained on other records; "
          "each alone refuses it, so breaking one changes no outcome")

MUTANTS: tuple[Mutant, ...] = (
    # -- step order: phases swapped in the ordering table's plan ------------------------------
    M("order-bits-after-mapping", "step order", ORDERING, "plan (bitmap-bits-set after l2-updated, l1-updated)",
      "the mapping of new guest data changes before the bitmap bits are set: a crash between leaves a "
      "consistent bitmap that misses a write",
      "for phase in (Phase.BITMAP_BITS_SET, Phase.L2_UPDATED, Phase.L1_UPDATED):",
      "for phase in (Phase.L2_UPDATED, Phase.L1_UPDATED, Phase.BITMAP_BITS_SET):", GUEST),
    M("order-l1-before-l2", "step order", ORDERING, "plan (l1-updated before l2-updated)",
      "an L1 entry points at a new L2 table before the L2 entries it needs are written",
      "for phase in (Phase.BITMAP_BITS_SET, Phase.L2_UPDATED, Phase.L1_UPDATED):",
      "for phase in (Phase.BITMAP_BITS_SET, Phase.L1_UPDATED, Phase.L2_UPDATED):",
      ("guest-write-grows-reftable", "guest-write-bits-cross", "guest-batch"),
      known_miss="perhaps equivalent: a new L2 table is written whole before the commit, so l1-updated "
                 "never points at entries l2-updated writes; no workload found where the order matters"),
    M("order-refcounts-after-mapping", "step order", ORDERING, "plan (refcounts-increased after l1-updated)",
      "new clusters are referenced before their refcount goes up: a refcount lower than its references",
      "    add(Phase.REFCOUNTS_INCREASED, rplan.increase)\n", "",
      GUEST, ("        add(phase, declared.get(phase, []))\n    ac = header",
              "        add(phase, declared.get(phase, []))\n    add(Phase.REFCOUNTS_INCREASED, rplan.increase)\n"
              "    ac = header")),
    M("order-free-before-switch", "step order", ORDERING, "plan (clusters-freed before the header switch)",
      "the old bitmap directory and tables are freed while the header still points at them",
      "    add(Phase.REFCOUNTS_INCREASED, rplan.increase)\n",
      "    add(Phase.REFCOUNTS_INCREASED, rplan.increase)\n    add(Phase.CLUSTERS_FREED, rplan.free)\n",
      ("remove", "transaction", "add"), ("    add(Phase.CLUSTERS_FREED, rplan.free)\n    add(Phase.COPIED_SET",
                                         "    add(Phase.COPIED_SET")),
    M("order-seed-directory-first", "step order", ORDERING, "plan, seed protocol (directory-written first)",
      "the bitmap directory is rewritten in place before autoclear bit 0 is cleared: a torn directory "
      "that claims to be consistent",
      "        seed = [(Phase.AUTOCLEAR_CLEARED.value, [(AUTOCLEAR, (ac & ~AUTOCLEAR_BITMAPS).to_bytes(8, \"big\"))]),\n"
      "                (Phase.DIRECTORY_WRITTEN.value, [(be.directory_offset, bm.pack_directory(tx.entries))]),\n",
      "        seed = [(Phase.DIRECTORY_WRITTEN.value, [(be.directory_offset, bm.pack_directory(tx.entries))]),\n"
      "                (Phase.AUTOCLEAR_CLEARED.value, [(AUTOCLEAR, (ac & ~AUTOCLEAR_BITMAPS).to_bytes(8, \"big\"))]),\n",
      ("set-in-use-two-pages", "set-in-use-many", "set-in-use")),
    M("order-seed-set-before-directory", "step order", ORDERING, "plan, seed protocol (autoclear-set before "
      "directory-written)", "autoclear bit 0 is set again before the directory is rewritten",
      "                (Phase.DIRECTORY_WRITTEN.value, [(be.directory_offset, bm.pack_directory(tx.entries))]),\n"
      "                (Phase.AUTOCLEAR_SET.value, [(AUTOCLEAR, (ac | AUTOCLEAR_BITMAPS).to_bytes(8, \"big\"))])]",
      "                (Phase.AUTOCLEAR_SET.value, [(AUTOCLEAR, (ac | AUTOCLEAR_BITMAPS).to_bytes(8, \"big\"))]),\n"
      "                (Phase.DIRECTORY_WRITTEN.value, [(be.directory_offset, bm.pack_directory(tx.entries))])]",
      ("set-in-use-two-pages", "set-in-use-many", "set-in-use")),
    M("order-tail-before-size", "step order", ORDERING, "plan (tail-l2-cleared, tail-l1-cleared before the "
      "header switch)", "a shrink drops the tail's mapping before the size switches: a reader of the old size "
      "sees zeros where the guest wrote data",
      "    for phase in (Phase.TAIL_L2_CLEARED, Phase.TAIL_L1_CLEARED):\n        add(phase, declared.get(phase, []))\n",
      "", ("resize-shrink", "resize-shrink-split-header"),
      ("    for phase in (Phase.BITMAP_BITS_SET, Phase.L2_UPDATED, Phase.L1_UPDATED):",
       "    for phase in (Phase.TAIL_L2_CLEARED, Phase.TAIL_L1_CLEARED, Phase.BITMAP_BITS_SET, Phase.L2_UPDATED, "
       "Phase.L1_UPDATED):")),
    M("order-hook-before-increase", "step order", ORDERING, "plan (refcount-blocks-hooked before "
      "refcounts-increased)", "a new refcount block is entered in the refcount table before it counts itself",
      "    add(Phase.REFCOUNTS_INCREASED, rplan.increase)\n    add(Phase.REFCOUNT_BLOCKS_HOOKED, rplan.hook)\n",
      "    add(Phase.REFCOUNT_BLOCKS_HOOKED, rplan.hook)\n    add(Phase.REFCOUNTS_INCREASED, rplan.increase)\n",
      ("guest-write-block-in-hole", "guest-write-grows-reftable", "resize-grows-l1")),
    # -- a missing barrier -----------------------------------------------------------------------
    M("barrier-none-in-apply", "missing barrier", JOURNAL, "Journal._apply (every step)",
      "the steps of a transaction reach the image with no barrier between them: any later step may land "
      "without an earlier one",
      "            self.image.flush([(off, len(data)) for off, data in step.writes])\n", "",
      ("merge", "add", "set-in-use")),
    M("barrier-first-step-only", "missing barrier", JOURNAL, "Journal._apply (steps after the first)",
      "only the first step of a transaction ends with a barrier",
      "            self.image.flush([(off, len(data)) for off, data in step.writes])\n",
      "            if step is t.steps[first]:\n"
      "                self.image.flush([(off, len(data)) for off, data in step.writes])\n",
      ("add", "remove", "set-in-use")),
    M("barrier-partial-ranges", "missing barrier", JOURNAL, "Journal._apply (the barrier's ranges)",
      "each step's barrier covers only its first write: the others may still be in flight when the next "
      "step starts",
      "            self.image.flush([(off, len(data)) for off, data in step.writes])\n",
      "            self.image.flush([(off, len(data)) for off, data in step.writes[:1]])\n",
      ("add", "remove", "transaction", "resize-grows-l1")),
    M("barrier-precommit-missing", "missing barrier", IMAGE, "Image commit (ordered mode: new clusters)",
      "new clusters (bitmap data, tables, a new directory) are not durable before the commit that makes "
      "the image point at them",
      "                    self.medium.flush([(off, len(data)) for off, data in tx.new_writes])\n",
      "                    pass\n", ("add", "merge", "resize-grows-l1")),
    M("barrier-guest-data-missing", "missing barrier", GUESTMAP, "GuestMap.finalize (data before the commit)",
      "guest data written into new clusters is not durable before the commit maps it: the guest reads "
      "stale bytes", "            self.target.flush(self.data_ranges)\n", "            pass\n", GUEST),
    M("barrier-deferred-data-missing", "missing barrier", GUESTMAP, "GuestMap.after_commit (in-place data)",
      "guest data overwritten in place after the bits is not synced before the write returns",
      "            self.target.flush([(host, len(data)) for host, _, data in self.deferred])\n", "",
      ("guest-overwrite", "guest-batch", "guest-write-mixed")),
    # -- medium flush ---------------------------------------------------------------------------
    M("medium-flush-first-range", "medium flush", MEDIUM, "MmapMedium.flush (msync of the ranges)",
      "a flush syncs only the first of the ranges it is given (seen with the real medium recorded)",
      "        for start, length in spans:\n", "        for start, length in spans[:1]:\n",
      ("guest-write", "add", "resize-grows-l1"), medium="real"),
    M("medium-flush-no-fsync-on-growth", "medium flush", MEDIUM, "MmapMedium.flush (fsync after growth)",
      "a flush after the file grew does not make the new size (nor any page) durable (seen with the real "
      "medium recorded)",
      "however it was written.\n            _call(self.path, \"fsync\", None, self.system.fsync, self.fd)\n",
      "however it was written.\n", ("guest-write", "add", "resize-grows-l1"), medium="real"),
    # -- journal commit and checksum ------------------------------------------------------------
    M("commit-no-sync", "journal commit", JOURNAL, "Journal._record (the commit point)",
      "the journal is never synced before the image is written: the steps may land without a committed "
      "transaction that recovery could complete",
      "            self.jmedium.flush()                    # the commit point\n", "            pass\n",
      ("add", "merge", "set-in-use")),
    M("commit-sync-before-write", "journal commit", JOURNAL, "Journal._record (sync, then write the records)",
      "the journal sync comes before the records are written, so it covers nothing",
      "        self.jmedium.event(\"journal_write\")         # for fault injection: the records follow\n"
      "        self.jmedium.write(0, b\"\".join(out))\n",
      "        self.jmedium.flush()\n        self.jmedium.write(0, b\"\".join(out))\n",
      ("add", "merge", "set-in-use"),
      ("            self.jmedium.flush()                    # the commit point\n", "            pass\n")),
    M("checksum-unchecked", "journal checksum", RECORDS, "read_log (record checksum)",
      "a torn journal record passes for a valid one: recovery replays garbage",
      "        if rcrc != cks:\n", "        if False:\n", ("set-in-use-two-pages", "set-in-use-many", "add")),
    M("checksum-salt-ignored", "journal checksum", RECORDS, "read_log (record salt)",
      "records of an older journal generation pass for records of the current one",
      "        if (salt != header.salt or rseq != seq", "        if (rseq != seq",
      ("two-transactions", "set-in-use-two-pages", "set-in-use-many"), known_miss=MASKED),
    M("checksum-not-chained", "journal checksum", RECORDS, "pack_record and read_log (chained CRC32C)",
      "each record's checksum covers only itself, not the records before it: a record of the old "
      "generation left behind a torn one still chains",
      "    cks = crc32c(body, crc32c(head, prev))\n", "    cks = crc32c(body, crc32c(head, 0))\n",
      ("two-transactions", "set-in-use-two-pages", "set-in-use-many"),
      ("        rcrc = crc32c(body, crc32c(head[:-4], crc))\n", "        rcrc = crc32c(body, crc32c(head[:-4], 0))\n"), known_miss=MASKED),
    # -- recovery ----------------------------------------------------------------------------
    M("recovery-no-barriers", "recovery", JOURNAL, "Journal.recover (replay without barriers)",
      "recovery replays the steps with no barrier between them",
      "            self._apply(t, self.resume_step(t))\n",
      "            for step in t.steps[self.resume_step(t):]:\n"
      "                for off, data in step.writes:\n"
      "                    self.image.write(off, data)\n", ("add", "remove", "resize-shrink", "set-in-use")),
    M("recovery-no-checkpoint", "recovery", JOURNAL, "Journal.recover (checkpoint record)",
      "recovery writes no checkpoint: the transaction stays pending, and the next commit refuses",
      "            self._checkpoint(t.txid)\n        self.jmedium.flush()\n",
      "        self.jmedium.flush()\n", ("add", "merge")),
    M("recovery-no-sync", "recovery", JOURNAL, "Journal.recover (journal sync of the checkpoint)",
      "recovery's checkpoint is never synced",
      "        self.jmedium.flush()\n        self._unsynced = False\n        return len(pend)\n",
      "        return len(pend)\n", ("add", "merge")),
    M("recovery-skips-binding", "recovery", JOURNAL, "Journal.recover (binding check)",
      "recovery replays a journal that no longer belongs to the image (QEMU changed it after the crash)",
      "        self.check_binding()\n        assert self.jmedium is not None\n",
      "        assert self.jmedium is not None\n", ("add", "merge")),
    M("recovery-from-step-0", "recovery", JOURNAL, "Journal.recover (resume_step ignored)",
      "recovery replays every step from the first, taking the image back through earlier states",
      "            self._apply(t, self.resume_step(t))\n", "            self._apply(t, 0)\n",
      ("resize-shrink", "resize-grows-l1", "add", "remove")),
    M("recovery-skips-a-step", "recovery", JOURNAL, "Journal.resume_step (one step too far)",
      "recovery resumes one step after the first step that had not taken effect: that step is never applied",
      "                return j + 1\n", "                return min(j + 2, n)\n", ("add", "remove", "merge")),
    # -- close and checkpoint -----------------------------------------------------------------
    M("close-no-sync", "close and checkpoint", JOURNAL, "Journal.close (sync of the checkpoint)",
      "close() leaves the last checkpoint record unsynced",
      "                self.jmedium.flush()\n                self._unsynced = False\n                if self._log.end",
      "                self._unsynced = False\n                if self._log.end", ("add", "set-in-use")),
    M("checkpoint-not-written", "close and checkpoint", JOURNAL, "Journal._checkpoint",
      "no checkpoint record reaches the journal: every transaction stays pending on disk",
      "        self.jmedium.write(log.end, rec)\n", "", ("add", "two-transactions")),
    # -- bitmap bits ----------------------------------------------------------------------------
    M("bits-first-data-cluster-only", "bitmap bits", BITS, "bits_steps (ranges across bitmap data clusters)",
      "a guest write whose dirty range crosses into the next bitmap data cluster sets only the bits of "
      "the first one",
      "            for t in range(first // bits_per_cluster, last // bits_per_cluster + 1):\n",
      "            for t in range(first // bits_per_cluster, first // bits_per_cluster + 1):\n",
      ("guest-write-bits-cross",)),
    M("bits-last-bit-missing", "bitmap bits", BITS, "bits_steps (the last bit of a range)",
      "the bit of the last granule a write touches is left clear", "                bits[lo:hi + 1] = 1\n",
      "                bits[lo:hi] = 1\n", GUEST + ("guest-write-bits-cross",)),
    M("bits-no-new-data-cluster", "bitmap bits", BITS, "bits_steps (a table entry with no data cluster)",
      "a bitmap table entry that has no data cluster yet never gets one: the write's bits are lost",
      "            if not doff and entry & bm.TE_ALL_ONES:\n", "            if not doff:\n",
      GUEST + ("guest-write-bits-cross",)),
    # -- COW spans ------------------------------------------------------------------------------
    M("cow-head-not-copied", "COW spans", DATA, "_new_clusters (copy-on-write of the first cluster of a run)",
      "an unaligned write into several new clusters copies the old content around it into the last "
      "cluster only: the head of the first cluster reads as zeros",
      "        for gc in {run[0], run[-1]}:\n", "        for gc in {run[-1]}:\n",
      ("guest-write-compressed", "guest-write-unaligned")),
    M("cow-fill-short", "COW spans", DATA, "_new_clusters (copy-on-write fill length)",
      "the copy-on-write fill of a partly written new cluster copies only half a cluster",
      "                ceiling = min(cs, img.header.size - c_lo)\n",
      "                ceiling = min(cs // 2, img.header.size - c_lo)\n",
      ("guest-write-compressed", "guest-write-unaligned")),
    # -- resize grow and shrink -----------------------------------------------------------------
    M("resize-grow-l1-not-copied", "resize grow", RESIZE, "declare (the new, larger L1 table)",
      "a grow that needs a new L1 table leaves its old entries out: the guest's data is unmapped",
      "        table[:h.l1_size] = img.l1_table()\n", "", ("resize-grow-checked", "resize-grows-l1")),
    M("resize-grow-old-l1-kept", "resize grow", RESIZE, "declare (old L1 table freed)",
      "a grow that moves the L1 table never frees the old one: leaked clusters",
      "            tx.alloc.free_clusters_of([(h.l1_table_offset, h.l1_size * 8)])\n", "            pass\n",
      ("resize-grow-checked", "resize-grows-l1")),
    M("resize-shrink-no-discard", "resize shrink", RESIZE, "declare (tail discard of a shrink)",
      "a shrink keeps the L2 entries and clusters past the new end: leaked clusters, and stale data that "
      "reappears if the image grows again",
      "        tx.stage(Phase.TAIL_L2_CLEARED, l2_writes)\n        tx.stage(Phase.TAIL_L1_CLEARED, l1_writes)\n",
      "", ("resize-shrink", "resize-shrink-split-header")),
    M("resize-shrink-discard-early", "resize shrink", RESIZE, "declare (tail discard staged as l2-updated, l1-updated)",
      "a shrink drops the tail's mapping in the l2-updated and l1-updated phases, before the size switches: a reader of the "
      "old size sees zeros where the guest wrote data",
      "        tx.stage(Phase.TAIL_L2_CLEARED, l2_writes)\n        tx.stage(Phase.TAIL_L1_CLEARED, l1_writes)\n",
      "        tx.stage(Phase.L2_UPDATED, l2_writes)\n        tx.stage(Phase.L1_UPDATED, l1_writes)\n",
      ("resize-shrink", "resize-shrink-split-header")),
    M("resize-autoclear-unguarded", "resize grow", ORDERING, "plan (header switch without the autoclear guard)",
      "the header switch of a resize or directory rewrite does not clear autoclear first when the size and "
      "the bitmaps extension lie in different sectors",
      "        hsteps = plan_cluster0(cur_bytes, cur_c0, new_c0, guard_bitmaps=bitmaps_changed)\n        why = "
      "unsafe_boundary(cur_bytes, cur_c0, new_c0, hsteps)\n        if why and",
      "        hsteps = plan_cluster0(cur_bytes, cur_c0, new_c0, guard_bitmaps=False)\n        why = "
      "unsafe_boundary(cur_bytes, cur_c0, new_c0, hsteps)\n        if why and",
      ("resize-grow-split-header", "resize-shrink-split-header", "add-split-header")),
    # -- the overlap map ------------------------------------------------------------------------
    M("overlap-first-cluster-only", "overlap map", OVERLAP, "OverlapMap.check_write (clusters checked)",
      "a write is checked against the structures in use at its first cluster only",
      "        found = self.find(np.arange(first, last + 1, dtype=np.int64))\n",
      "        found = self.find(np.arange(first, first + 1, dtype=np.int64))\n", ("new-cluster-over-metadata",)),
    M("overlap-no-bitmap-data", "overlap map", OVERLAP, "OverlapMap.build (bitmap data clusters)",
      "the overlap map leaves out bitmap data clusters: a write over one is not refused",
      "            parts.append(((data[data != 0] // _U(cs)).astype(np.int64), f\"bitmap data of {whose}\"))\n",
      "            pass\n", ("guest-write-damaged",)),
    # -- the operation's result: wrong, yet reached atomically (the independent "new") -----------
    M("seed-in-use-not-set", "operation result", "qjournal/ops/bitmaps.py", "Bitmaps.set_in_use (the new flags)",
      "the seed protocol leaves the bitmap without in_use: QEMU then trusts bits that guest writes no "
      "longer keep up to date",
      "            flags = (e.flags | bm.FLAG_IN_USE) if in_use else (e.flags & ~bm.FLAG_IN_USE)\n",
      "            flags = e.flags if in_use else (e.flags & ~bm.FLAG_IN_USE)\n", ("set-in-use", "set-in-use-many")),
    M("merge-not-or", "operation result", "qjournal/ops/bitmaps.py",
      "Bitmaps.merge (bit by bit, different granularities)",
      "a merge replaces the target's bits by the source's instead of adding them: bits the target had "
      "are lost, and a backup misses those writes",
      "            merged = dst_bits | _resample(src_bits, src_e.granularity, dst_e.granularity, img.header.size)\n",
      "            merged = _resample(src_bits, src_e.granularity, dst_e.granularity, img.header.size)\n",
      ("merge-into-dirty", "merge")),
    M("add-wrong-granularity", "operation result", "qjournal/ops/bitmaps.py", "Bitmaps.add (the granularity)",
      "bitmap add records a granularity twice the one asked for",
      "    return g.bit_length() - 1\n", "    return g.bit_length()\n", ("add",)),
)


# -- applying ------------------------------------------------------------------------------------
def find(name: str) -> Mutant:
    for m in MUTANTS:
        if m.name == name:
            return m
    raise KeyError(f"no mutant named {name!r}; see crashsim mutants --list")


def apply(m: Mutant, root: Path, dest: Path) -> str:
    """Copy the packages from ``root`` into ``dest`` and plant ``m``; return "" or why it is stale."""
    for pkg in PACKAGES:
        shutil.copytree(root / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    target = dest / m.where
    if not target.exists():
        return f"{m.where} does not exist"
    text = target.read_text()
    for old, new in m.edits:
        n = text.count(old)
        if n != 1:
            first = old.strip().splitlines()[0] if old.strip() else old
            return f"{m.where}: the target text {first!r} occurs {n} times (expected once)"
        text = text.replace(old, new)
    target.write_text(text)
    return ""


def _child_command(workloads: Sequence[str], seed: int, jobs: int, medium: str) -> list[str]:
    return [sys.executable, "-m", "crashsim.mutants", "--child", ",".join(workloads), "--seed", str(seed),
            "--jobs", str(jobs), "--medium", medium]


def child(names: Sequence[str], seed: int, jobs: int, medium: str = "memory") -> int:
    """Run ``names`` (in this process's qjournal, the mutated copy) and print one JSON line per
    workload: the first check that failed, or "" (used by :func:`run_one`)."""
    opts = Options(k=2, samples=8, seed=seed, max_tears=32, oracle="sample", oracle_samples=4, jobs=jobs,
                   executor="inline" if jobs == 1 else "", medium=medium)
    for name in names:
        try:
            (w,) = run([WORKLOADS[name]], opts).workloads
        except Exception as e:  # the mutated code may break crashsim's own recording
            print(json.dumps({"workload": name, "check": "workload-error", "detail": f"{type(e).__name__}: {e}"}),
                  flush=True)
            return 0
        check, detail = "", ""
        if w.error:
            check, detail = "workload-error", w.error
        elif w.failures:
            v = w.failures[0]
            check, detail = v.invariant or "not-allowed", v.explanation
        elif w.deficits:
            t = w.deficits[0]
            check, detail = "barrier-deficit", f"transaction {t.index}: {t.barriers} barriers, minimum {t.minimum}"
        elif w.unsynced:
            check, detail = "unsynced-at-close", w.unsynced
        print(json.dumps({"workload": name, "check": check, "detail": detail[:400]}), flush=True)
        if check:
            return 0
    return 0


def run_one(m: Mutant, seed: int = 0, jobs: int = 1, timeout: float = 600, root: Path = ROOT,
            fallback: bool = True) -> Outcome:
    """Plant ``m`` in a scratch copy and run its workloads against it, then (``fallback``)
    every other built-in workload if those caught nothing."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as d:
        why = apply(m, root, Path(d))
        if why:
            return Outcome(m.name, m.klass, "stale", detail=why)
        first = [w for w in m.workloads if w in WORKLOADS]
        rest = [w for w in WORKLOADS if fallback and w not in first and not WORKLOADS[w].expect_failure]
        env = dict(os.environ, PYTHONPATH=d, CI=os.environ.get("CI", ""))
        for group in (first, rest):
            if not group:
                continue
            try:
                res = subprocess.run(_child_command(group, seed, jobs, m.medium), cwd=d, env=env, capture_output=True,
                                     text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return Outcome(m.name, m.klass, "caught", "timeout", f"no answer in {timeout:.0f} s",
                               time.perf_counter() - t0)
            lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
            for line in lines:
                if line["check"]:
                    return Outcome(m.name, m.klass, "caught", f"{line['workload']}: {line['check']}",
                                   line["detail"], time.perf_counter() - t0)
            if res.returncode:
                tail = (res.stderr.strip().splitlines() or ["?"])[-1]
                return Outcome(m.name, m.klass, "caught", "import: crashsim could not start", tail[:400],
                               time.perf_counter() - t0)
        why = f" (known: {m.known_miss})" if m.known_miss else ""
        return Outcome(m.name, m.klass, "missed", detail=f"{len(first) + len(rest)} workloads passed{why}",
                       seconds=time.perf_counter() - t0)


def sample(mutants: Sequence[Mutant], n: int, seed: int) -> list[Mutant]:
    """``n`` mutants drawn with ``seed`` from those crashsim is meant to catch today (no
    ``known_miss``), of as many classes as ``n`` allows."""
    rng = random.Random(f"mutants:{seed}")
    by_class: dict[str, list[Mutant]] = {}
    mutants = [m for m in mutants if not m.known_miss]
    for m in mutants:
        by_class.setdefault(m.klass, []).append(m)
    classes = sorted(by_class)
    rng.shuffle(classes)
    out = [rng.choice(by_class[c]) for c in classes[:n]]
    rest = [m for m in mutants if m not in out]
    out += rng.sample(rest, max(0, min(n - len(out), len(rest))))
    return sorted(out, key=list(mutants).index)


def table(outcomes: Sequence[Outcome]) -> str:
    """The Markdown table of the README: mutant, class, caught by."""
    rows = ["| mutant | class | caught by |", "|---|---|---|"]
    for o in outcomes:
        by = o.caught_by if o.status == "caught" else f"**{o.status.upper()}**: {o.detail}"
        rows.append(f"| `{o.name}` | {o.klass} | {by} |")
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crashsim mutants", description="Plant each bug in a scratch copy of "
                                "qjournal, run crashsim's workloads against it, report which check caught it.")
    p.add_argument("names", nargs="*", metavar="NAME", help="mutants to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutants: name, class, where, what it breaks")
    p.add_argument("--sample", type=int, default=0, metavar="N", help="a seeded sample of N mutants")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample and of crashsim's runs")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="worker processes per crashsim run")
    p.add_argument("--timeout", type=float, default=600, metavar="S", help="seconds per crashsim run")
    p.add_argument("--quick", action="store_true", help="run each mutant's own workloads only (no fallback to "
                   "every built-in workload when they catch nothing)")
    p.add_argument("--markdown", action="store_true", help="print the result as the README's table")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the outcomes as JSON")
    p.add_argument("--child", metavar="WORKLOADS", help=argparse.SUPPRESS)
    p.add_argument("--medium", choices=("memory", "real"), default="memory", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.child is not None:
        return child(args.child.split(","), args.seed, args.jobs, args.medium)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name}  [{m.klass}]  {m.where}: {m.function}\n    breaks: {m.breaks}")
        return 0
    try:
        chosen = [find(n) for n in args.names] if args.names else list(MUTANTS)
    except KeyError as e:
        print(f"crashsim mutants: {e.args[0]}", file=sys.stderr)
        return 2
    if args.sample:
        chosen = sample(chosen, args.sample, args.seed)
    t0 = time.perf_counter()
    outcomes = []
    for m in chosen:
        o = run_one(m, args.seed, args.jobs, args.timeout, fallback=not args.quick)
        outcomes.append(o)
        where = o.caught_by if o.status == "caught" else o.detail
        print(f"{o.status.upper():7s} {o.name:34s} {o.klass:22s} {where}  ({o.seconds:.1f} s)", flush=True)
    caught = sum(o.status == "caught" for o in outcomes)
    print(f"crashsim mutants: {caught} of {len(outcomes)} caught in {time.perf_counter() - t0:.0f} s"
          + "".join(f", {sum(o.status == s for o in outcomes)} {s}" for s in ("missed", "stale")
                    if any(o.status == s for o in outcomes)))
    if args.markdown:
        print(table(outcomes))
    if args.json is not None:
        args.json.write_text(json.dumps([attrs.asdict(o) for o in outcomes], indent=1))
    return 0 if caught == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

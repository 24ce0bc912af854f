"""Workloads: what crashsim records, and the images they start from.

A workload is a function that takes an open, writable :class:`qjournal.image.Image` and
changes it. The built-in ones cover every journaled operation qjournal has (bitmap add,
remove, clear, enable, disable, merge, repair; ``in_use`` set and cleared in place by
the seed protocol; several operations in one transaction), plus *negative controls*
that bypass the journal and write through ``img.medium`` in an order known to be unsafe,
to prove the checker can fail.

A user workload is ``path/to/file.py:function`` or ``module:function``; the
:func:`workload` decorator declares its base image and its allowed outcomes (it sets the
function's ``crashsim_base``, ``crashsim_journaled``, ``crashsim_whole``,
``crashsim_relaxed`` and ``crashsim_expect_failure`` attributes).

Each base is made by qemu-img and qemu-io commands in a temporary directory (and, for
one, a rewrite of cluster 0 in Python); its bytes are cached per process.
"""
from __future__ import annotations

import atexit
import importlib
import importlib.util
import os
import shutil
import shlex
import subprocess
import sys
import tempfile
from types import ModuleType
from typing import Callable, Iterable, TypeVar

import attrs

from qjournal.format.bitmaps import EXT_FIELD_OFFSET as BITMAPS_FIELD_OFFSET, FLAG_IN_USE
from qjournal.format.extensions import EXT_BITMAPS, EXT_HEADER, Extension, pack_extensions, parse_extensions
from qjournal.format.geometry import SECTOR
from qjournal.format.header import AUTOCLEAR_BITMAPS, field_span, pack_field, read_field
from qjournal.format import refcount as refcount_fmt
import qjournal
from qjournal import Image
from qjournal.errors import FormatError
from qjournal.ops import amend as amend_op, commit as commit_op, rebase as rebase_op

from .checks import Semantic, flag_names
from .recorder import IMAGE, JOURNAL, Recording, RecordingMedium, bracket_transactions

Write = tuple[int, bytes]
F = TypeVar("F", bound=Callable[..., object])


@attrs.frozen
class Base:
    """A starting image: commands run in a temporary directory on ``base.qcow2``."""

    name: str
    commands: tuple[tuple[str, ...], ...]
    post: Callable[[str], None] | None = None     # a Python step on the file, after the commands
    post_description: str = ""
    may_fail: frozenset[int] = frozenset()        # indices of commands whose exit status is ignored

    def describe(self) -> str:
        lines = [" ".join(shlex.quote(a) for a in c) for c in self.commands]
        if self.post is not None:
            lines.append(f"# then: {self.post_description}")
        return "\n".join(lines)

    def build(self) -> bytes:
        """The image's bytes, made once per process for each distinct base (not per name)."""
        cached = _BASES.get(self)
        if cached is not None:
            return cached
        with tempfile.TemporaryDirectory(prefix="crashsim-base-") as d:
            for i, cmd in enumerate(self.commands):
                res = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
                if res.returncode and i not in self.may_fail:
                    raise RuntimeError(f"building base {self.name!r}: {' '.join(cmd)}: exit {res.returncode}: "
                                       f"{res.stderr.strip()}")
            path = os.path.join(d, "base.qcow2")
            if self.post is not None:
                self.post(path)
            with open(path, "rb") as f:
                data = f.read()
        _BASES[self] = data
        return data


_BASES: dict[Base, bytes] = {}

IMG = "base.qcow2"


def qemu_img_cmd(*args: str) -> tuple[str, ...]:
    """A qemu-img command line for a :class:`Base` (the image is ``IMG``)."""
    return ("qemu-img", *args)


def qemu_io_cmd(*commands: str) -> tuple[str, ...]:
    """One qemu-io run of ``commands`` (each a ``-c``) on ``IMG``, for a :class:`Base`."""
    out = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        out += ["-c", c]
    return (*out, IMG)


STANDARD = Base("standard", (
    qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", IMG, "64M"),
    qemu_img_cmd("bitmap", "--add", IMG, "stale"),
    qemu_io_cmd("write 30M 4k", "abort"),                    # leaves "stale" in use, as a crashed QEMU does
    qemu_img_cmd("bitmap", "--add", IMG, "b0"),
    qemu_img_cmd("bitmap", "--add", "-g", "4096", IMG, "b1"),
    qemu_io_cmd("write 0 64k", "write 10M 64k", "write 63M 4k"),
    qemu_img_cmd("bitmap", "--disable", IMG, "b1"),
    qemu_img_cmd("bitmap", "--add", "-g", "512", IMG, "b2"),
    qemu_io_cmd("write 20M 8k"),
    qemu_img_cmd("bitmap", "--add", IMG, "fresh"),
), may_fail=frozenset({2}))

LONG = [f"long-{i}-" + "n" * 1000 for i in range(5)]
LONG_NAMES = Base("long-names", (
    qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", IMG, "64M"),
    *(qemu_img_cmd("bitmap", "--add", IMG, name) for name in LONG),
    qemu_io_cmd("write 0 64k", "write 40M 4k"),
))

# An unknown extension of this length, placed before the bitmaps extension (at byte 112
# on a 4 KiB-cluster image, which has no feature table), puts the bitmaps extension's
# header at byte 1000 and its data at 1008: nb_bitmaps at 1008, directory size at 1016
# (sector 1) and directory offset at 1024 (sector 2).
UNKNOWN_EXT = 0x71A0C0DE
UNKNOWN_LEN = 880


def _insert_unknown_extension(path: str) -> None:
    """Rewrite cluster 0 with an unknown extension before the bitmaps extension.

    QEMU itself writes unknown extensions after the bitmaps extension when it rewrites
    the header, so the extension goes in after qemu-img made the bitmaps; QEMU and
    qjournal both keep the order they find.
    """
    with open(path, "r+b") as f:
        c0 = bytearray(f.read(4096))
        hl = read_field(c0, "header_length")
        exts = parse_extensions(bytes(c0), hl, len(c0))
        unknown = Extension(UNKNOWN_EXT, bytes(range(256)) * 3 + bytes(UNKNOWN_LEN - 768))
        packed = pack_extensions([unknown, *exts])
        c0[hl:] = packed + bytes(len(c0) - hl - len(packed))
        f.seek(0)
        f.write(c0)
    ext = [e for e in parse_extensions(bytes(c0), hl, len(c0)) if e.type == EXT_BITMAPS][0]
    data = ext.offset + EXT_HEADER.size
    size_at, offset_at = (data + BITMAPS_FIELD_OFFSET[f] for f in ("directory_size", "directory_offset"))
    assert size_at // SECTOR != offset_at // SECTOR, ext.offset


SHIFTED = Base("shifted-header", (
    qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", IMG, "64M"),
    qemu_img_cmd("bitmap", "--add", IMG, "b0"),
    qemu_img_cmd("bitmap", "--add", "-g", "4096", IMG, "b1"),
    qemu_io_cmd("write 0 64k", "write 5M 12k"),
), post=_insert_unknown_extension,
    post_description=f"insert an unknown header extension (type {UNKNOWN_EXT:#x}, {UNKNOWN_LEN} bytes) before "
                     "the bitmaps extension, so that its directory size (byte 1016) and directory offset "
                     "(byte 1024) lie in different 512-byte sectors")

SMALL_REFTABLE = Base("small-reftable", (
    qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", IMG, "16M"),
    qemu_img_cmd("bitmap", "--add", IMG, "b0"),
    qemu_io_cmd("write 0 1950k"),   # the one-cluster refcount table covers 2 MiB: nearly full
))

BLOCK_IN_HOLE = Base("block-in-hole", (
    qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=16", IMG, "16M"),
    # Refcount block 0 covers the file's first 128 KiB; this ends the file at 119.5 KiB
    # and frees one cluster near its start (guest cluster 0's).
    qemu_io_cmd("write -P 0x11 0 112k", "discard 0 512"),
))

EXTENDED_L2 = Base("extended-l2", (
    qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k,extended_l2=on", IMG, "16M"),
    qemu_io_cmd("write 0 4k", "write 32k 16k"),              # subclusters 0-1 and 16-23 of cluster 0
    qemu_img_cmd("bitmap", "--add", "-g", "4096", IMG, "b0"),  # after the writes: no bit set yet
))

BASES = {b.name: b for b in (STANDARD, LONG_NAMES, SHIFTED, SMALL_REFTABLE, BLOCK_IN_HOLE, EXTENDED_L2)}


@attrs.frozen
class Workload:
    name: str
    description: str
    fn: Callable[[Image], object]
    base: Base = STANDARD
    journaled: bool = True
    expect_failure: bool = False
    minimum: int = 0                    # barriers a bypassing workload's protocol needs (its steps)
    whole: bool = False                 # the whole call is one operation (not one per transaction)
    relaxed: bool = False               # early bitmap bits and in-place data are allowed (see checks)
    # The independent "new": the same operation done by QEMU on the base (qemu-img or qemu-io
    # commands on IMG), whose result the recorded new state must equal, and a declared check
    # of the new state against the old (its complaint, "" when the new state is right).
    qemu: tuple[tuple[str, ...], ...] = ()
    expect: Callable[[Semantic, Semantic], str] | None = None


def qemu_result(w: Workload) -> bytes:
    """The base of ``w`` after QEMU did ``w.qemu`` to it (once per process)."""
    key = (w.base, w.qemu)
    cached = _QEMU_RESULTS.get(key)
    if cached is None:
        with tempfile.TemporaryDirectory(prefix="crashsim-qemu-") as d:
            path = os.path.join(d, IMG)
            with open(path, "wb") as f:
                f.write(w.base.build())
            for cmd in w.qemu:
                res = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
                if res.returncode:
                    raise RuntimeError(f"{w.name}: QEMU's own operation: {' '.join(cmd)}: exit {res.returncode}: "
                                       f"{res.stderr.strip()}")
            with open(path, "rb") as f:
                cached = _QEMU_RESULTS[key] = f.read()
    return cached


_QEMU_RESULTS: dict[tuple[Base, tuple[tuple[str, ...], ...]], bytes] = {}


def workload(base: str = "standard", journaled: bool = True, expect_failure: bool = False,
             whole: bool = False, relaxed: bool = False, qemu: Iterable[str] = (),
             expect: Callable[[Semantic, Semantic], str] | None = None) -> Callable[[F], F]:
    """Declare how a user workload starts and which outcomes a crash in it may leave.

    A user workload is ``path/to/file.py:function`` or ``module:function`` (the current
    directory is importable); the function takes an open, writable ``Image``. Without this
    decorator it is a journaled operation on the ``standard`` base, one operation per
    transaction, with the strict outcomes below. The outcomes of every crash state:

    - qjournal, after recovery, sees exactly the state before the operation (``old``) or
      after it (``new``), where the operation is each transaction, or with ``whole=True``
      the whole call; after the call returned, ``new`` only;
    - a reader that ignores the journal (and ``qemu-img``) sees ``old``, ``new``, or the
      bitmaps ``dropped`` through a clear autoclear bit, with leaks allowed only inside the
      operation; never a corruption, nor a bitmap that claims to be consistent but misses a
      write of new guest data;
    - no transaction has fewer barriers than its minimum, and nothing is left unsynced
      once the image is closed.

    ``base``: the starting image (a name of :data:`BASES`). ``journaled=False``: the
    workload writes ``img.medium`` itself, so only the plain reader's rules apply.
    ``whole``: the whole call is one operation. ``relaxed``: a guest write, which may set
    bitmap bits early (a plain reader then sees a bitmap with more bits than ``old``: extra
    bytes for a backup, allowed) and write data in place before it returns; without it,
    such a state is reported as ``plain-not-allowed``. ``expect_failure``: a negative
    control, which must fail (then the run passes when it does).

    The new state itself is taken from the recording, so a wrong result reached atomically
    would pass; declare it independently. ``qemu``: qemu-img or qemu-io command lines
    (``base.qcow2`` is the image; for example ``"qemu-img bitmap --add base.qcow2 b9"``)
    that do the same operation: the run fails unless qjournal's new state has the same
    size, bitmaps (flags and dirty bits) and guest data as QEMU's. ``expect``: a function
    of the old and the new :class:`crashsim.checks.Semantic` returning "" when the new
    state is right, else what is wrong (the run then fails with it).
    """
    def mark(fn: F) -> F:
        for key, value in (("base", base), ("journaled", journaled), ("expect_failure", expect_failure),
                           ("whole", whole), ("relaxed", relaxed), ("qemu", tuple(tuple(shlex.split(c)) for c in qemu)),
                           ("expect", expect)):
            setattr(fn, f"crashsim_{key}", value)
        return fn
    return mark


# -- journaled operations -----------------------------------------------------------------
def _remove_all(img: Image) -> None:
    with img.transaction("remove every bitmap"):
        for name in list(img.bitmaps):
            img.bitmaps.remove(name)


def _several(img: Image) -> None:
    with img.transaction("remove fresh, add new, merge b1 into new"):
        img.bitmaps.remove("fresh")
        img.bitmaps.add("new", 1 << 16)
        img.bitmaps.merge("new", "b1")


def _all_in_use(img: Image) -> None:
    with img.transaction("set in_use on every bitmap"):
        for name in list(img.bitmaps):
            img.bitmaps.set_in_use(name, True)


def _guest_write(img: Image) -> None:
    img.write(5 << 20, bytes(range(256)) * 48)             # 12 KiB into unallocated clusters


def _guest_overwrite(img: Image) -> None:
    img.write(0, b"\x5a" * (64 << 10))    # in place over 16 allocated clusters: more than 12 units in flight


def _guest_mixed(img: Image) -> None:
    img.write((10 << 20) + (48 << 10), b"\xa5" * (32 << 10))   # half in place, half into new clusters


def _guest_zero(img: Image) -> None:
    img.write_zeroes(8 << 10, 120 << 10)   # whole clusters become zero clusters and are freed


def _grow_reftable(img: Image) -> None:
    img.write(2 << 20, b"\x5a" * (64 << 10))   # outgrows the refcount table: a new one is switched in


def _block_in_hole(img: Image) -> None:
    # 24 new clusters in one run: past the one-cluster hole, across the end of block 0's
    # range. The new refcount block then takes the hole, so an older block counts it.
    img.write(112 << 10, b"\x5a" * (12 << 10))


def _guest_batch(img: Image) -> None:
    with img.transaction("several guest writes"):         # one commit for all of them
        img.write(4 << 10, b"\x11" * (8 << 10))          # over allocated clusters: copied into new ones
        img.write(5 << 20, b"\x22" * (12 << 10))         # new clusters
        img.write((5 << 20) + 100, b"\x33" * 100)        # into a cluster this transaction allocated
        img.write_zeroes(10 << 20, 16 << 10)             # zero clusters, data freed
        img.write(20 << 20, b"\x44" * 100)               # copied into a new cluster ...
        img.write_zeroes(20 << 20, 4 << 10)              # ... then zeroed: the new cluster is freed
        img.write((20 << 20) + 50, b"\x55" * 10)         # ... then a new cluster around zeros


def _guest_extended_l2(img: Image) -> None:
    with img.transaction("subcluster writes"):
        img.write((1 << 20) + 5000, b"\x44" * 3000)      # two subclusters of a cluster with no host cluster
        img.write(3000, b"\x55" * 6000)                  # over allocated and unallocated subclusters: copied
        img.write_zeroes(32 << 10, 8 << 10)              # four whole subclusters read as zeros
        img.write((34 << 10) + 10, b"\x66" * 10)         # into one of them, in the cluster copied above


def _guest_atomic(img: Image) -> None:
    with img.transaction("overwrite allocated clusters, all or nothing"):
        img.write(0, b"\x5a" * (64 << 10))               # 16 allocated clusters: into 16 new ones
        img.write((10 << 20) + 100, b"\xa5" * 5000)      # two, partly: copied, then switched
        img.write((20 << 20) + 4096, b"\x3c" * 10)       # one of b2's clusters (512 B granularity)


def _two_transactions(img: Image) -> None:
    img.bitmaps.add("first", 4096)
    img.bitmaps.disable("first")


def _journal_compact(img: Image) -> None:
    """Two transactions; then the close cuts the checkpointed log back to a new
    generation's bare header, as it does for a log over 1 MiB (here any log)."""
    assert img.journal is not None
    img.journal.compact_above = 0
    _two_transactions(img)


# -- planning through qjournal, applying without it (for the controls) ------------------------
@attrs.frozen
class Plan:
    """What qjournal would write for an operation: precommit writes, steps, final image, and
    the writes it makes outside any transaction (guest data overwritten in place)."""

    precommit: tuple[Write, ...]
    steps: tuple[tuple[str, tuple[Write, ...]], ...]
    final: bytes
    unjournaled: tuple[Write, ...] = ()

    def step(self, *names: str) -> list[Write]:
        return [w for name, ws in self.steps if name in names for w in ws]


def plan(img: Image, op: Callable[[Image], object]) -> Plan:
    """Run ``op`` through qjournal on an in-memory copy of ``img``; nothing of ``img`` changes."""
    rec = Recording({IMAGE: img.medium.read(0, img.medium.size), JOURNAL: b""})
    with Image("plan.qcow2", "r+", medium=RecordingMedium(rec, IMAGE),
               journal_medium=RecordingMedium(rec, JOURNAL)) as scratch:
        bracket_transactions(scratch, rec)
        op(scratch)
    precommit: list[Write] = []
    steps: list[tuple[str, tuple[Write, ...]]] = []
    unjournaled: list[Write] = []
    pending: list[Write] = []
    inside = False
    for e in rec.entries:
        if e.file != IMAGE:
            continue
        if e.kind == "write":
            (pending if inside else unjournaled).append((e.off, e.data))
        elif e.kind == "mark" and e.name in ("tx-begin", "tx-end"):
            inside = e.name == "tx-begin"
            unjournaled += pending  # written after the last step: in-place data that waited for it
            pending = []
        elif e.kind == "mark" and e.name == "commit":
            precommit += pending
            pending = []
        elif e.kind == "mark":
            steps.append((e.name, tuple(pending)))
            pending = []
    return Plan(tuple(precommit), tuple(steps), rec.state(len(rec.entries))[IMAGE], tuple(unjournaled))


def _apply(img: Image, name: str, writes: Iterable[Write]) -> None:
    """One step of a protocol without the journal: writes, a barrier on them, a mark."""
    ws = list(writes)
    for off, data in ws:
        img.medium.write(off, data)
    img.medium.flush([(off, len(data)) for off, data in ws])
    img.medium.mark(name)


def control_seed_wrong_order(img: Image) -> None:
    """The seed protocol with the directory written before autoclear is cleared.

    qjournal plans "set in_use on every bitmap" (autoclear-cleared, directory-written,
    autoclear-set); this applies the same writes without the journal, directory first.
    The directory spans two pages, so a crash can keep one page of it and not the
    other while autoclear still says the bitmaps are consistent.
    """
    p = plan(img, _all_in_use)
    names = [n for n, _ in p.steps]
    if p.precommit or names != ["autoclear-cleared", "directory-written", "autoclear-set"]:
        raise RuntimeError(f"unexpected plan for the seed protocol: {names}")
    for name in ("directory-written", "autoclear-cleared", "autoclear-set"):
        _apply(img, name, p.step(name))


def _qemu_header_rewrite(img: Image) -> None:
    """Add a bitmap as QEMU would: every header update is one write of the whole cluster 0.

    The seed protocol's order (autoclear cleared, synced; new directory, tables and
    refcounts written into new clusters, synced; header with autoclear set and the new
    bitmaps extension, synced; old clusters freed, synced), but the last header write
    changes autoclear and the extension at once, in one write that may tear.
    """
    cs = img.header.cluster_size
    p = plan(img, lambda s: s.bitmaps.add("added", 65536))
    known = {"refcounts-increased", "refcount-blocks-hooked", "autoclear-cleared", "header-tail-written",
             "header-switched", "header-cleanup", "clusters-freed"}
    unknown = [n for n, _ in p.steps if n not in known]
    if unknown:
        raise RuntimeError(f"unexpected steps in the plan: {unknown}")
    c0 = bytearray(img.medium.read(0, cs))
    ac_start, ac_end = field_span("autoclear_features")
    c0[ac_start:ac_end] = pack_field("autoclear_features", read_field(c0, "autoclear_features") & ~AUTOCLEAR_BITMAPS)
    _apply(img, "autoclear-cleared", [(0, bytes(c0))])
    _apply(img, "directory-written", list(p.precommit) + p.step("refcounts-increased", "refcount-blocks-hooked"))
    _apply(img, "header-switched", [(0, p.final[:cs])])
    _apply(img, "clusters-freed", p.step("clusters-freed"))


def control_data_before_bits(img: Image) -> None:
    """A guest overwrite in place with the data written before the bitmap bits.

    qjournal plans it as the ordering rule says (bits, then data); this applies the
    same writes without the journal, data first: a crash between leaves new data that a
    consistent, enabled bitmap does not mark.
    """
    p = plan(img, _guest_overwrite)
    names = [n for n, _ in p.steps]
    if "bitmap-bits-set" not in names or not p.unjournaled:
        raise RuntimeError(f"unexpected plan for an overwrite in place: {names}")
    _apply(img, "data-written", p.unjournaled)
    _apply(img, "new-clusters-written", p.precommit)
    for name, writes in p.steps:
        _apply(img, name, writes)


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("add", "bitmap add, 4 KiB granularity", lambda img: img.bitmaps.add("added", 4096)),
    Workload("add-disabled", "bitmap add, disabled, 1 MiB granularity",
             lambda img: img.bitmaps.add("added", 1 << 20, disabled=True)),
    Workload("remove", "bitmap remove", lambda img: img.bitmaps.remove("fresh")),
    Workload("remove-all", "remove every bitmap in one transaction", _remove_all),
    Workload("clear", "bitmap clear of a dirty bitmap", lambda img: img.bitmaps.clear("b1")),
    Workload("enable", "bitmap enable", lambda img: img.bitmaps.enable("b1")),
    Workload("disable", "bitmap disable", lambda img: img.bitmaps.disable("fresh")),
    Workload("merge", "bitmap merge, different granularities (bit by bit)",
             lambda img: img.bitmaps.merge("fresh", "b1")),
    Workload("merge-same-granularity", "bitmap merge, same granularity (cluster by cluster)",
             lambda img: img.bitmaps.merge("fresh", "b0")),
    Workload("repair", "bitmap repair of a bitmap left in use", lambda img: img.bitmaps.repair("stale")),
    Workload("set-in-use", "set in_use in place (the seed protocol)",
             lambda img: img.bitmaps.set_in_use("fresh", True)),
    Workload("clear-in-use", "clear in_use in place (the seed protocol)",
             lambda img: img.bitmaps.set_in_use("stale", False)),
    Workload("transaction", "remove, add and merge in one transaction", _several),
    Workload("two-transactions", "add, then disable, as two transactions", _two_transactions),
    Workload("journal-compact", "two transactions, then the close cuts the log back to a bare header",
             _journal_compact),
    Workload("guest-write", "guest write into unallocated clusters under enabled bitmaps", _guest_write,
             relaxed=True),
    Workload("guest-overwrite", "guest overwrite in place under enabled bitmaps (bits first, then data)",
             _guest_overwrite, whole=True, relaxed=True),
    Workload("guest-write-mixed", "guest write partly in place, partly into new clusters", _guest_mixed,
             whole=True, relaxed=True),
    Workload("guest-zero", "write zeroes: whole clusters become zero clusters, their data freed",
             _guest_zero, relaxed=True),
    Workload("guest-batch", "several guest writes, copied, new and zero, in one transaction",
             _guest_batch, whole=True, relaxed=True),
    Workload("guest-extended-l2", "subcluster writes and zeroes (extended L2) in one transaction",
             _guest_extended_l2, base=EXTENDED_L2, whole=True, relaxed=True),
    Workload("guest-atomic", "overwrites of allocated clusters in one explicit transaction, under enabled "
             "bitmaps: copied into new clusters, switched by the commit (all or nothing)", _guest_atomic,
             relaxed=True),
    Workload("guest-write-grows-reftable", "guest write that outgrows the refcount table (512 B clusters)",
             _grow_reftable, base=SMALL_REFTABLE, relaxed=True),
    Workload("guest-write-block-in-hole", "guest write that needs a new refcount block, placed in a freed "
             "cluster that an older block counts (512 B clusters)", _block_in_hole, base=BLOCK_IN_HOLE, relaxed=True),
    Workload("set-in-use-two-pages", "set in_use on every bitmap, directory of two pages (seed protocol)",
             _all_in_use, base=LONG_NAMES),
    Workload("add-split-header", "bitmap add where the extension's fields straddle two sectors",
             lambda img: img.bitmaps.add("added", 65536), base=SHIFTED),
    Workload("qemu-header-rewrite", "QEMU's whole-cluster header write, default layout (safe: one sector)",
             _qemu_header_rewrite, journaled=False, minimum=4),
    Workload("control-seed-wrong-order", "NEGATIVE CONTROL: directory written before autoclear is cleared",
             control_seed_wrong_order, base=LONG_NAMES, journaled=False, expect_failure=True, minimum=3),
    Workload("control-data-before-bits", "NEGATIVE CONTROL: guest data written in place before the bitmap bits",
             control_data_before_bits, journaled=False, expect_failure=True, relaxed=True),
    Workload("control-header-tear", "NEGATIVE CONTROL: QEMU's whole-cluster header write, fields split "
             "across sectors", _qemu_header_rewrite, base=SHIFTED, journaled=False, expect_failure=True, minimum=4),
)}


def _load_module(module: str) -> ModuleType:
    """``path/to/file.py`` (loaded from that file) or a module name (the current directory
    is importable, as for ``python -m``)."""
    if module.endswith(".py") or os.sep in module:
        path = os.path.abspath(module)
        if not os.path.isfile(path):
            raise ImportError(f"no file {path}")
        key = f"crashsim_user_{abs(hash(path)):x}"
        spec = importlib.util.spec_from_file_location(key, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path} as Python")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod          # pickled by reference when workers run its states
        spec.loader.exec_module(mod)
        return mod
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(module)


def find(name: str) -> Workload:
    """A built-in workload by name, or a user one as ``module:function``."""
    if name in WORKLOADS:
        return WORKLOADS[name]
    if ":" not in name:
        raise KeyError(f"no workload named {name!r}; built-in: {', '.join(WORKLOADS)}; "
                       "or give a user workload as module:function")
    module, _, attr = name.rpartition(":")
    try:
        fn = getattr(_load_module(module), attr)
    except (ImportError, AttributeError, OSError, SyntaxError) as e:
        raise KeyError(f"cannot load workload {name!r}: {e}") from None
    base = getattr(fn, "crashsim_base", "standard")
    if base not in BASES:
        raise KeyError(f"workload {name!r} asks for base {base!r}; known: {', '.join(BASES)}")
    return Workload(name, (fn.__doc__ or name).strip().splitlines()[0], fn, BASES[base],
                    bool(getattr(fn, "crashsim_journaled", True)), bool(getattr(fn, "crashsim_expect_failure", False)),
                    whole=bool(getattr(fn, "crashsim_whole", False)), relaxed=bool(getattr(fn, "crashsim_relaxed", False)),
                    qemu=tuple(getattr(fn, "crashsim_qemu", ())), expect=getattr(fn, "crashsim_expect", None))


# -- resize (appended: the workload of qjournal/resize.py) ---------------------------------
RESIZE_BASE = Base("resize-small-clusters", (
    qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", IMG, "1M"),
    qemu_img_cmd("bitmap", "--add", "-g", "512", IMG, "b0"),
    qemu_io_cmd("write -P 0x5a 0 64k", "write -P 0x33 900k 100k"),
))
BASES[RESIZE_BASE.name] = RESIZE_BASE


def _resize_grow(img: Image) -> None:
    img.resize(8 << 20)      # the L1 table grows from one cluster to four, the bitmap table from one to four


WORKLOADS["resize-grows-l1"] = Workload(
    "resize-grows-l1", "resize 1M -> 8M (512 B clusters): new L1 table and bitmap switched with the size",
    _resize_grow, base=RESIZE_BASE)


# -- internal snapshots (qjournal/ops/snapshot.py) -------------------------------------------
SNAPSHOT_BASE = Base("snapshot-shared", (
    qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", IMG, "8M"),
    qemu_io_cmd("write -P 0x11 0 256k", "write -c -P 0x22 1M 64k"),
    qemu_img_cmd("bitmap", "--add", IMG, "b0"),
    qemu_img_cmd("snapshot", "-c", "s0", IMG),
    qemu_io_cmd("write -P 0x33 0 64k", "write -P 0x44 2M 64k"),
))
BASES[SNAPSHOT_BASE.name] = SNAPSHOT_BASE


def _snapshot_create(img: Image) -> None:
    img.create_snapshot("s1")     # L1 copied, every cluster shared, COPIED cleared, table rewritten


def _snapshot_delete(img: Image) -> None:
    img.delete_snapshot("s0")     # what s0 alone held freed, COPIED set again where the refcount is 1


WORKLOADS["snapshot-create"] = Workload(
    "snapshot-create", "snapshot -c on an image with a snapshot, a bitmap and a compressed cluster",
    _snapshot_create, base=SNAPSHOT_BASE)
WORKLOADS["snapshot-delete"] = Workload(
    "snapshot-delete", "snapshot -d of a qemu-made snapshot whose clusters the active disk partly shares",
    _snapshot_delete, base=SNAPSHOT_BASE)
SNAPSHOT_APPLY_BASE = Base("snapshot-apply", (
    qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", IMG, "8M"),
    qemu_io_cmd("write -P 0x11 0 256k", "write -c -P 0x22 1M 64k"),
    qemu_img_cmd("snapshot", "-c", "s0", IMG),
    qemu_io_cmd("write -P 0x33 0 64k", "write -P 0x44 2M 64k"),
))
BASES[SNAPSHOT_APPLY_BASE.name] = SNAPSHOT_APPLY_BASE


def _snapshot_apply(img: Image) -> None:
    img.apply_snapshot("s0")      # a new active L1 switched in; the old one and what only it mapped freed


WORKLOADS["snapshot-apply"] = Workload(
    "snapshot-apply", "snapshot -a of a qemu-made snapshot after the disk diverged from it",
    _snapshot_apply, base=SNAPSHOT_APPLY_BASE)


# -- reach (issue 11): workloads that make planted bugs visible --------------------------------
# Some of them check their own result against what the workload itself declares (the data it
# wrote, the data it kept), so that a wrong "new" state computed by the code under test
# fails the run ("could not run") instead of passing as the new state.
class WorkloadCheckFailed(AssertionError):
    """The workload's own check of its result failed: the operation did not do what it declares."""


def expect_bytes(img: Image, offset: int, want: bytes, what: str) -> None:
    """Raise :class:`WorkloadCheckFailed` unless the guest disk holds ``want`` at ``offset``."""
    got = img.read(offset, len(want))
    if got != want:
        bad = next(i for i in range(len(want)) if got[i] != want[i])
        raise WorkloadCheckFailed(f"{what}: guest byte {offset + bad:#x} is {got[bad]:#04x}, the workload "
                                  f"wrote or kept {want[bad]:#04x}")


def expect_clean(img: Image, what: str) -> None:
    """Raise :class:`WorkloadCheckFailed` unless qjournal's check finds no corruption and no leak."""
    res = img.check()
    if res.corruptions or res.leaks:
        raise WorkloadCheckFailed(f"{what}: qjournal check finds {res.corruptions} corruption(s) and "
                                  f"{res.leaks} leaked cluster(s)")


# 512-byte clusters and 512-byte granularity (SECTOR): one bitmap data cluster covers
# 4096 bits, that is 2 MiB of guest disk, so a write across 2 MiB dirties two data clusters.
FINE_BITMAP = Base("fine-bitmap", (
    qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", IMG, "4M"),
    qemu_img_cmd("bitmap", "--add", "-g", "512", IMG, "fine"),
    qemu_io_cmd("write -P 0x11 0 4k", "write -P 0x22 3M 4k"),
))
COMPRESSED = Base("compressed", (
    qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "src.qcow2", "8M"),
    ("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 64k", "-c", "write -P 0x62 1M 64k", "src.qcow2"),
    qemu_img_cmd("convert", "-q", "-c", "-f", "qcow2", "-O", "qcow2", "-o", "cluster_size=4096",
                 "src.qcow2", IMG),
    qemu_img_cmd("bitmap", "--add", "-g", "4096", IMG, "b0"),
))
MANY_BITMAPS = Base("many-bitmaps", (
    qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", IMG, "16M"),
    *(qemu_img_cmd("bitmap", "--add", "-g", str(4096 << (i % 5)), IMG, f"bitmap-{i:02d}") for i in range(24)),
    qemu_io_cmd("write 0 64k", "write 8M 4k"),
))
for _b in (FINE_BITMAP, COMPRESSED, MANY_BITMAPS):
    BASES[_b.name] = _b


def _bits_cross(img: Image) -> None:
    img.write((2 << 20) - 1024, b"\x7e" * 2048)      # 2 bits in bitmap data cluster 0, 2 in cluster 1


def _shrink(img: Image) -> None:
    kept = img.read(0, 64 << 10)
    img.resize(1 << 19, shrink=True)                 # to 512k: drops 900k-1000k of data, the L2 tables past 512k
    expect_bytes(img, 0, kept, "resize shrink")
    expect_clean(img, "resize shrink")


def _grow_checked(img: Image) -> None:
    kept = img.read(0, 64 << 10) + img.read(900 << 10, 100 << 10)
    img.resize(8 << 20)
    expect_bytes(img, 0, kept[:64 << 10], "resize grow")
    expect_bytes(img, 900 << 10, kept[64 << 10:], "resize grow")
    expect_bytes(img, 1 << 20, bytes(64 << 10), "resize grow (the new area)")
    expect_clean(img, "resize grow")


def _shrink_shifted(img: Image) -> None:
    img.resize(32 << 20, shrink=True)    # size (sector 0) and the bitmaps extension (sectors 1-2) apart


def _grow_shifted(img: Image) -> None:
    img.resize(128 << 20)


def _over_compressed(img: Image) -> None:
    with img.transaction("unaligned writes over compressed clusters"):
        img.write(100, b"\xc1" * 50)                         # inside one compressed cluster
        img.write((1 << 20) + 4000, b"\xc2" * 200)           # across two compressed clusters
    expect_bytes(img, 0, b"\x61" * 100 + b"\xc1" * 50 + b"\x61" * 3946, "write over a compressed cluster")
    expect_bytes(img, 1 << 20, b"\x62" * 4000 + b"\xc2" * 200 + b"\x62" * 3992,
                 "write across two compressed clusters")
    expect_clean(img, "write over compressed clusters")


def _unaligned_new(img: Image) -> None:
    with img.transaction("unaligned writes into new clusters next to data"):
        img.write(60 << 10 | 4000, b"\xd1" * 200)           # allocated cluster, then a new one
        img.write((5 << 20) + 300, b"\xd2" * 5000)          # two new clusters, neither aligned
    expect_bytes(img, (60 << 10) + 4000, b"\xd1" * 200, "unaligned write")
    expect_bytes(img, (5 << 20) + 300, b"\xd2" * 5000, "unaligned write into new clusters")
    expect_bytes(img, 5 << 20, bytes(300), "unaligned write into new clusters (the head)")
    expect_clean(img, "unaligned writes")


def _bitmap_and_write(img: Image) -> None:
    with img.transaction("add a bitmap and write guest data"):
        img.bitmaps.add("together", 4096)
        img.write(6 << 20, b"\xe1" * 8192)


def _check_repair(img: Image) -> None:
    res = img.check(repair="leaks")
    if res.leaks:
        raise WorkloadCheckFailed(f"check -r leaks left {res.leaks} leaked cluster(s)")


def _leak_clusters(path: str) -> None:
    """Raise the refcount of two unused clusters past the end of the data (a leak, as a
    crash of QEMU between its refcount increase and its L2 update leaves)."""
    with qjournal.open(path, "r+") as img, img.transaction("leak two clusters") as tx:
        tx.alloc.alloc(2)


LEAKY = Base("leaky", (
    qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", IMG, "16M"),
    qemu_img_cmd("bitmap", "--add", IMG, "b0"),
    qemu_io_cmd("write 0 64k", "write 8M 4k"),
), post=_leak_clusters, post_description="raise the refcount of two clusters nothing references (two leaks)")
BASES[LEAKY.name] = LEAKY

def _unreference_bitmap_data(path: str) -> None:
    """Set the refcount of b0's bitmap data cluster to 0 (iotest 137's damage: metadata a
    refcount calls free), leaving two free clusters below it, so that the third of three
    single-cluster allocations lands on it unless the overlap map holds it."""
    with qjournal.open(path, "r") as img:
        b = img.bitmaps["b0"]
        (data,) = [int(x) for x in img.bitmap_table(b.entry) if x]
        h, cs = img.header, img.header.cluster_size
        per_block = refcount_fmt.entries_per_block(cs, h.refcount_order)
        cluster = data // cs
        reftable = img.medium.read(h.refcount_table_offset + 8 * (cluster // per_block), 8)
        block = int.from_bytes(reftable, "big") & ~(cs - 1)
        lo, n = refcount_fmt.entry_span(cluster % per_block, h.refcount_order)
        old = img.medium.read(block + lo, n)
    assert h.refcount_order >= 3 and int.from_bytes(old, "big") == 1, "the damage expects a whole-byte refcount of 1"
    with open(path, "r+b") as f:
        f.seek(block + lo)
        f.write(bytes(n))


DAMAGED = Base("bitmap-data-unreferenced", (
    qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", IMG, "16M"),
    qemu_img_cmd("bitmap", "--add", "-g", "4096", IMG, "b0"),
    qemu_io_cmd("write -P 0x11 0 64k"),
), post=_unreference_bitmap_data, post_description="set the refcount of b0's bitmap data cluster to 0")
BASES[DAMAGED.name] = DAMAGED
DAMAGED_WRITES = tuple(((1 << 20) + k * (64 << 10), bytes([0x70 + k]) * 4096) for k in range(3))


def _write_damaged(img: Image) -> None:
    with img.transaction("three single-cluster writes on a damaged image"):
        for off, data in DAMAGED_WRITES:
            img.write(off, data)


def _write_new_over_metadata(img: Image) -> None:
    """A buggy operation: it stages two clusters from one it allocated, and the second holds
    a structure in use. The overlap check must refuse the commit before anything is written."""
    cs = img.header.cluster_size
    try:
        with img.transaction("a new-cluster write running into a structure in use") as tx:
            used = set(img.overlap_map().clusters.tolist())
            off = tx.alloc.alloc(1)
            while off // cs + 1 not in used:
                if off // cs >= img.medium.size // cs:
                    raise WorkloadCheckFailed("no free cluster lies before a structure in use")
                off = tx.alloc.alloc(1)
            tx.write_new(off, b"\xee" * (2 * cs))
    except FormatError as e:
        if "would overwrite" in str(e):
            return
        raise
    raise WorkloadCheckFailed("a new-cluster write over a structure in use was not refused")


def writes_land(writes: tuple[Write, ...], bitmap: str) -> Callable[[Semantic, Semantic], str]:
    """The declared result of guest writes: their bytes on the guest disk, and ``bitmap``
    dirty wherever they wrote (a write over metadata breaks one or the other)."""
    def check(old: Semantic, new: Semantic) -> str:
        guest = dict(new.guest)
        bits = next((b[3] for b in new.bitmaps if b[0] == bitmap), ())
        for off, data in writes:
            for pos in range(off, off + len(data), SECTOR):
                cluster = next(((c, d) for c, d in guest.items() if c <= pos < c + len(d)), None)
                got = cluster[1][pos - cluster[0]:pos - cluster[0] + SECTOR] if cluster else bytes(SECTOR)
                if got != data[pos - off:pos - off + SECTOR]:
                    return f"the guest sector at {pos:#x} does not hold the bytes written there"
            if bits == "in-use" or not any(s <= off and off + len(data) <= s + n for s, n in bits):
                return f"bitmap {bitmap!r} is not dirty over the write at {off:#x}+{len(data):#x}"
        return ""
    return check


WORKLOADS.update({w.name: w for w in (
    Workload("guest-write-damaged", "three guest writes on an image whose bitmap data cluster has refcount 0 "
             "(the base's damage is allowed in every state, no more)", _write_damaged, base=DAMAGED,
             whole=True, relaxed=True, expect=writes_land(DAMAGED_WRITES, "b0")),
    Workload("new-cluster-over-metadata", "an operation that stages a write past the cluster it allocated, "
             "into a structure in use: refused, nothing written", _write_new_over_metadata, base=DAMAGED),
    Workload("guest-write-bits-cross", "guest write whose dirty range crosses a bitmap data cluster "
             "(512 B clusters and granularity)", _bits_cross, base=FINE_BITMAP, relaxed=True),
    Workload("resize-shrink", "resize 1M -> 512k with a bitmap, tail data and L2 tables dropped "
             "(checks the kept data)", _shrink, base=RESIZE_BASE),
    Workload("resize-grow-checked", "resize 1M -> 8M with a bitmap (checks the kept data and zeros)",
             _grow_checked, base=RESIZE_BASE),
    Workload("resize-shrink-split-header", "resize shrink where the size field and the bitmaps extension "
             "sit in different sectors", _shrink_shifted, base=SHIFTED),
    Workload("resize-grow-split-header", "resize grow where the size field and the bitmaps extension "
             "sit in different sectors", _grow_shifted, base=SHIFTED),
    Workload("guest-write-compressed", "unaligned guest writes over compressed clusters (checks the data)",
             _over_compressed, base=COMPRESSED, whole=True, relaxed=True),
    Workload("guest-write-unaligned", "unaligned guest writes into new clusters beside data (checks the data)",
             _unaligned_new, whole=True, relaxed=True),
    Workload("set-in-use-many", "set in_use on 24 bitmaps (the seed protocol)", _all_in_use, base=MANY_BITMAPS),
    Workload("bitmap-and-write", "bitmap add and a guest write in one transaction", _bitmap_and_write,
             whole=True, relaxed=True),
    Workload("check-repair", "check -r leaks on an image with two leaked clusters", _check_repair, base=LEAKY),
    Workload("merge-into-dirty", "bitmap merge into a bitmap that has bits of its own (4 KiB into 512 B "
             "granularity)", lambda img: img.bitmaps.merge("b2", "b1")),
)})



# -- commit and rebase (qjournal/ops/commit.py, qjournal/ops/rebase.py) ----------------------

_SCRATCH: list[str] = []


def _scratch() -> str:
    """A folder for the files a workload makes beside its image (an overlay, a backing
    file), kept until the process exits: the judge may open them after the workload."""
    if not _SCRATCH:
        _SCRATCH.append(tempfile.mkdtemp(prefix="crashsim-imageops-"))
        atexit.register(shutil.rmtree, _SCRATCH[0], True)
    return _SCRATCH[0]


def _commit_into(img: Image) -> None:
    # An overlay of the recorded image: data over clusters the image has (in place, under
    # enabled bitmaps), data into new clusters, and a zero cluster; committed with -d.
    # The overlay's own backing file stands in for the image (a real chain would name it):
    # with one, write_zeroes leaves a zero cluster, which the commit must write down.
    stand_in = os.path.join(_scratch(), "commit-stand-in.qcow2")
    qjournal.create(stand_in, img.header.size, cluster_size=4096).close()
    path = os.path.join(_scratch(), "commit-top.qcow2")
    with qjournal.create(path, img.header.size, cluster_size=4096, backing_file=stand_in,
                         backing_fmt="qcow2") as top:
        top.write(0, b"\xc1" * 8192)
        top.write(5 << 20, b"\xc2" * 12288)
        top.write_zeroes(10 << 20, 4096)
    with qjournal.open(path) as top:
        commit_op.commit(top, commit_op.Target(image=img), img.path, drop=True)


# Emptying an overlay changes no guest byte (its backing file holds the same data by then),
# so it sets no bitmap bits, as QEMU's qcow2_make_empty; crashsim sees the image alone, so
# its base has no enabled bitmap to miss them.
COMMIT_EMPTY_BASE = Base("commit-empty", (
    qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", IMG, "8M"),
    qemu_io_cmd("write -P 0x11 0 256k", "write -c -P 0x22 1M 64k", "write -z 3M 64k"),
    qemu_img_cmd("snapshot", "-c", "s0", IMG),
    qemu_io_cmd("write -P 0x33 0 64k", "write -P 0x44 2M 64k"),
))
BASES[COMMIT_EMPTY_BASE.name] = COMMIT_EMPTY_BASE


def _commit_empty(img: Image) -> None:
    commit_op.empty(img)     # L1 entries cleared, then what only they referenced freed


def _rebase_remove(img: Image) -> None:
    # rebase -u onto a backing file with data (a header switch only), then a safe rebase
    # onto nothing: the backing file's data is copied in and the name removed, in one
    # transaction.
    old = os.path.join(_scratch(), "rebase-old.qcow2")
    with qjournal.create(old, img.header.size, cluster_size=4096) as b:
        b.write(0, b"\xb1" * 4096)           # under the image's own data: not copied
        b.write(40 << 20, b"\xb2" * 8192)    # where the image has none: copied
    rebase_op.rebase(img, old, "qcow2", unsafe=True)
    rebase_op.rebase(img, "", None)


WORKLOADS["commit"] = Workload(
    "commit", "commit -d of an overlay into this image: in place under enabled bitmaps, new clusters, zeroes",
    _commit_into, whole=True, relaxed=True)
WORKLOADS["commit-empty"] = Workload(
    "commit-empty", "commit's emptying of the overlay: L1 cleared, L2 tables and data freed (a snapshot "
    "shares some)", _commit_empty, base=COMMIT_EMPTY_BASE)
WORKLOADS["rebase"] = Workload(
    "rebase", "rebase -u onto a backing file, then a safe rebase onto none (its data copied in)",
    _rebase_remove, relaxed=True)


# -- amend (qjournal/ops/amend.py) ---------------------------------------------------------
def _amend_lazy(img: Image) -> None:
    amend_op.amend(img, "lazy_refcounts=on")     # one header field: the header switch


WORKLOADS["amend-lazy-refcounts"] = Workload(
    "amend-lazy-refcounts", "amend -o lazy_refcounts=on: the compatible feature bit in one header write",
    _amend_lazy)


def _amend_refcount_bits(img: Image) -> None:
    # A new refcount structure of each width in free clusters, counting the old one, its
    # own clusters, the snapshot's shared clusters (2) and the bitmap; the header switches
    # to it in one write, then the old table and blocks are freed. 16 -> 64 -> 8 bits.
    amend_op.amend(img, "refcount_bits=64")
    amend_op.amend(img, "refcount_bits=8")      # the compressed data shares a cluster 32 times


AMEND_V2_BASE = Base("amend-v2", (
    qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", IMG, "8M"),
    qemu_io_cmd("write -P 0x11 0 256k", "write -c -P 0x22 1M 64k"),
    qemu_img_cmd("snapshot", "-c", "s0", IMG),
    qemu_io_cmd("write -P 0x33 0 64k"),
))
BASES[AMEND_V2_BASE.name] = AMEND_V2_BASE


def _amend_compat(img: Image) -> None:
    # v2 -> v3: the header grows to the v3 fields, the extensions move after them (one
    # header write); zero clusters over data and over nothing; then v3 -> v2 again, the
    # zero clusters expanded (new zeroed clusters, entries changed) in the same transaction.
    amend_op.amend(img, "compat=1.1")
    img.write_zeroes(0, 8192)
    img.write_zeroes(4 << 20, 8192)
    amend_op.amend(img, "compat=0.10")


AMEND_ZERO_BASE = Base("amend-zero-clusters", (
    qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", IMG, "8M"),
    qemu_io_cmd("write -P 0x11 0 256k", "write -z 64k 16k", "write -z 1M 64k"),
    qemu_img_cmd("snapshot", "-c", "s0", IMG),
))
BASES[AMEND_ZERO_BASE.name] = AMEND_ZERO_BASE


def _amend_compat_zero(img: Image) -> None:
    # v3 -> v2 over zero clusters with clusters of their own (qemu-io's write -z over data)
    # and without, in an L2 table the snapshot shares: new zeroed clusters counted twice,
    # the entries changed, the old clusters freed, and the header switched, in one transaction.
    amend_op.amend(img, "compat=0.10")


WORKLOADS["amend-refcount-bits"] = Workload(
    "amend-refcount-bits", "amend -o refcount_bits=64, then 8: a new refcount structure switched in by one "
    "header write, the old one freed (a snapshot and a bitmap)", _amend_refcount_bits, base=SNAPSHOT_BASE)
WORKLOADS["amend-compat"] = Workload(
    "amend-compat", "amend -o compat=1.1 on a v2 image with a snapshot and a compressed cluster, zero "
    "clusters, then compat=0.10 (zero clusters expanded): the header's version switched in one write each", _amend_compat, base=AMEND_V2_BASE)
WORKLOADS["amend-compat-zero"] = Workload(
    "amend-compat-zero", "amend -o compat=0.10 with zero clusters (allocated and not) in an L2 table a "
    "snapshot shares: expanded and switched to v2 in one transaction", _amend_compat_zero, base=AMEND_ZERO_BASE)


# -- the independent "new" (issue 11 point 5) ---------------------------------------------------
# The state each operation must reach, computed by QEMU doing the same operation on the same
# base (qemu-img bitmap, qemu-io write: QEMU's own dirty tracking sets the bits), or declared.
MiB = 1 << 20


def _io(*commands: str) -> tuple[tuple[str, ...], ...]:
    return (qemu_io_cmd(*commands),)


def _bitmap(*args: str) -> tuple[str, ...]:
    return qemu_img_cmd("bitmap", *args)


def in_use_set(*names: str) -> Callable[[Semantic, Semantic], str]:
    """The seed protocol's declared result: ``names`` (every bitmap when none) gain in_use,
    nothing else changes."""
    def check(old: Semantic, new: Semantic) -> str:
        want = set(names) or {b[0] for b in old.bitmaps}
        for (name, gran, _, _), (n2, g2, flags, _) in zip(old.bitmaps, new.bitmaps):
            if (name, gran) != (n2, g2):
                return f"bitmap {name!r} became {n2!r} with granularity {g2}"
            if name in want and not flags & FLAG_IN_USE:
                return f"bitmap {name!r} should be in_use, its flags are {','.join(flag_names(flags)) or 'none'}"
        if len(old.bitmaps) != len(new.bitmaps) or old.guest != new.guest or old.virtual_size != new.virtual_size:
            return "the seed protocol changed more than the in_use flags"
        return ""
    return check


def in_use_cleared(name: str) -> Callable[[Semantic, Semantic], str]:
    def check(old: Semantic, new: Semantic) -> str:
        b = next((b for b in new.bitmaps if b[0] == name), None)
        if b is None or b[2] & FLAG_IN_USE:
            return f"bitmap {name!r} should have lost in_use"
        return ""
    return check


_SAME_BY_QEMU: dict[str, tuple[tuple[str, ...], ...]] = {
    "add": (_bitmap("--add", "-g", "4096", IMG, "added"),),
    "add-disabled": (_bitmap("--add", "--disable", "-g", "1M", IMG, "added"),),
    "remove": (_bitmap("--remove", IMG, "fresh"),),
    "remove-all": tuple(_bitmap("--remove", IMG, n) for n in ("stale", "b0", "b1", "b2", "fresh")),
    "clear": (_bitmap("--clear", IMG, "b1"),),
    "enable": (_bitmap("--enable", IMG, "b1"),),
    "disable": (_bitmap("--disable", IMG, "fresh"),),
    "merge": (_bitmap("--merge", "b1", IMG, "fresh"),),
    "merge-same-granularity": (_bitmap("--merge", "b0", IMG, "fresh"),),
    "merge-into-dirty": (_bitmap("--merge", "b1", IMG, "b2"),),
    "transaction": (_bitmap("--remove", IMG, "fresh"), _bitmap("--add", "-g", "65536", IMG, "new"),
                    _bitmap("--merge", "b1", IMG, "new")),
    "two-transactions": (_bitmap("--add", "-g", "4096", IMG, "first"), _bitmap("--disable", IMG, "first")),
    "add-split-header": (_bitmap("--add", "-g", "65536", IMG, "added"),),
    "guest-overwrite": _io("write -P 0x5a 0 64k"),
    "guest-write-mixed": _io(f"write -P 0xa5 {10 * MiB + (48 << 10)} 32k"),
    "guest-zero": _io("write -z 8k 120k"),
    "guest-write-grows-reftable": _io("write -P 0x5a 2M 64k"),
    "guest-write-block-in-hole": _io("write -P 0x5a 112k 12k"),
    "guest-write-bits-cross": _io(f"write -P 0x7e {2 * MiB - 1024} 2048"),
    "guest-batch": _io("write -P 0x11 4k 8k", "write -P 0x22 5M 12k", f"write -P 0x33 {5 * MiB + 100} 100",
                       "write -z 10M 16k", "write -P 0x44 20M 100", "write -z 20M 4k",
                       f"write -P 0x55 {20 * MiB + 50} 10"),
    "guest-atomic": _io("write -P 0x5a 0 64k", f"write -P 0xa5 {10 * MiB + 100} 5000",
                        f"write -P 0x3c {20 * MiB + 4096} 10"),
}
_SAME_BY_QEMU.update({
    "guest-extended-l2": _io(f"write -P 0x44 {MiB + 5000} 3000", "write -P 0x55 3000 6000", "write -z 32k 8k",
                             f"write -P 0x66 {(34 << 10) + 10} 10"),
    "bitmap-and-write": (_bitmap("--add", "-g", "4096", IMG, "together"), *_io("write -P 0xe1 6M 8k")),
    "check-repair": (qemu_img_cmd("check", "-q", "-r", "leaks", IMG),),
    "resize-grows-l1": (qemu_img_cmd("resize", "-q", IMG, "8M"),),
    "resize-grow-checked": (qemu_img_cmd("resize", "-q", IMG, "8M"),),
    "resize-shrink": (qemu_img_cmd("resize", "-q", "--shrink", IMG, "512k"),),
    "resize-shrink-split-header": (qemu_img_cmd("resize", "-q", "--shrink", IMG, "32M"),),
    "resize-grow-split-header": (qemu_img_cmd("resize", "-q", IMG, "128M"),),
    "snapshot-create": (qemu_img_cmd("snapshot", "-c", "s1", IMG),),
    "snapshot-delete": (qemu_img_cmd("snapshot", "-d", "s0", IMG),),
    "snapshot-apply": (qemu_img_cmd("snapshot", "-a", "s0", IMG),),
    "amend-lazy-refcounts": (qemu_img_cmd("amend", "-o", "lazy_refcounts=on", IMG),),
    "amend-refcount-bits": (qemu_img_cmd("amend", "-o", "refcount_bits=64", IMG),
                            qemu_img_cmd("amend", "-o", "refcount_bits=8", IMG)),
    "amend-compat": (qemu_img_cmd("amend", "-o", "compat=1.1", IMG), *_io("write -z 0 8k", "write -z 4M 8k"),
                     qemu_img_cmd("amend", "-o", "compat=0.10", IMG)),
    "amend-compat-zero": (qemu_img_cmd("amend", "-o", "compat=0.10", IMG),),
    "commit": (qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", IMG, "-F", "qcow2",
                            "top.qcow2"),
               ("qemu-io", "-f", "qcow2", "-c", "write -P 0xc1 0 8k", "-c", "write -P 0xc2 5M 12k",
                "-c", "write -z 10M 4k", "top.qcow2"),
               qemu_img_cmd("commit", "-q", "-d", "top.qcow2")),
    "rebase": (qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "old.qcow2", "64M"),
               ("qemu-io", "-f", "qcow2", "-c", "write -P 0xb1 0 4k", "-c", "write -P 0xb2 40M 8k", "old.qcow2"),
               qemu_img_cmd("rebase", "-u", "-b", "old.qcow2", "-F", "qcow2", IMG),
               qemu_img_cmd("rebase", "-b", "", IMG)),
})


def all_dirty(name: str) -> Callable[[Semantic, Semantic], str]:
    """Repair's declared result: ``name`` loses in_use and every bit is set."""
    def check(old: Semantic, new: Semantic) -> str:
        b = next((b for b in new.bitmaps if b[0] == name), None)
        if b is None or b[2] & FLAG_IN_USE or b[3] != ((0, new.virtual_size),):
            return f"bitmap {name!r} should be consistent with every bit set, not {b}"
        return ""
    return check


_DECLARED: dict[str, Callable[[Semantic, Semantic], str]] = {
    "guest-write": writes_land(((5 << 20, bytes(range(256)) * 48),), "b0"),
    "repair": all_dirty("stale"),
    "commit-empty": lambda old, new: "" if not new.guest and new.snapshots == old.snapshots else
    "emptying left guest data, or changed the snapshots",
    "set-in-use": in_use_set("fresh"),
    "set-in-use-two-pages": in_use_set(),
    "set-in-use-many": in_use_set(),
    "clear-in-use": in_use_cleared("stale"),
}
for _name, _cmds in _SAME_BY_QEMU.items():
    WORKLOADS[_name] = attrs.evolve(WORKLOADS[_name], qemu=_cmds)
for _name, _check in _DECLARED.items():
    WORKLOADS[_name] = attrs.evolve(WORKLOADS[_name], expect=_check)

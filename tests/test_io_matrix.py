"""Guest I/O by qjournal and by QEMU, mixed on one image, over qemu-img create's options.

Oracle: real QEMU 7.2 on images that ``qemu-img create -f qcow2`` makes.
- ``qemu-img check`` is clean after every operation, whoever made it;
- ``qemu-img compare`` finds the image equal to a raw reference file kept in step by the
  test (the backing file's content, then every write, zero and discard);
- ``qemu-io -c "read -P"`` reads back what qjournal wrote, and qjournal's ``Image.read``
  reads back what qemu-io wrote (the parts no later operation overwrote);
- ``qjournal map --output=json`` equals ``qemu-img map --output=json``, entry for entry.

The options are compat, cluster_size, refcount_bits, lazy_refcounts, extended_l2,
compression_type, a backing file (none, qcow2, or raw and shorter than the disk) and a
data file (none, data_file_raw=off, data_file_raw=on). The full product is 516 valid
images; by default a seeded greedy covering runs instead, in which every pair of values
of every two options appears (``QJ_MATRIX=full`` runs the product). Its first part
covers every pair among images with neither extended L2 nor a data file, so that the
common images are covered pairwise among themselves, not only through the others.

Each image gets a seeded sequence of operations: library writes, zeroes and discards,
``qjournal write`` command lines, qemu-io pattern, zero and compressed writes; at
unaligned offsets and lengths, near cluster boundaries, the L2 table boundary, the end
of the backing file and the end of the disk. Everything runs in the test's folder, so
relative backing and data file names resolve alike for QEMU and for qjournal.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import random
from pathlib import Path
from typing import Any

import attrs
import pytest

import qemu
import qjournal
from qjournal.cli import main

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
IMG, REF = "img.qcow2", "ref.raw"
SEED = "qjournal io matrix"

# -- the options -------------------------------------------------------------------------
AXES: dict[str, tuple[Any, ...]] = {
    "compat": ("0.10", "1.1"),
    "cluster_size": (512, 4 * KiB, 64 * KiB, 2 * MiB),
    "refcount_bits": (1, 16, 64),
    "lazy_refcounts": (False, True),
    "extended_l2": (False, True),
    "compression_type": ("zlib", "zstd"),
    "backing": ("none", "qcow2", "raw"),
    "data_file": ("none", "raw-off", "raw-on"),
}


@attrs.frozen
class Combo:
    compat: str
    cluster_size: int
    refcount_bits: int
    lazy_refcounts: bool
    extended_l2: bool
    compression_type: str
    backing: str
    data_file: str

    def valid(self) -> bool:
        """qemu-img create's rules (test_create checks that qemu-img refuses the rest)."""
        if self.compat == "0.10" and (self.refcount_bits != 16 or self.lazy_refcounts or self.extended_l2
                                      or self.compression_type != "zlib" or self.data_file != "none"):
            return False
        if self.extended_l2 and self.cluster_size < 16 * KiB:
            return False
        return not (self.data_file == "raw-on" and self.backing != "none")

    def options(self) -> str:
        on = {False: "off", True: "on"}
        opts = [f"compat={self.compat}", f"cluster_size={self.cluster_size}", f"refcount_bits={self.refcount_bits}",
                f"lazy_refcounts={on[self.lazy_refcounts]}", f"extended_l2={on[self.extended_l2]}",
                f"compression_type={self.compression_type}"]
        if self.backing != "none":
            opts += [f"backing_file=base.{self.backing}", f"backing_fmt={self.backing}"]
        if self.data_file != "none":
            opts += ["data_file=data.raw", f"data_file_raw={on[self.data_file == 'raw-on']}"]
        return ",".join(opts)

    def id(self) -> str:
        cs = self.cluster_size
        size = f"{cs // MiB}M" if cs >= MiB else f"{cs // KiB}k" if cs >= KiB else f"{cs}"
        return "-".join([f"v{2 if self.compat == '0.10' else 3}", size, f"rc{self.refcount_bits}",
                         "lazy" if self.lazy_refcounts else "eager", "xl2" if self.extended_l2 else "l2",
                         self.compression_type, f"back_{self.backing}", f"data_{self.data_file}"])


def _pairs(c: Combo) -> set[tuple[tuple[str, Any], tuple[str, Any]]]:
    values = list(attrs.asdict(c).items())
    return set(itertools.combinations(values, 2))


def every_combo() -> list[Combo]:
    return [c for c in itertools.starmap(Combo, itertools.product(*AXES.values())) if c.valid()]


def covering(seed: str = SEED) -> list[Combo]:
    """A deterministic greedy pairwise covering of :func:`every_combo`: each step takes the
    image that covers the most pairs not yet covered (first in a seeded shuffle on ties).
    Images with neither extended L2 nor a data file come first and cover every pair among
    themselves; the rest then cover the pairs those cannot."""
    rng = random.Random(seed)
    everything = every_combo()
    plain = [c for c in everything if not c.extended_l2 and c.data_file == "none"]
    chosen: list[Combo] = []
    covered: set[Any] = set()
    for pool in (plain, everything):
        pool = pool[:]
        rng.shuffle(pool)
        todo = set().union(*map(_pairs, pool)) - covered
        while todo:
            best = max(pool, key=lambda c: len(_pairs(c) & todo))
            chosen.append(best)
            covered |= _pairs(best)
            todo -= covered
    return chosen


COMBOS = every_combo() if os.environ.get("QJ_MATRIX") == "full" else covering()


# -- geometry ------------------------------------------------------------------------------
@attrs.frozen
class Geometry:
    cluster: int
    l2_span: int      # guest bytes one L2 table maps
    disk: int
    base: int         # size of the backing file (0: none); shorter than the disk


def geometry(c: Combo) -> Geometry:
    cs = c.cluster_size
    span = cs * cs // (16 if c.extended_l2 else 8)
    # past the first L2 table, except where data_file_raw (every cluster mapped, so
    # qemu-img compare reads the whole disk) would make that hundreds of MiB
    disk = max(span + 4 * cs, 4 * MiB) if c.data_file != "raw-on" or span <= 256 * MiB else 64 * MiB
    disk += 1536  # the last cluster is partial
    base = {"none": 0, "qcow2": disk - 2 * cs - 2048, "raw": disk - 2 * cs - 1001}[c.backing]
    return Geometry(cs, span, disk, base)


def hot_spots(g: Geometry) -> list[int]:
    spots = [0, g.cluster, g.disk]
    if g.l2_span < g.disk:
        spots.append(g.l2_span)
    if g.base:
        spots.append(g.base)
    return spots


# -- operations -----------------------------------------------------------------------------
@attrs.frozen
class Op:
    kind: str        # qj-write, qj-cli, qj-zero, qj-discard, qio-write, qio-zero, qio-compressed, base
    offset: int
    length: int
    pattern: int     # every byte of the range afterwards (0 for zero and discard)

    @property
    def by_qjournal(self) -> bool:
        return self.kind.startswith("qj-")


KINDS = ("qj-write", "qj-cli", "qj-zero", "qj-discard", "qio-write", "qio-zero")


def base_writes(g: Geometry) -> list[Op]:
    """What the backing file holds: its start, the L2 boundary, its last bytes."""
    if not g.base:
        return []
    cs = g.cluster
    ops = [Op("base", 0, 3 * cs + 100, 0xB1), Op("base", g.base - cs - 7, cs + 7, 0xB3)]
    if g.l2_span < g.base - 2 * cs:
        ops.append(Op("base", g.l2_span - cs - 10, 2 * cs + 20, 0xB2))
    return ops


def operations(c: Combo, g: Geometry, count: int = 12) -> list[Op]:
    """A seeded sequence: a compressed cluster first (qemu-io refuses compression with a
    data file), then a qjournal write into it (copy-on-write from a compressed cluster;
    it is also the first qjournal operation, which raises on images qjournal cannot write
    yet), then every other kind at least once, in a seeded order."""
    rng = random.Random(f"{SEED} {c.id()}")
    cs = g.cluster
    patterns = iter(range(0x21, 0x100, 7))
    ops: list[Op] = []
    if c.data_file == "none":
        ops.append(Op("qio-compressed", cs, cs, next(patterns)))
    ops.append(Op("qj-write", cs + rng.randrange(1, cs), rng.choice([3, cs, 2 * cs + 5]), next(patterns)))
    # the command line crosses the L2 boundary (or a cluster boundary if the disk has one table)
    edge = g.l2_span if g.l2_span < g.disk else 3 * cs
    ops.append(Op("qj-cli", edge - cs // 2 - 3, cs + 11, next(patterns)))
    kinds = list(KINDS[2:]) + [rng.choice(KINDS) for _ in range(count - len(ops) - len(KINDS[2:]))]
    rng.shuffle(kinds)
    spots = hot_spots(g)
    for kind in kinds:
        off = min(max(rng.choice(spots) + rng.randint(-2 * cs - 7, 2 * cs + 7), 0), g.disk - 1)
        if kind in ("qj-zero", "qj-discard", "qio-zero"):
            n = rng.randint(2 * cs, 4 * cs + 1000)  # whole clusters inside, partial ones at the ends
        else:
            n = rng.choice([1, 7, 511, cs - 3, cs, cs + 1, 2 * cs + 513, rng.randint(1, 4 * cs)])
        n = min(n, g.disk - off, 8 * MiB)
        ops.append(Op(kind, off, n, 0 if "zero" in kind or "discard" in kind else next(patterns)))
    return ops


def survivors(ops: list[Op]) -> list[Op]:
    """The pieces of each operation's range that no later operation overwrote."""
    out: list[Op] = []
    later: list[tuple[int, int]] = []
    for op in reversed(ops):
        pieces = [(op.offset, op.offset + op.length)]
        for a, b in later:
            pieces = [p for s, e in pieces for p in ((s, min(e, a)), (max(s, b), e)) if p[0] < p[1]]
        out += [attrs.evolve(op, offset=s, length=e - s) for s, e in pieces]
        later.append((op.offset, op.offset + op.length))
    return out


def apply(op: Op, ref: Path) -> None:
    """Make ``op`` on the image (qjournal in-process, QEMU as a subprocess) and the reference."""
    data = bytes([op.pattern]) * op.length
    if op.kind == "qj-cli":
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["write", IMG, str(op.offset), "-P", hex(op.pattern), str(op.length)]) == 0
    elif op.by_qjournal:
        with qjournal.open(IMG, "r+") as img:
            if op.kind == "qj-write":
                img.write(op.offset, data)
            elif op.kind == "qj-zero":
                img.write_zeroes(op.offset, op.length)
            else:
                img.discard(op.offset, op.length)
    else:
        flag = {"qio-write": "", "qio-zero": "-z ", "qio-compressed": "-c "}[op.kind]
        pattern = "" if op.kind == "qio-zero" else f"-P {op.pattern:#x} "
        qemu.qemu_io(IMG, f"write {flag}{pattern}{op.offset} {op.length}")
    with open(ref, "r+b") as f:
        os.pwrite(f.fileno(), data, op.offset)


def make_images(c: Combo, g: Geometry) -> list[Op]:
    """The backing file, the image and the reference; returns what the backing file holds."""
    base = base_writes(g)
    with open(REF, "wb") as f:
        f.truncate(g.disk)
        for op in base:
            os.pwrite(f.fileno(), bytes([op.pattern]) * op.length, op.offset)
    if c.backing == "qcow2":
        qemu.create("base.qcow2", str(g.base))
        qemu.qemu_io("base.qcow2", *(f"write -P {op.pattern:#x} {op.offset} {op.length}" for op in base))
    elif c.backing == "raw":
        with open("base.raw", "wb") as f:
            f.truncate(g.base)
            for op in base:
                os.pwrite(f.fileno(), bytes([op.pattern]) * op.length, op.offset)
    qemu.create(IMG, str(g.disk), c.options())
    return base


def qjournal_check() -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["check", "--output=json", IMG]) == 0
    result: dict[str, Any] = json.loads(out.getvalue())
    return result


def qjournal_map() -> list[dict[str, Any]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["map", "--output=json", IMG]) == 0
    return json.loads(out.getvalue())


@pytest.mark.parametrize("combo", [pytest.param(c, id=c.id()) for c in COMBOS])
def test_qjournal_and_qemu_io_agree(combo: Combo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    g = geometry(combo)
    base = make_images(combo, g)
    qemu.assert_clean(IMG)
    ops = operations(combo, g)
    for op in ops:
        apply(op, Path(REF))
        qemu.assert_clean(IMG)

    res = qemu.qemu_img("compare", "-f", "qcow2", "-F", "raw", IMG, REF, check=False)
    assert res.returncode == 0, res.stdout + res.stderr

    left = survivors(base + ops)
    qemu.qemu_io(IMG, *(f"read -P {p.pattern:#x} {p.offset} {p.length}" for p in left if p.by_qjournal))
    with open(REF, "rb") as ref, qjournal.open(IMG) as img:
        for p in left:
            if not p.by_qjournal:
                assert img.read(p.offset, p.length) == bytes([p.pattern]) * p.length, p
        for op in base + ops:  # and the neighbourhood of each range, against the reference
            start, end = max(op.offset - g.cluster, 0), min(op.offset + op.length + g.cluster, g.disk)
            assert img.read(start, end - start) == os.pread(ref.fileno(), end - start, start), op

    theirs = json.loads(qemu.qemu_img("map", "--output=json", IMG).stdout)
    assert qjournal_map() == theirs

    # qjournal check counts as qemu-img check does, and its repair finds nothing to change.
    counted = {k: v for k, v in qjournal_check().items() if k != "filename"}
    assert counted == {k: v for k, v in qemu.check(IMG)[1].items() if k != "filename"}
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["check", "-r", "all", IMG]) == 0
    res = qemu.qemu_img("compare", "-f", "qcow2", "-F", "raw", IMG, REF, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_covering_covers_every_pair() -> None:
    everything, chosen = every_combo(), covering()
    assert len(everything) == 516
    assert set().union(*map(_pairs, chosen)) == set().union(*map(_pairs, everything))
    plain = [c for c in chosen if not c.extended_l2 and c.data_file == "none"]
    assert set().union(*map(_pairs, plain)) == set().union(
        *(_pairs(c) for c in everything if not c.extended_l2 and c.data_file == "none"))
    assert covering() == chosen  # deterministic

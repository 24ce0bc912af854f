"""Mutation fuzz over qemu-made images of every create option.

The corpus (``build_corpus``) is made by ``qemu-img create`` and ``qemu-io``: v2 and v3,
cluster sizes 512 B .. 2 MiB, refcount widths 1 .. 64, lazy refcounts, extended L2,
zlib and zstd compressed clusters, a qcow2 backing file, an external data file,
internal snapshots and persistent bitmaps. ``targets`` finds every structure in an
image with nothing but ``struct`` (independent of the code under test): header fields,
header extensions, L1 and L2 entries, the refcount table and blocks, the bitmap
directory and tables, the snapshot table and the snapshots' L1 tables.

Case ``i`` of seed ``s`` depends on ``(s, i)`` alone. It damages a copy of one image
(1 to 3 mutations: a structure field set to an interesting value or bit-flipped,
random bytes in a metadata cluster, or the file cut short), then runs, in-process
through ``qjournal.cli.main``, the read-only commands (info, check, map, three reads,
bitmap --dump) and one writable operation (write, bitmap --add or check -r all).
Each case must hold:

1. no exception escapes ``main`` (a traceback), every exit code is in 0..3 and an
   error is one line on stderr;
2. the case ends within ``CASE_SECONDS`` (a hang raises through SIGALRM);
3. the read-only commands leave the image byte-identical, and so does a refused
   (exit 1) writable operation;
4. on sampled cases (every ``MEMORY_EVERY``-th), tracemalloc's peak over the whole case
   stays under twice the image's metadata (its metadata clusters, counted from the
   unmutated image), plus two clusters (a guest write builds one data cluster for
   copy-on-write) and ``MEMORY_SLACK`` for the interpreter's own objects;
5. no signal: ``python -m tests.fuzz`` runs the cases in a worker process and reports
   a worker killed by a signal with the case it was running, then goes on after it.

    python -m tests.fuzz --cases 100000            # from the repository root
    python -m tests.fuzz --cases 500 --seed 7 --start 1200
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy

from qjournal.cli import main

CASE_SECONDS = 20
MEMORY_EVERY = 10
MEMORY_SLACK = 4 << 20
SEED = 20261204
INTERESTING = [0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x1FF, 0x200, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
               0xFFFFFFFF, 1 << 32, 1 << 40, 1 << 55, (1 << 56) - 512, 1 << 62, 1 << 63, (1 << 64) - 1]
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00


class Target(NamedTuple):
    what: str
    offset: int
    width: int


class Base(NamedTuple):
    """One qemu-made image, its structures and the files beside it that a case may change."""
    name: str
    raw: bytes
    cluster_size: int
    targets: list[Target]
    hot: list[int]  # offsets of metadata clusters
    metadata: int  # bytes of metadata (clusters that hold structures)
    bitmap: str  # a bitmap --dump asks for
    size: int  # guest size
    extra: dict[str, bytes]  # files beside it, restored before each case


def _qemu(d: Path, *args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, cwd=d)


# name, qemu-img create options, guest size, qemu-io commands, bitmaps, snapshots
SPECS: list[tuple[str, list[str], str, list[str], list[str], list[str]]] = [
    ("v2-512", ["compat=0.10", "cluster_size=512"], "4M", ["write -P 1 0 8k", "write -P 2 3M 4k"], [], ["s1"]),
    ("r1-512", ["cluster_size=512", "refcount_bits=1"], "4M", ["write -P 3 0 6k"], ["b0"], []),
    ("r2-1k-lazy", ["cluster_size=1024", "refcount_bits=2", "lazy_refcounts=on"], "4M",
     ["write -P 4 1k 4k", "write -z 1M 8k"], ["b0"], ["s1"]),
    ("r4-2k", ["cluster_size=2048", "refcount_bits=4"], "8M", ["write -P 5 0 16k"], ["b0", "b1"], ["s1", "s2"]),
    ("r8-4k", ["cluster_size=4096", "refcount_bits=8"], "16M",
     ["write -P 6 0 64k", "write -P 7 15M 4k"], ["b0", "b1"], ["s1"]),
    ("r32-8k-zstd", ["cluster_size=8192", "refcount_bits=32", "compression_type=zstd"], "8M",
     ["write -c -P 8 0 64k", "write -P 9 1M 8k"], ["b0"], []),
    ("r64-16k-l2x", ["cluster_size=16384", "refcount_bits=64", "extended_l2=on"], "8M",
     ["write -P 10 2k 3k", "write -P 11 1M 32k", "write -z 4M 2k"], ["b0"], ["s1"]),
    ("64k-zlib", ["cluster_size=65536", "compression_type=zlib"], "8M",
     ["write -c -P 12 0 128k", "write -P 13 2M 64k"], ["b0"], ["s1"]),
    ("256k-l2x-zstd", ["cluster_size=262144", "extended_l2=on", "compression_type=zstd"], "8M",
     ["write -P 14 0 40k", "write -c -P 15 1M 256k"], ["b0"], []),
    ("1m-r16", ["cluster_size=1048576", "refcount_bits=16"], "16M", ["write -P 16 0 64k"], ["b0"], ["s1"]),
    ("2m", ["cluster_size=2097152"], "8M", ["write -P 17 0 4k"], ["b0"], []),
    ("backing", ["cluster_size=4096", "backing_file=base.qcow2", "backing_fmt=qcow2"], "8M",
     ["write -P 18 1M 16k"], ["b0"], []),
    ("datafile", ["cluster_size=4096", "data_file=data.raw"], "8M", ["write -P 19 0 16k"], ["b0"], []),
    ("datafile-raw", ["cluster_size=65536", "data_file=raw.raw", "data_file_raw=on"], "8M",
     ["write -P 20 64k 64k"], [], []),
]


def targets(raw: bytes) -> tuple[list[Target], set[int], int]:
    """Every structure field of a qcow2 image, the metadata clusters and the cluster size."""
    t: list[Target] = []
    fields = [("magic", 0, 4), ("version", 4, 4), ("backing_file_offset", 8, 8), ("backing_file_size", 16, 4),
              ("cluster_bits", 20, 4), ("size", 24, 8), ("crypt_method", 32, 4), ("l1_size", 36, 4),
              ("l1_table_offset", 40, 8), ("refcount_table_offset", 48, 8), ("refcount_table_clusters", 56, 4),
              ("nb_snapshots", 60, 4), ("snapshots_offset", 64, 8)]
    version, = struct.unpack_from(">I", raw, 4)
    if version >= 3:
        fields += [("incompatible_features", 72, 8), ("compatible_features", 80, 8),
                   ("autoclear_features", 88, 8), ("refcount_order", 96, 4), ("header_length", 100, 4),
                   ("compression_type", 104, 1)]
    t += [Target(f"header.{n}", o, w) for n, o, w in fields]
    (bf_off, bf_size, cluster_bits, _, _, l1_size, l1_off, rt_off, rt_clusters, nb_snap,
     snap_off) = struct.unpack_from(">QIIQIIQQIIQ", raw, 8)
    cs = 1 << cluster_bits
    refcount_order = struct.unpack_from(">I", raw, 96)[0] if version >= 3 else 4
    header_length = struct.unpack_from(">I", raw, 100)[0] if version >= 3 else 72
    incompatible = struct.unpack_from(">Q", raw, 72)[0] if version >= 3 else 0
    extended = bool(incompatible & 16)
    hot = {0}

    def table(what: str, off: int, count: int, width: int = 8, step: int = 8, keep_zero: int = 4) -> list[int]:
        vals = []
        for i in range(count):
            pos = off + i * step
            if pos + width > len(raw):
                break
            v = int.from_bytes(raw[pos:pos + width], "big")
            vals.append(v)
            if v or i < keep_zero:
                t.append(Target(f"{what}[{i}]", pos, width))
        for c in range(off - off % cs, off + count * step, cs):
            hot.add(c)
        return vals

    if bf_off and bf_size:
        t.append(Target("backing_file_name", bf_off, min(bf_size, 8)))
    off = header_length
    while off + 8 <= cs:
        etype, length = struct.unpack_from(">II", raw, off)
        t += [Target(f"ext@{off:#x}.type", off, 4), Target(f"ext@{off:#x}.length", off + 4, 4)]
        if etype == 0:
            break
        if etype == EXT_BITMAPS:
            t += [Target("bitmaps.nb_bitmaps", off + 8, 4), Target("bitmaps.directory_size", off + 16, 8),
                  Target("bitmaps.directory_offset", off + 24, 8)]
            nb, _, dir_size, dir_off = struct.unpack_from(">IIQQ", raw, off + 8)
            for c in range(dir_off - dir_off % cs, dir_off + dir_size, cs):
                hot.add(c)
            pos = dir_off
            for k in range(nb):
                toff, tsize, _, _, _, nsize, extra = struct.unpack_from(">QIIBBHI", raw, pos)
                t += [Target(f"bitmap[{k}].{n}", pos + o, w) for n, o, w in
                      [("table_offset", 0, 8), ("table_size", 8, 4), ("flags", 12, 4), ("type", 16, 1),
                       ("granularity_bits", 17, 1), ("name_size", 18, 2), ("extra_data_size", 20, 4),
                       ("name", 24, 1)]]
                for v in table(f"bitmap[{k}].table", toff, tsize):
                    if v & L2_OFFSET_MASK:
                        hot.add(v & L2_OFFSET_MASK)
                pos += 24 + extra + nsize + 7 & ~7
        elif length:
            t.append(Target(f"ext@{off:#x}.data", off + 8, min(length, 8)))
        off += 8 + (length + 7 & ~7)
    l1 = table("l1", l1_off, l1_size)
    step = 16 if extended else 8
    for i, e in enumerate(l1):
        l2 = e & L2_OFFSET_MASK
        if l2 and l2 + cs <= len(raw):
            table(f"l2[{i}]", l2, cs // step, 8, step, keep_zero=2)
            if extended:
                table(f"l2[{i}].bitmap", l2 + 8, cs // step, 8, step, keep_zero=2)
    rt = table("reftable", rt_off, rt_clusters * cs // 8, keep_zero=2)
    width = max(1, (1 << refcount_order) // 8)
    for i, rb in enumerate(rt):
        if rb and rb + cs <= len(raw):
            table(f"refblock[{i}]", rb, cs // width, width, width, keep_zero=2)
    pos = snap_off
    for k in range(nb_snap):
        if pos + 40 > len(raw):
            break
        s_l1, s_l1_size, id_size, name_size, _, _, _, _, extra = struct.unpack_from(">QIHHIIQII", raw, pos)
        t += [Target(f"snapshot[{k}].{n}", pos + o, w) for n, o, w in
              [("l1_table_offset", 0, 8), ("l1_size", 8, 4), ("id_size", 12, 2), ("name_size", 14, 2),
               ("vm_state_size", 32, 4), ("extra_data_size", 36, 4), ("extra", 40, 8)]]
        table(f"snapshot[{k}].l1", s_l1, s_l1_size, keep_zero=1)
        hot.add(pos - pos % cs)
        pos += 40 + extra + id_size + name_size + 7 & ~7
    return t, hot, cs


def build_corpus(d: Path) -> list[Base]:
    """Make the qemu images of ``SPECS`` in ``d``."""
    _qemu(d, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(d / "base.qcow2"), "8M")
    _qemu(d, "qemu-io", "-f", "qcow2", "-c", "write -P 33 0 2M", str(d / "base.qcow2"))
    bases = []
    for name, opts, size, writes, bitmaps, snapshots in SPECS:
        path = d / f"{name}.qcow2"
        _qemu(d, "qemu-img", "create", "-q", "-f", "qcow2", "-o", ",".join(opts), str(path), size)
        for b in bitmaps:
            _qemu(d, "qemu-img", "bitmap", "--add", "-g", "4096", str(path), b)
        args = ["qemu-io", "-f", "qcow2"]
        for w in writes:
            args += ["-c", w]
        _qemu(d, *args, str(path))
        for s in snapshots:
            _qemu(d, "qemu-img", "snapshot", "-c", s, str(path))
            _qemu(d, "qemu-io", "-f", "qcow2", "-c", f"write -P {len(s) + 40} 0 4k", str(path))
        raw = bytearray(path.read_bytes())
        _pin_snapshot_dates(raw)
        path.write_bytes(raw)
        t, hot, cs = targets(bytes(raw))
        extra = {}
        for opt in opts:
            if opt.startswith(("data_file=", "backing_file=")):
                f = d / opt.split("=", 1)[1]
                extra[f.name] = f.read_bytes()
        guest = int(size[:-1]) << 20
        bases.append(Base(name, bytes(raw), cs, t, sorted(hot), len(hot) * cs, (bitmaps or ["b0"])[0], guest, extra))
    return bases


def _pin_snapshot_dates(raw: bytearray) -> None:
    """Zero the snapshots' dates and clocks so that the corpus is the same on every run."""
    nb, off = struct.unpack_from(">IQ", raw, 60)
    for _ in range(nb):
        _, _, id_size, name_size = struct.unpack_from(">QIHH", raw, off)
        struct.pack_into(">IIQ", raw, off + 16, 0, 0, 0)
        extra = struct.unpack_from(">I", raw, off + 36)[0]
        if extra >= 24:
            struct.pack_into(">Q", raw, off + 40 + 16, 0)  # icount
        off += 40 + extra + id_size + name_size + 7 & ~7


def mutate(rng: random.Random, raw: bytearray, base: Base) -> str:
    """Apply one mutation to ``raw``; return what it did."""
    cs = base.cluster_size
    roll = rng.random()
    if roll < 0.05 and len(raw) >= 2 * cs:
        cut = rng.randrange(1, len(raw) // cs) * cs - rng.choice([0, 0, 1, 512])
        del raw[cut:]
        return f"truncate@{cut:#x}"
    if roll < 0.3:
        at = rng.choice(base.hot) + rng.randrange(0, min(cs, 4096) if rng.random() < 0.7 else cs)
        n = rng.randrange(1, 9)
        at = min(at, len(raw) - n)
        raw[at:at + n] = rng.randbytes(n)
        return f"random{n}@{at:#x}"
    t = rng.choice(base.targets)
    if t.offset + t.width > len(raw):
        return f"{t.what}:gone"
    old = int.from_bytes(raw[t.offset:t.offset + t.width], "big")
    bits = 8 * t.width
    op = rng.randrange(6)
    if op == 0:
        new = old ^ (1 << rng.randrange(bits))
    elif op == 1:
        new = rng.choice(INTERESTING)
    elif op == 2:
        new = old + rng.choice([-1, 1, -cs, cs, 512, -512, 8, -8, 1 << 9])
    elif op == 3:
        new = rng.choice([len(raw), len(raw) - cs, len(raw) + cs, cs, 2 * cs, cs // 2, 1 << 30])
    elif op == 4:
        new = rng.choice(base.hot) | (old & ~L2_OFFSET_MASK)  # points at another structure
    else:
        new = rng.getrandbits(bits)
    new &= (1 << bits) - 1
    raw[t.offset:t.offset + t.width] = new.to_bytes(t.width, "big")
    return f"{t.what}={new:#x}"


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread after ``seconds``."""
    def boom(*_: object) -> None:
        raise TimeoutError(f"hung for {seconds} s")
    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Failure(Exception):
    """A case broke one of the module's rules."""


def run(*args: str) -> int:
    """``qjournal ARGS`` in-process; its exit code, after checking exit code and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except TimeoutError:
            raise
        except BaseException as e:
            raise Failure(f"qjournal {' '.join(args)}: traceback: {type(e).__name__}: {e}") from e
    msg = err.getvalue()
    if code not in (0, 1, 2, 3):
        raise Failure(f"qjournal {' '.join(args)}: exit {code}: {msg!r}")
    if "Traceback" in msg or "Traceback" in out.getvalue():
        raise Failure(f"qjournal {' '.join(args)}: traceback on stderr: {msg!r}")
    if code == 1 and args[0] != "check" and (msg.count("\n") != 1 or not msg.startswith("qjournal: ")):
        raise Failure(f"qjournal {' '.join(args)}: error is not one line: {msg!r}")
    return code


def _lay_out(base: Base, raw: bytes, d: Path) -> Path:
    """Write ``raw`` as the case's image in ``d``, no journal beside it, the base's files restored."""
    path = d / "case.qcow2"
    path.write_bytes(raw)
    Path(f"{path}.qjournal").unlink(missing_ok=True)
    for name, data in base.extra.items():
        (d / name).write_bytes(data)
    return path


def warm_up(bases: list[Base], d: Path) -> None:
    """Run each command a case runs once on every unmutated base, untraced, so that the
    modules they import on first use are loaded before any memory sample: a process's
    first case counted them in its peak (seed 20261205's case 0, 140 KiB over)."""
    for base in bases:
        p = str(_lay_out(base, base.raw, d))
        for args in (("info", p), ("info", "--output=json", p), ("check", p), ("map", "--output=json", p),
                     ("read", p, "0", "4096"), ("bitmap", "--dump", p, base.bitmap),
                     ("write", p, "0", "-P", "0x5a", "512"), ("bitmap", "--add", "-g", "65536", p, "fuzz"),
                     ("check", "-r", "all", p)):
            run(*args)


def case(base: Base, seed: int, index: int, d: Path, memory: bool) -> tuple[str, int]:
    """Run case ``index``; return what it did and info's exit code (raise Failure on a broken rule)."""
    rng = random.Random(f"{seed}:{index}")
    raw = bytearray(base.raw)
    what = " ".join(mutate(rng, raw, base) for _ in range(rng.choice([1, 1, 1, 2, 2, 3])))
    path = _lay_out(base, raw, d)
    p = str(path)
    reads = [(0, 65536), (rng.randrange(0, base.size, 512), 4096), (base.size - 4096, 4096)]
    writable = rng.randrange(3)
    if memory:
        numpy.zeros(0)          # loaded before the sample: qjournal loads numpy lazily, on first use
        tracemalloc.start()
    try:
        with deadline(CASE_SECONDS):
            opened = run("info", p)
            run("info", "--output=json", p)
            run("check", p)
            run("map", "--output=json", p)
            for off, n in reads:
                run("read", p, str(off), str(n))
            run("bitmap", "--dump", p, base.bitmap)
            if path.read_bytes() != raw:
                raise Failure("a read-only command changed the image")
            if writable == 0:
                args = ("write", p, str(rng.randrange(0, base.size, 512)), "-P", "0x5a", str(rng.choice([512, 4096, 65536])))
            elif writable == 1:
                args = ("bitmap", "--add", "-g", "65536", p, "fuzz")
            else:
                args = ("check", "-r", "all", p)
            code = run(*args)
            if code == 1 and path.read_bytes() != raw:
                raise Failure(f"refused {args[0]} changed the image")
    except Failure as e:
        raise Failure(f"{e} [{what}]") from e
    except TimeoutError as e:
        raise Failure(f"hang: {e} [{what}]") from e
    finally:
        if memory:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    bound = 2 * base.metadata + 2 * base.cluster_size + MEMORY_SLACK
    if memory and peak > bound:
        raise Failure(f"peak {peak} B > {bound} B (2 x {base.metadata} B metadata + 2 clusters + slack) [{what}]")
    return what, opened


def cases(bases: list[Base], seed: int, start: int, count: int, d: Path) -> Iterator[tuple[int, str | None, str, int]]:
    """Run cases start..start+count-1; yield (index, failure or None, what, info's exit code)."""
    warm_up(bases, d)
    for i in range(start, start + count):
        base = bases[i % len(bases)]
        try:
            what, opened = case(base, seed, i, d, memory=i % MEMORY_EVERY == 0)
            yield i, None, f"{base.name} {what}", opened
        except Failure as e:
            yield i, str(e), base.name, -1


def _worker(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    bases = build_corpus(d / "corpus")
    work = d / "work"
    work.mkdir(exist_ok=True)
    for i, failure, what, _ in cases(bases, args.seed, args.start, args.cases, work):
        print(json.dumps({"case": i, "failure": failure, "what": what}), flush=True)
    return 0


def _driver(args: argparse.Namespace) -> int:
    """Run the cases in a worker process; restart it after a case that killed it."""
    start, end = args.start, args.start + args.cases
    failures: list[dict[str, object]] = []
    t0 = time.monotonic()
    done = 0
    last_report = t0
    with tempfile.TemporaryDirectory(prefix="qj-fuzz-") as d:
        while start < end:
            shutil.rmtree(Path(d) / "corpus", ignore_errors=True)
            (Path(d) / "corpus").mkdir()
            proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz", "--worker", "--dir", d, "--seed",
                                     str(args.seed), "--start", str(start), "--cases", str(end - start)],
                                    stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            current = start
            for line in proc.stdout:
                rec = json.loads(line)
                current = rec["case"] + 1
                done += 1
                if rec["failure"]:
                    failures.append(rec)
                    print(f"FAIL case {rec['case']} ({rec['what']}): {rec['failure']}", flush=True)
                if time.monotonic() - last_report > 60:
                    last_report = time.monotonic()
                    print(f"{done} cases, {len(failures)} failures, {last_report - t0:.0f} s", flush=True)
            code = proc.wait()
            if code > 0:
                print(f"the worker failed (exit {code}) at case {current}", flush=True)
                return 2
            if code < 0:
                failures.append({"case": current, "failure": f"worker ended by {code} (signal {-code})"})
                print(f"FAIL case {current}: worker exit {code}", flush=True)
                current += 1
                done += 1
            start = current
    elapsed = time.monotonic() - t0
    print(f"{done} cases (seed {args.seed}, {args.start}..{end - 1}) in {elapsed:.0f} s: {len(failures)} failures")
    return 1 if failures else 0


def main_(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=100000)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--start", type=int, default=0, help="first case index")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return _worker(args) if args.worker else _driver(args)


if __name__ == "__main__":
    sys.exit(main_())

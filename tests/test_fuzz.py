"""Mutation fuzzing over images that QEMU made: never a traceback, never a hang,
never a write to an image that failed validation.

Each case damages a copy of a qemu-made image at a seeded position inside its
metadata (header, extensions, refcount structures, L1/L2, bitmap directory and
tables, snapshot table) and runs the commands a user would. Every outcome must be a
clean exit (0..3); an image that qjournal refuses to open must stay byte-identical
through a refused write. ``QJ_FUZZ_CASES`` sets the number of cases (CI: 1500).
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import signal
import struct
from pathlib import Path

import pytest

import qemu
from qjournal.cli import main

CASES = int(os.environ.get("QJ_FUZZ_CASES", "1500"))
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x200, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF,
               0xFFFFFFFFFFFFFFFF, 1 << 40, 1 << 63]


def _base_images(d: Path) -> list[tuple[Path, list[int]]]:
    """Qemu-made images and the offsets of their metadata clusters."""
    out = []
    a = qemu.create(d / "a.qcow2", "32M", "cluster_size=4096")
    qemu.qemu_img("bitmap", "--add", "-g", "512", str(a), "b0")
    qemu.qemu_img("bitmap", "--add", "--disable", str(a), "b1")
    qemu.qemu_io(a, "write 0 64k", "write 5M 4k", "write 31M 1M")
    qemu.qemu_img("snapshot", "-c", "s1", str(a))
    base = qemu.create(d / "base.qcow2", "32M")
    b = d / "b.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(b))
    qemu.qemu_img("bitmap", "--add", str(b), "x")
    qemu.qemu_io(b, "write 1M 1M")
    v2 = qemu.create(d / "v2.qcow2", "16M", "compat=0.10", "cluster_size=512")
    qemu.qemu_io(v2, "write 0 4k")
    del base
    for img in (a, b, v2):
        raw = img.read_bytes()
        cs = 1 << struct.unpack_from(">I", raw, 20)[0]
        # Every cluster that is not all zeros and not guest data (guest data is 0xcd/0x00 here).
        hot = [off for off in range(0, len(raw), cs)
               if raw[off:off + cs].strip(b"\0") and raw[off:off + cs].strip(b"\xcd")]
        out.append((img, hot))
    return out


@contextlib.contextmanager
def _deadline(seconds: int):  # type: ignore[no-untyped-def]
    def boom(*_: object) -> None:
        raise TimeoutError("qjournal hung on a hostile image")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _run(*args: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(list(args))
    msg = err.getvalue()
    assert "Traceback" not in msg
    if code == 1:
        assert msg.count("\n") == 1, f"error is not one line: {msg!r}"
    return code


def _mutate(rng: random.Random, raw: bytearray, hot: list[int], cs: int) -> str:
    base = rng.choice(hot)
    if rng.random() < 0.5:  # the header and its extensions: most rules live there
        off = rng.randrange(0, min(cs, 1024))
    else:
        off = base + rng.randrange(0, cs)
    off = min(off, len(raw) - 8)
    kind = rng.randrange(4)
    if kind == 0:
        raw[off] ^= 1 << rng.randrange(8)
    elif kind == 1:
        raw[off] = rng.randrange(256)
    else:
        width = 4 if kind == 2 else 8
        off -= off % width
        val = rng.choice(INTERESTING + [len(raw), len(raw) - cs, rng.randrange(1 << 32)]) & ((1 << (8 * width)) - 1)
        raw[off:off + width] = val.to_bytes(width, "big")
    return f"{kind}@{off:#x}"


def test_hostile_images(tmp_path: Path) -> None:
    bases = _base_images(tmp_path)
    rng = random.Random(20261125)
    target = tmp_path / "case.qcow2"
    stats = {"refused": 0, "opened": 0}
    for case in range(CASES):
        src, hot = bases[case % len(bases)]
        raw = bytearray(src.read_bytes())
        cs = 1 << struct.unpack_from(">I", raw, 20)[0]
        what = " ".join(_mutate(rng, raw, hot, cs) for _ in range(rng.choice([1, 1, 2, 3])))
        target.write_bytes(bytes(raw))
        Path(f"{target}.qjournal").unlink(missing_ok=True)
        try:
            with _deadline(10):
                info = _run("info", str(target))
                assert info in (0, 1)
                if info == 1:
                    stats["refused"] += 1
                    before = target.read_bytes()
                    assert _run("bitmap", "--add", str(target), "fuzz") == 1
                    assert target.read_bytes() == before, "a refused image was written"
                else:
                    stats["opened"] += 1
                    _run("bitmap", "--dump", str(target), "b0")
                    _run("bitmap", "--add", "--clear", str(target), "fuzz")
                    _run("bitmap", "--remove", str(target), "fuzz")
                assert _run("check", str(target)) in (0, 1, 2, 3)
                assert _run("check", "-r", "all", str(target)) in (0, 1, 2, 3)
        except BaseException as e:
            pytest.fail(f"case {case} ({src.name}, {what}): {type(e).__name__}: {e}")
    # The corpus must exercise both paths, or it proves little.
    assert stats["refused"] > CASES // 20 and stats["opened"] > CASES // 20, stats

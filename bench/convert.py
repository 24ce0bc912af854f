"""convert: ``qjournal convert`` against ``qemu-img convert``, whole process against whole process.

Both sides are commands, as a user scripting them times them: ours is
``python -m qjournal convert ...`` (Python's start and imports included), the peer
the same ``qemu-img convert ...``. The target is written beside the round's copy of the
template (``IMAGE.out``), and deleted with it.

- ``convert-qcow2-raw``: 1 GiB virtual, half allocated (seeded random 2 MiB stripes,
  every other one), to ``-O raw``. Goal: at most 1.0x.
- ``convert-raw-qcow2``: the same disk as a sparse raw file, to ``-O qcow2``. Goal 1.0x.
- ``convert-compress``: 256 MiB of compressible data (seeded random bytes over 16
  symbols: zlib takes it to about 60 %) to ``-O qcow2 -c``. Goal 1.0x.

- ``convert-qcow2-raw-durable``, ``convert-raw-qcow2-durable``: the same two, against
  ``qemu-img convert -t writeback``, which flushes the target before it exits (the
  default, ``-t unsafe``, leaves it in the page cache): both sides then end with the
  copy on the device, as ours always does (its fsync before the rename).

``verify`` runs ``qemu-img compare`` on each side's result against the source, and
``qemu-img check`` on qcow2 results.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from .harness import PROJECT_ROOT, Benchmark, Fixtures, benchmark, qemu_img

SIZE = 1 << 30
STRIPE = 2 << 20
COMPRESS_SIZE = 256 << 20
SEED = 14


def _half_allocated_raw(path: Path) -> None:
    rng = np.random.default_rng(SEED)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off in range(0, SIZE, 2 * STRIPE):
            f.seek(off)
            f.write(rng.bytes(STRIPE))


def _build_qcow2(path: Path) -> None:
    raw = path.with_suffix(".raw")
    _half_allocated_raw(raw)
    try:
        qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, path)
    finally:
        raw.unlink()


def _build_compressible(path: Path) -> None:
    rng = np.random.default_rng(SEED)
    with open(path, "wb") as f:
        for _ in range(COMPRESS_SIZE // (16 << 20)):
            f.write((rng.integers(0, 16, 16 << 20, dtype=np.uint8) + ord("a")).tobytes())


def _out(image: Path) -> Path:
    return image.with_name(image.name + ".out")


def _qjournal(*args: str | Path) -> None:
    env = {"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-m", "qjournal", "convert", *map(str, args)], check=True, env=env,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


class _Convert(Benchmark):
    src_format = "qcow2"
    args: tuple[str, ...] = ()
    peer_args: tuple[str, ...] = ()   # qemu-img's options that ours does not take

    def ours(self, image: Path) -> None:
        _qjournal("-f", self.src_format, *self.args, image, _out(image))

    def peer(self, image: Path) -> list[str]:
        return ["qemu-img", "convert", *self.peer_args, "-f", self.src_format, *self.args, str(image),
                str(_out(image))]

    def verify(self, ours_image: Path, peer_image: Path) -> None:
        for image in (ours_image, peer_image):
            qemu_img("compare", "-f", self.src_format, image, _out(image))
            if "qcow2" in self.args:
                qemu_img("check", _out(image))


@benchmark("convert-qcow2-raw")
class ConvertQcow2Raw(_Convert):
    """qcow2 -> raw, 1 GiB virtual, half allocated, vs qemu-img convert -O raw (whole processes)"""

    args = ("-O", "raw")

    def template(self, fx: Fixtures) -> Path:
        return fx.image("half-1G", _build_qcow2)


@benchmark("convert-raw-qcow2")
class ConvertRawQcow2(_Convert):
    """raw -> qcow2, 1 GiB, half allocated, vs qemu-img convert -O qcow2 (whole processes)"""

    src_format = "raw"
    args = ("-O", "qcow2")

    def template(self, fx: Fixtures) -> Path:
        return fx.image("half-1G-raw", _half_allocated_raw)


@benchmark("convert-compress")
class ConvertCompress(_Convert):
    """raw -> qcow2 -c (zlib), 256 MiB of compressible data, vs qemu-img convert -c (whole processes)"""

    src_format = "raw"
    args = ("-O", "qcow2", "-c")

    def template(self, fx: Fixtures) -> Path:
        return fx.image("compressible-256M-raw", _build_compressible)


@benchmark("convert-qcow2-raw-durable")
class ConvertQcow2RawDurable(ConvertQcow2Raw):
    """qcow2 -> raw as convert-qcow2-raw, vs qemu-img convert -t writeback (flushed, as ours)"""

    peer_args = ("-t", "writeback")


@benchmark("convert-raw-qcow2-durable")
class ConvertRawQcow2Durable(ConvertRawQcow2):
    """raw -> qcow2 as convert-raw-qcow2, vs qemu-img convert -t writeback (flushed, as ours)"""

    peer_args = ("-t", "writeback")

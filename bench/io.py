"""Guest I/O: a sequential read of 1 GiB of allocated data, and writes and overwrites of 1 GiB.

The image holds 1 GiB of seeded random bytes, every cluster allocated, made by
``qemu-img convert -f raw -O qcow2`` (64 KiB clusters, and 4 KiB clusters for the
``-4k`` variants, where per-cluster costs show). Ours reads the whole disk through
:class:`qjournal.disk.GuestDisk` ``readinto`` with an 8 MiB buffer, discarding the bytes.

Peers, each a whole process:

- ``io-read``, ``io-read-4k``: ``qemu-img convert -n --target-image-opts IMG
  driver=null-co,size=N``, QEMU's read of every byte into a sink (qemu-img refuses
  ``-O raw ... /dev/null``: it cannot grow a device file). Goal: at most 1.0x.
- ``io-read-dissect``, ``io-read-4k-dissect`` (when ``dissect.hypervisor`` is installed):
  dissect.hypervisor's qcow2 stream read with the same 8 MiB buffer. The process time
  includes starting Python and importing dissect (about 0.2 s here: time
  ``python -c "from dissect.hypervisor.disk.qcow2 import QCow2"``); goal: ten times
  faster (at most 0.1x).

``verify`` hashes what ours reads and compares it with the seeded bytes.

``read-cmd``: the command ``qjournal read --output-file OUT IMG 0 1G`` of the random image,
a whole process against ``qemu-img convert -O raw IMG OUT`` (goal 1.0x); ``verify``
compares the two outputs.

``write-cmd``: the command ``qjournal write IMG 0 -P 0xab 1G`` into a fresh image, a
whole process against the whole ``qemu-io -c "write -P 0xab 0 1G"`` (goal 1.0x).

Writes, each in 1 MiB writes from the library against ``qemu-io write -P 0xab 0 1G``:
``io-write`` into a fresh image through ``img.disk()``; ``io-overwrite`` over the 1 GiB
of random data through ``img.disk()`` (in place, as QEMU overwrites); ``io-overwrite-tx``
the same overwrite inside one ``with img.transaction():``, where every cluster is copied
into a new one that the commit switches in (all or nothing). ``verify`` compares both
results with ``qemu-img compare`` and checks ours with ``qemu-img check``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from .harness import Benchmark, Fixtures, benchmark, qemu_img

SIZE = 1 << 30
SEED = 4
CHUNK = 8 << 20  # bytes per read, both sides
GEN_CHUNK = 16 << 20

DISSECT_READ = f"""
import sys
from dissect.hypervisor.disk.qcow2 import QCow2
with open(sys.argv[1], "rb") as f:
    stream = QCow2(f).open()
    while stream.read({CHUNK}):
        pass
"""


def seeded_bytes() -> "np.random.Generator":
    """The generator of the template's bytes (``rng.bytes(GEN_CHUNK)`` chunk after chunk)."""
    return np.random.default_rng(SEED)


def expected_digest() -> bytes:
    """sha256 of the 1 GiB the template holds (regenerated, 16 MiB at a time)."""
    rng, h = seeded_bytes(), hashlib.sha256()
    for _ in range(SIZE // GEN_CHUNK):
        h.update(rng.bytes(GEN_CHUNK))
    return h.digest()


def build(path: Path, cluster_size: str) -> None:
    raw = path.with_suffix(".raw")
    rng = seeded_bytes()
    with open(raw, "wb") as f:
        for _ in range(SIZE // GEN_CHUNK):
            f.write(rng.bytes(GEN_CHUNK))
    try:
        qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={cluster_size}", raw, path)
    finally:
        raw.unlink()


def read_all(image: Path, digest: bool = False) -> bytes:
    """Read the whole guest disk, 8 MiB at a time; the sha256 of what was read if asked."""
    import qjournal
    from qjournal.write.disk import GuestDisk
    h = hashlib.sha256() if digest else None
    buf = memoryview(bytearray(CHUNK))
    with qjournal.open(image) as img, GuestDisk(img) as disk:
        while n := disk.readinto(buf):
            if h is not None:
                h.update(buf[:n])
    return h.digest() if h is not None else b""


class _Read(Benchmark):
    cluster_size = "64k"

    def template(self, fx: Fixtures) -> Path:
        return fx.image(f"random-1G-{self.cluster_size}", lambda p: build(p, self.cluster_size))

    def ours(self, image: Path) -> None:
        read_all(image)

    def peer(self, image: Path) -> list[str]:
        return ["qemu-img", "convert", "-n", "--target-image-opts", str(image), f"driver=null-co,size={SIZE}"]

    def verify(self, ours_image: Path, peer_image: Path) -> None:
        assert read_all(ours_image, digest=True) == expected_digest(), \
            "qjournal read other bytes than the image holds"


@benchmark("io-read")
class IoRead(_Read):
    """sequential read of 1 GiB of allocated data, 64 KiB clusters, vs qemu-img convert"""


@benchmark("io-read-4k")
class IoRead4k(_Read):
    """sequential read of 1 GiB of allocated data, 4 KiB clusters, vs qemu-img convert"""

    cluster_size = "4k"


if importlib.util.find_spec("dissect") is not None and importlib.util.find_spec("dissect.hypervisor") is not None:
    class _Dissect(_Read):
        def peer(self, image: Path) -> list[str]:
            return [sys.executable, "-c", DISSECT_READ, os.fspath(image)]

    @benchmark("io-read-dissect", goal=0.1)
    class IoReadDissect(_Dissect):
        """sequential read of 1 GiB of allocated data, 64 KiB clusters, vs dissect.hypervisor"""

    @benchmark("io-read-4k-dissect", goal=0.1)
    class IoRead4kDissect(_Dissect):
        """sequential read of 1 GiB of allocated data, 4 KiB clusters, vs dissect.hypervisor"""

        cluster_size = "4k"


@benchmark("io-write")
class IoWrite(Benchmark):
    """sequential write of 1 GiB in 1 MiB writes into a fresh image, vs qemu-io write -P 0xab 0 1G"""

    def template(self, fx: Fixtures) -> Path:
        return fx.image("empty-1G", lambda p: qemu_img("create", "-q", "-f", "qcow2", p, "1G"))

    def ours(self, image: Path) -> None:
        import qjournal
        block = b"\xab" * (1 << 20)
        with qjournal.open(image, "r+") as img, img.disk() as disk:
            for _ in range(SIZE // len(block)):
                disk.write(block)

    def peer(self, image: Path) -> list[str]:
        return ["qemu-io", "-f", "qcow2", "-c", f"write -P 0xab 0 {SIZE}", str(image)]

    def verify(self, ours_image: Path, peer_image: Path) -> None:
        qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ours_image, peer_image)  # raises on a difference
        qemu_img("check", ours_image)


@benchmark("read-cmd")
class ReadCmd(Benchmark):
    """qjournal read of 1 GiB into a file vs qemu-img convert -O raw (whole processes)"""

    def template(self, fx: Fixtures) -> Path:
        return fx.image("random-1G-64k", lambda p: build(p, "64k"))

    def ours_command(self, image: Path) -> list[str]:
        return [sys.executable, "-m", "qjournal", "read", "--output-file", f"{image}.raw", str(image), "0", str(SIZE)]

    def peer(self, image: Path) -> list[str]:
        return ["qemu-img", "convert", "-O", "raw", str(image), f"{image}.raw"]

    def verify(self, ours_image: Path, peer_image: Path) -> None:
        a, b = Path(f"{ours_image}.raw"), Path(f"{peer_image}.raw")
        assert a.stat().st_size == b.stat().st_size == SIZE and _digest(a) == _digest(b), "read-cmd: outputs differ"


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


@benchmark("write-cmd")
class WriteCmd(Benchmark):
    """qjournal write -P 0xab of 1 GiB into a fresh image vs qemu-io write -P 0xab 0 1G (whole processes)"""

    def template(self, fx: Fixtures) -> Path:
        return fx.image("empty-1G", lambda p: qemu_img("create", "-q", "-f", "qcow2", p, "1G"))

    def ours_command(self, image: Path) -> list[str]:
        return [sys.executable, "-m", "qjournal", "write", str(image), "0", "-P", "0xab", str(SIZE)]

    def peer(self, image: Path) -> list[str]:
        return ["qemu-io", "-f", "qcow2", "-c", f"write -P 0xab 0 {SIZE}", str(image)]

    def verify(self, ours_image: Path, peer_image: Path) -> None:
        qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ours_image, peer_image)  # raises on a difference
        qemu_img("check", ours_image)


class _Overwrite(Benchmark):
    """Overwrite every byte of the 1 GiB random image (64 KiB clusters, all allocated) in
    1 MiB writes; the peer is ``qemu-io write -P 0xab 0 1G`` (in place) on the same image."""

    def template(self, fx: Fixtures) -> Path:
        return fx.image("random-1G-64k", lambda p: build(p, "64k"))

    def peer(self, image: Path) -> list[str]:
        return ["qemu-io", "-f", "qcow2", "-c", f"write -P 0xab 0 {SIZE}", str(image)]

    def verify(self, ours_image: Path, peer_image: Path) -> None:
        qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ours_image, peer_image)  # raises on a difference
        qemu_img("check", ours_image)


@benchmark("io-overwrite")
class IoOverwrite(_Overwrite):
    """overwrite of 1 GiB of allocated data in 1 MiB writes through img.disk() (in place), vs qemu-io"""

    def ours(self, image: Path) -> None:
        import qjournal
        block = b"\xab" * (1 << 20)
        with qjournal.open(image, "r+") as img, img.disk() as disk:
            for _ in range(SIZE // len(block)):
                disk.write(block)


@benchmark("io-overwrite-tx")
class IoOverwriteTx(_Overwrite):
    """overwrite of 1 GiB of allocated data in 1 MiB writes inside one img.transaction(), vs qemu-io

    Copied into new clusters and switched by the commit: all or nothing.
    """

    def ours(self, image: Path) -> None:
        import qjournal
        block = b"\xab" * (1 << 20)
        with qjournal.open(image, "r+") as img, img.transaction("overwrite 1 GiB"):
            for off in range(0, SIZE, len(block)):
                img.write(off, block)

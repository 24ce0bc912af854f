"""compare and commit: ``qjournal compare``/``commit`` against ``qemu-img compare``/``commit``.

* ``compare-1G``: two 1 GiB images of seeded random data in 64 KiB clusters (io.py's
  ``random-1G-64k``, and a copy whose last cluster differs), so that both sides read
  both disks whole. Ours is :func:`qjournal.ops.compare.compare_files`; the peer is
  ``qemu-img compare A B`` (in ``sh -c`` so that its exit status 1, "different", is the
  expected one). Goal: at most 1.0x.
* ``commit-256M``: an overlay holding 256 MiB of seeded random data (64 KiB clusters) is
  committed into a fresh copy of an empty 1 GiB base each round, with ``-d`` on both
  sides (the overlay template is shared). The overlay names its backing file through a
  symlink that each side points at its own base copy just before it runs. Ours is what
  ``qjournal commit -d`` runs (open both, :func:`qjournal.ops.commit.commit`); the peer
  is ``qemu-img commit -d``. Goal: at most 1.0x.
* ``amend-refcount-bits-1G``: ``qjournal amend -o refcount_bits=64`` against ``qemu-img
  amend -o refcount_bits=64``, both timed as whole processes (so ours includes the
  interpreter's start and imports), on a 1 GiB image of 64 KiB clusters made with
  ``preallocation=metadata``: every cluster allocated and counted (16-bit refcounts),
  the data clusters holes of the file, so that each round copies it cheaply. Goal: at
  most 1.0x.
* ``snapshot-c-1G``, ``snapshot-d-1G``: ``qjournal snapshot -c``/``-d`` as whole processes on
  1 GiB allocated in 64 KiB clusters (``preallocation=metadata``), against ``qemu-img
  snapshot`` plus a bare ``python3 -c pass``, timed as two commands: goal at most 2.0x
  (the issue's yardstick, qemu-img + a Python start).
* ``snapshot-c-2M``: ``qjournal snapshot -c`` on 2M clusters (512-byte clusters, 1 GiB
  allocated) against ``qemu-img snapshot -c``. Goal: at most 0.5x.
* ``check-2M-cmd``: ``qjournal check`` of the same 2M clusters against ``qemu-img check``,
  whole processes. Goal: at most 0.5x (and peak RSS at most 200 MiB).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .harness import Benchmark, Fixtures, benchmark, qemu_img
from .io import build, seeded_bytes

COMMIT_DATA = 256 << 20


def _last_cluster_differs(template: Path, path: Path) -> None:
    qemu_img("convert", "-O", "qcow2", "-o", "cluster_size=64k", template, path)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {(1 << 30) - 65536} 65536", str(path)],
                   check=True, capture_output=True)


@benchmark("compare-1G", goal=1.0)
class Compare1G(Benchmark):
    """compare of two 1 GiB images (64 KiB clusters, all allocated) that differ in the last cluster"""

    OTHER = "random-1G-64k-last-differs"

    def template(self, fx: Fixtures) -> Path:
        a = fx.image("random-1G-64k", lambda p: build(p, "64k"))
        fx.image(self.OTHER, lambda p: _last_cluster_differs(a, p))
        return a

    def ours(self, image: Path) -> None:
        from qjournal.ops.compare import compare_files
        other = Fixtures.template_path(image, self.OTHER)
        result = compare_files(str(image), str(other))
        assert result.code == 1 and result.lines == (f"Content mismatch at offset {(1 << 30) - 65536}!",), result

    def peer(self, image: Path) -> list[str]:
        other = Fixtures.template_path(image, self.OTHER)
        return ["sh", "-c", 'qemu-img compare "$1" "$2" >/dev/null; test $? -eq 1', "sh", str(image), str(other)]


def _point(link: Path, target: Path) -> None:
    tmp = link.with_suffix(".tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)


@benchmark("commit-256M", goal=1.0)
class Commit256M(Benchmark):
    """commit -d of an overlay holding 256 MiB (64 KiB clusters) into an empty 1 GiB base"""

    OVERLAY = "overlay-256M"
    LINK = "commit-base"       # the overlay's backing file: a symlink, pointed at each round's base

    def template(self, fx: Fixtures) -> Path:
        base = fx.image("empty-1G", lambda p: qemu_img("create", "-q", "-f", "qcow2", p, "1G"))
        link = Fixtures.template_path(base, self.LINK)
        _point(link, base)
        fx.image(self.OVERLAY, lambda p: _fill_overlay(p, link))
        return base

    def ours(self, image: Path) -> None:
        import qjournal
        from qjournal.ops import commit
        _point(Fixtures.template_path(image, self.LINK), image)
        with qjournal.open(Fixtures.template_path(image, self.OVERLAY)) as top:
            path, fmt = commit.find_base(top, None)
            # The real path, so that each base copy gets its own journal beside it.
            with qjournal.open(os.path.realpath(path), "r+") as base:
                commit.commit(top, commit.Target(image=base), path, drop=True, grow=base.resize)

    def peer(self, image: Path) -> list[str]:
        _point(Fixtures.template_path(image, self.LINK), image)
        return ["qemu-img", "commit", "-d", "-q", str(Fixtures.template_path(image, self.OVERLAY))]

    def verify(self, ours_image: Path, peer_image: Path) -> None:
        qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ours_image, peer_image)  # raises on a difference
        qemu_img("check", ours_image)


def _fill_overlay(path: Path, link: Path) -> None:
    """The overlay: 256 MiB of seeded random data at the start of a 1 GiB disk over ``link``."""
    rng = seeded_bytes()
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", "-b", str(link), "-F", "qcow2", path, "1G")
    import qjournal
    with qjournal.open(path, "r+") as img, img.disk() as disk:
        for _ in range(COMMIT_DATA // (16 << 20)):
            disk.write(rng.bytes(16 << 20))


def _metadata_1g(path: Path) -> None:
    """1 GiB, every cluster allocated (64 KiB clusters, 16-bit refcounts), the data
    clusters holes of the file: the refcount structure of a full 1 GiB disk, copied cheaply."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k,preallocation=metadata", path, "1G")


@benchmark("amend-refcount-bits-1G", goal=1.0)
class AmendRefcountBits(Benchmark):
    """amend -o refcount_bits=64 of a 1 GiB image with every cluster allocated (16-bit refcounts before)"""

    def template(self, fx: Fixtures) -> Path:
        return fx.image("metadata-1G-64k", _metadata_1g)

    def ours(self, image: Path) -> None:
        # The whole command, as a process (interpreter start included), like the peer.
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                             *filter(None, [env.get("PYTHONPATH")])])
        subprocess.run([sys.executable, "-m", "qjournal", "amend", "-o", "refcount_bits=64", str(image)],
                       check=True, env=env, stdin=subprocess.DEVNULL)

    def peer(self, image: Path) -> list[str]:
        return ["qemu-img", "amend", "-o", "refcount_bits=64", str(image)]

    def verify(self, ours_image: Path, peer_image: Path) -> None:
        for image in (ours_image, peer_image):
            assert '"refcount-bits": 64' in qemu_img("info", "--output=json", image), image
            qemu_img("check", image)                                        # raises on leaks or errors
        qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ours_image, peer_image)


def _metadata_2m(path: Path) -> None:
    """1 GiB in 512-byte clusters, every cluster allocated: 2M clusters (holes in the file)."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,preallocation=metadata", path, "1G")


def _with_snapshot(template: Path, path: Path) -> None:
    subprocess.run(["cp", "--sparse=always", str(template), str(path)], check=True)
    qemu_img("snapshot", "-c", "s1", path)


class _SnapshotBench(Benchmark):
    def verify(self, ours_image: Path, peer_image: Path) -> None:
        for image in (ours_image, peer_image):
            qemu_img("check", image)                                        # raises on leaks or errors
        names = [qemu_img("snapshot", "-l", image).count(" s1 ") for image in (ours_image, peer_image)]
        assert names[0] == names[1], names


@benchmark("snapshot-c-1G", goal=2.0)
class SnapshotCreate1G(_SnapshotBench):
    """snapshot -c on 1 GiB allocated in 64 KiB clusters, against qemu-img snapshot -c plus a bare Python start"""

    def template(self, fx: Fixtures) -> Path:
        return fx.image("metadata-1G-64k", _metadata_1g)

    def ours_command(self, image: Path) -> list[str]:
        return [sys.executable, "-m", "qjournal", "snapshot", "-c", "s1", str(image)]

    def peers(self, image: Path) -> list[list[str]]:
        return [["qemu-img", "snapshot", "-c", "s1", str(image)], [sys.executable, "-c", "pass"]]


@benchmark("snapshot-d-1G", goal=2.0)
class SnapshotDelete1G(_SnapshotBench):
    """snapshot -d on 1 GiB allocated in 64 KiB clusters, against qemu-img snapshot -d plus a bare Python start"""

    def template(self, fx: Fixtures) -> Path:
        plain = fx.image("metadata-1G-64k", _metadata_1g)
        return fx.image("metadata-1G-64k-snapshot", lambda p: _with_snapshot(plain, p))

    def ours_command(self, image: Path) -> list[str]:
        return [sys.executable, "-m", "qjournal", "snapshot", "-d", "s1", str(image)]

    def peers(self, image: Path) -> list[list[str]]:
        return [["qemu-img", "snapshot", "-d", "s1", str(image)], [sys.executable, "-c", "pass"]]


@benchmark("snapshot-c-2M", goal=0.5)
class SnapshotCreate2M(_SnapshotBench):
    """snapshot -c on 2M clusters (512 B clusters, 1 GiB allocated), against qemu-img snapshot -c"""

    def template(self, fx: Fixtures) -> Path:
        return fx.image("metadata-1G-512", _metadata_2m)

    def ours_command(self, image: Path) -> list[str]:
        return [sys.executable, "-m", "qjournal", "snapshot", "-c", "s1", str(image)]

    def peer(self, image: Path) -> list[str]:
        return ["qemu-img", "snapshot", "-c", "s1", str(image)]


@benchmark("check-2M-cmd", goal=0.5)
class Check2M(Benchmark):
    """qjournal check of 2M clusters (512 B clusters, 1 GiB allocated) vs qemu-img check (whole processes)"""

    def template(self, fx: Fixtures) -> Path:
        return fx.image("metadata-1G-512", _metadata_2m)

    def ours_command(self, image: Path) -> list[str]:
        return [sys.executable, "-m", "qjournal", "check", str(image)]

    def peer(self, image: Path) -> list[str]:
        return ["qemu-img", "check", str(image)]

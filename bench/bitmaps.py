"""Persistent dirty bitmaps: qjournal's library against ``qemu-img bitmap`` and ``qemu-img info``.

All on a 16 TiB image made by ``qemu-img create -f qcow2 IMG 16T`` (64 KiB clusters).
At 64 KiB granularity a bitmap of that disk has 2**28 bits, 32 MiB of data.

- ``bitmap-add``: add a 64 KiB-granularity bitmap to the empty image;
- ``bitmap-merge``, ``bitmap-clear``, ``bitmap-remove``: on an image holding bitmaps
  ``a`` and ``b``, each with 1 % of its bits set (seeded, spread uniformly over the
  disk, so every data cluster of both bitmaps is allocated), merge ``b`` into ``a``,
  clear ``a``, remove ``a``;
- ``bitmap-info``: ``info`` on the empty image with 100 (empty) bitmaps.

Setting 1 % of 2**28 bits through guest writes would take millions of qemu-io
writes, so the dirty template is built by qemu-img (``create``, ``bitmap --add``)
and filled by qjournal, which writes each bitmap's new table and data in one
transaction; ``qemu-img check`` and ``qemu-img info`` then vouch for the result.

qjournal is imported inside the functions that use it, so that ``--list`` and
``--peer-only`` work even while the library does not import.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .harness import Benchmark, Fixtures, benchmark, qemu_img

DISK = "16T"
DISK_BYTES = 16 << 40
GRANULARITY = 65536
NBITS = DISK_BYTES // GRANULARITY
DIRTY_FRACTION = 0.01
DIRTY = {"a": 1, "b": 2}  # bitmap name -> RNG seed
INFO_BITMAPS = 100


def spread_bits(nbits: int, fraction: float, seed: int) -> np.ndarray:
    """Exactly ``int(nbits * fraction)`` distinct bits set at seeded uniform positions.

    uint8, bit ``n`` is bit ``n % 8`` of byte ``n // 8`` (qcow2's order).
    """
    rng = np.random.default_rng(seed)
    k = int(nbits * fraction)
    hit = np.zeros(nbits, dtype=bool)
    count = 0
    while count < k:  # drawing with replacement, then topping up the duplicates
        hit[rng.integers(0, nbits, k - count, dtype=np.int64)] = True
        count = int(np.count_nonzero(hit))
    return np.packbits(hit, bitorder="little")


# -- templates --------------------------------------------------------------------
def build_empty(path: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", path, DISK)


def build_dirty(path: Path) -> None:
    """Bitmaps ``a`` and ``b``, each 1 % dirty, spread over the disk."""
    import qjournal
    build_empty(path)
    for name in DIRTY:
        qemu_img("bitmap", "--add", "-g", str(GRANULARITY), path, name)
    want = {name: spread_bits(NBITS, DIRTY_FRACTION, seed) for name, seed in DIRTY.items()}
    with qjournal.open(path, "r+") as img:
        with img.transaction("bench: fill bitmaps"):
            for name, bits in want.items():
                img.bitmaps._replace(name, "fill", bits)
    assert_clean(path)
    assert bitmap_names(path) == list(DIRTY), f"{path}: qemu-img info shows {bitmap_names(path)}"
    with qjournal.open(path) as img:
        for name, bits in want.items():
            assert np.array_equal(img.bitmaps[name].bits(), bits), f"{path}: bitmap {name!r} reads back wrong"


def build_many(path: Path) -> None:
    build_empty(path)
    for i in range(INFO_BITMAPS):
        qemu_img("bitmap", "--add", "-g", str(GRANULARITY), path, f"bitmap-{i:03d}")


# -- checks -----------------------------------------------------------------------
def assert_clean(path: Path) -> None:
    """qemu-img check finds neither corruption nor leaks (it exits non-zero for either)."""
    out = json.loads(qemu_img("check", "--output=json", path))
    assert not out.get("corruptions") and not out.get("leaks"), f"qemu-img check {path}: {out}"


def qemu_bitmaps(path: Path) -> list[dict[str, Any]]:
    info = json.loads(qemu_img("info", "--output=json", "-U", path))
    bitmaps: list[dict[str, Any]] = info["format-specific"]["data"].get("bitmaps", [])
    return bitmaps


def bitmap_names(path: Path) -> list[str]:
    return [b["name"] for b in qemu_bitmaps(path)]


def assert_same_bitmaps(ours: Path, peer: Path) -> None:
    """Both images are clean and qemu-img info lists the same bitmaps (names, flags, granularity)."""
    assert_clean(ours)
    assert_clean(peer)
    o, p = qemu_bitmaps(ours), qemu_bitmaps(peer)
    assert o == p, f"bitmaps differ: ours {o}, qemu-img {p}"


def read_bits(path: Path, name: str) -> np.ndarray:
    import qjournal
    with qjournal.open(path) as img:
        return img.bitmaps[name].bits()


# -- benchmarks ---------------------------------------------------------------------
@benchmark("bitmap-add")
class BitmapAdd(Benchmark):
    """bitmap --add, 64 KiB granularity, on an empty 16 TiB image"""

    def template(self, fx: Fixtures) -> Path:
        return fx.image("empty-16T", build_empty)

    def ours(self, image: Path) -> None:
        import qjournal
        with qjournal.open(image, "r+") as img:
            img.bitmaps.add("b0", granularity=GRANULARITY)

    def peer(self, image: Path) -> list[str]:
        return ["qemu-img", "bitmap", "--add", "-g", str(GRANULARITY), str(image), "b0"]

    def verify(self, ours_image: Path, peer_image: Path) -> None:
        assert_same_bitmaps(ours_image, peer_image)
        assert bitmap_names(ours_image) == ["b0"]


@benchmark("bitmap-merge")
class BitmapMerge(Benchmark):
    """bitmap --merge b into a, each 1 % dirty, 16 TiB at 64 KiB granularity"""

    def template(self, fx: Fixtures) -> Path:
        return fx.image("dirty-16T", build_dirty)

    def ours(self, image: Path) -> None:
        import qjournal
        with qjournal.open(image, "r+") as img:
            img.bitmaps.merge("a", "b")

    def peer(self, image: Path) -> list[str]:
        return ["qemu-img", "bitmap", "--merge", "b", str(image), "a"]

    def verify(self, ours_image: Path, peer_image: Path) -> None:
        assert_same_bitmaps(ours_image, peer_image)
        o, p = read_bits(ours_image, "a"), read_bits(peer_image, "a")
        assert np.array_equal(o, p), "merged bitmap 'a' differs between ours and qemu-img"
        assert np.array_equal(read_bits(ours_image, "b"), read_bits(peer_image, "b"))


@benchmark("bitmap-clear")
class BitmapClear(Benchmark):
    """bitmap --clear of a 1 %-dirty bitmap, 16 TiB at 64 KiB granularity"""

    def template(self, fx: Fixtures) -> Path:
        return fx.image("dirty-16T", build_dirty)

    def ours(self, image: Path) -> None:
        import qjournal
        with qjournal.open(image, "r+") as img:
            img.bitmaps.clear("a")

    def peer(self, image: Path) -> list[str]:
        return ["qemu-img", "bitmap", "--clear", str(image), "a"]

    def verify(self, ours_image: Path, peer_image: Path) -> None:
        assert_same_bitmaps(ours_image, peer_image)
        for image in (ours_image, peer_image):
            assert not read_bits(image, "a").any(), f"{image}: bitmap 'a' is not clear"


@benchmark("bitmap-remove")
class BitmapRemove(Benchmark):
    """bitmap --remove of a 1 %-dirty bitmap, 16 TiB at 64 KiB granularity"""

    def template(self, fx: Fixtures) -> Path:
        return fx.image("dirty-16T", build_dirty)

    def ours(self, image: Path) -> None:
        import qjournal
        with qjournal.open(image, "r+") as img:
            img.bitmaps.remove("a")

    def peer(self, image: Path) -> list[str]:
        return ["qemu-img", "bitmap", "--remove", str(image), "a"]

    def verify(self, ours_image: Path, peer_image: Path) -> None:
        assert_same_bitmaps(ours_image, peer_image)
        assert bitmap_names(ours_image) == ["b"]


@benchmark("bitmap-info")
class BitmapInfo(Benchmark):
    """info on a 16 TiB image with 100 bitmaps"""

    def template(self, fx: Fixtures) -> Path:
        return fx.image("100-bitmaps-16T", build_many)

    def ours(self, image: Path) -> None:
        import qjournal
        with qjournal.open(image) as img:
            img.info()

    def peer(self, image: Path) -> list[str]:
        return ["qemu-img", "info", str(image)]

    def verify(self, ours_image: Path, peer_image: Path) -> None:
        import qjournal
        with qjournal.open(ours_image) as img:
            ours = img.info().to_json()["format-specific"]["data"]["bitmaps"]
        assert ours == qemu_bitmaps(peer_image), "qjournal's info lists other bitmaps than qemu-img's"
        assert len(ours) == INFO_BITMAPS

"""Writes never land on metadata in use, whatever the refcounts say (QEMU's overlap check).

The damage class of QEMU's iotest 137: a structure in use whose refcount is 0. An
editor that trusts the refcount hands the structure's cluster out as free and
overwrites it. Oracle: qemu-img check (no corruption beyond the one planted), qemu-io
(the written data and the old data read back) and the structure's own bytes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import qemu
import qjournal
from damage import CS, fresh, l1_pos, reftable_pos, set_refcount, u64
from qjournal.core.overlap import OverlapMap
from qjournal.errors import FormatError
from qjournal.format.extensions import EXT_BITMAPS, parse_extensions
from qjournal.cli import main


def with_bitmap_and_snapshot(d: Path) -> Path:
    p = fresh(d)
    qemu.qemu_img("bitmap", "--add", str(p), "b0")
    qemu.qemu_img("snapshot", "-c", "s0", str(p))
    qemu.qemu_io(p, "write -P 0x55 0 4k")      # the active L2 table is copied away from the snapshot's
    return p


def ext_bitmaps(p: Path) -> tuple[int, int]:
    """(directory offset, first bitmap table offset) from the bitmaps extension."""
    c0 = p.read_bytes()[:CS]
    ext = next(e for e in parse_extensions(c0, int.from_bytes(c0[100:104], "big"), CS) if e.type == EXT_BITMAPS)
    directory = int.from_bytes(ext.data[16:24], "big")
    return directory, u64(p, directory)


# Where each structure in use sits: one cluster of it.
STRUCTURES: dict[str, Callable[[Path], int]] = {
    "header": lambda p: 0,
    "refcount table": lambda p: u64(p, 48),
    "refcount block": lambda p: u64(p, reftable_pos(p, 0)),
    "L1 table": lambda p: u64(p, 40),
    "L2 table": lambda p: u64(p, l1_pos(p, 0)) & 0x00FFFFFFFFFFFE00,
    "snapshot table": lambda p: u64(p, 64),
    "bitmap directory": lambda p: ext_bitmaps(p)[0],
    "bitmap table": lambda p: ext_bitmaps(p)[1],
}


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("action", ["write", "bitmap-add", "zero"])
def test_refcount_zero_structure_is_not_handed_out(tmp_path: Path, structure: str, action: str) -> None:
    p = with_bitmap_and_snapshot(tmp_path)
    where = STRUCTURES[structure](p)
    assert where % CS == 0
    set_refcount(p, where // CS, 0)
    before_code, before = qemu.check(p)
    with open(p, "rb") as f:
        f.seek(where)
        content = f.read(CS)
    image = p.read_bytes()
    if action == "write":
        code = main(["write", str(p), "6M", "-P", "0x66", "256k"])
    elif action == "bitmap-add":
        code = main(["bitmap", "--add", str(p), "b1"])
    else:
        code = main(["zero", str(p), "2M", "64k"])
    if (action, structure) == ("bitmap-add", "bitmap directory"):
        # The rewrite frees the old directory, whose refcount is already 0: refused whole.
        assert code == 1 and p.read_bytes() == image
        return
    assert code == 0
    after_code, after = qemu.check(p)
    assert after.get("corruptions", 0) <= before.get("corruptions", 0), (before, after)
    if structure not in ("L2 table", "L1 table", "header", "refcount block", "bitmap directory",
                         "bitmap table"):
        with open(p, "rb") as f:      # nothing of this operation writes there
            f.seek(where)
            assert f.read(CS) == content
    qemu.qemu_io(p, "read -P 0x55 0 4k", "read -P 0x11 4k 60k", "read -P 0x33 4M 16k", "read -P 0x44 14M 8k",
                 read_only=True)
    if action == "write":
        qemu.qemu_io(p, "read -P 0x66 6M 256k", read_only=True)


def test_new_clusters_over_a_structure_are_refused() -> None:
    m = OverlapMap(512, [(np.array([0, 7, 9]), "header cluster"), (np.array([3]), "L2 table")])
    m.check_write(512 * 4, 512 * 3, "new cluster")        # clusters 4..6: free of structures
    with pytest.raises(FormatError, match=r"new cluster at offset 0x400: would overwrite the L2 table in "
                                          r"cluster 0x600"):
        m.check_write(512 * 4 - 1024, 2048, "new cluster")
    assert m.find(np.array([5, 9])) == (1, 9, "header cluster")


def test_qemu_img_agrees_on_the_map(tmp_path: Path) -> None:
    """Every cluster the overlap map holds is one qemu-img check counts as allocated."""
    p = with_bitmap_and_snapshot(tmp_path)
    with qjournal.open(p) as img:
        clusters = img.overlap_map().clusters
    out = json.loads(qemu.qemu_img("map", "--output=json", str(p)).stdout)
    data = {(e["offset"] // CS) for e in out if e.get("data") and "offset" in e}
    assert not (set(clusters.tolist()) & data)            # no guest data cluster is called metadata
    assert int(clusters.max()) * CS < p.stat().st_size

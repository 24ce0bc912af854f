"""`qjournal check` against `qemu-img check` on the same damaged images.

Each case damages a copy of a qemu-made image in one way; qjournal's JSON counters must
equal qemu-img's, before and after `-r leaks` / `-r all` (each tool on its own copy),
and after qjournal's repair qemu-img finds the image clean with the guest data intact.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest

import qemu
from qjournal.cli import main

KEYS = ("corruptions", "leaks", "corruptions-fixed", "leaks-fixed", "check-errors", "total-clusters",
        "allocated-clusters", "fragmented-clusters", "compressed-clusters", "image-end-offset")


def ours(path: Path, *args: str) -> tuple[int, dict]:
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["check", "--output=json", *args, str(path)])
    return code, json.loads(out.getvalue())


def theirs(path: Path, *args: str) -> tuple[int, dict]:
    res = qemu.qemu_img("check", "--output=json", *args, str(path), check=False)
    return res.returncode, json.loads(res.stdout)


def counters(d: dict) -> dict:
    return {k: d.get(k, 0) for k in KEYS}


def _l2_entry_offset(raw: bytes, guest_cluster: int) -> int:
    l1_off = struct.unpack_from(">Q", raw, 40)[0]
    l2 = struct.unpack_from(">Q", raw, l1_off)[0] & 0x00FFFFFFFFFFFE00
    return l2 + 8 * guest_cluster


def _refcount_entry_offset(raw: bytes, cluster: int) -> int:
    rt = struct.unpack_from(">Q", raw, 48)[0]
    block = struct.unpack_from(">Q", raw, rt)[0]
    return block + 2 * cluster  # 16-bit refcounts


def dirty_lazy(d: Path) -> Path:
    """lazy_refcounts=on and a crashed QEMU: data clusters without refcounts, dirty bit set."""
    p = qemu.create(d / "lazy.qcow2", "64M", "lazy_refcounts=on")
    qemu.run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "abort", str(p), check=False)
    return p


def copied_flag_cleared(d: Path) -> Path:
    """The COPIED flag of one L2 entry cleared while its refcount is 1."""
    p = qemu.create(d / "c.qcow2", "64M")
    qemu.qemu_io(p, "write -P 0x11 0 256k")
    raw = bytearray(p.read_bytes())
    off = _l2_entry_offset(raw, 1)
    raw[off] &= 0x7F
    p.write_bytes(raw)
    return p


def _with_refcount(path: Path, guest_cluster: int, refcount: int) -> Path:
    """A qemu-made image whose data cluster for ``guest_cluster`` has its refcount forced."""
    p = qemu.create(path, "64M")
    qemu.qemu_io(p, "write -P 0x11 0 256k")
    raw = bytearray(p.read_bytes())
    entry = struct.unpack_from(">Q", raw, _l2_entry_offset(raw, guest_cluster))[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">H", raw, _refcount_entry_offset(raw, entry // 65536), refcount)
    p.write_bytes(raw)
    return p


def leaked_cluster(d: Path) -> Path:
    """A refcount raised on a data cluster: one leak."""
    return _with_refcount(d / "l.qcow2", 2, 2)


def refcount_zeroed(d: Path) -> Path:
    """A used data cluster whose refcount is 0: two corruptions (refcount and COPIED)."""
    return _with_refcount(d / "z.qcow2", 3, 0)


def with_snapshot(d: Path) -> Path:
    """A clean image whose clusters a snapshot shares (refcount 2, no COPIED)."""
    p = qemu.create(d / "s.qcow2", "64M")
    qemu.qemu_io(p, "write -P 0x11 0 256k")
    qemu.qemu_img("snapshot", "-c", "s1", str(p))
    qemu.qemu_io(p, "write -P 0x22 64k 64k")
    return p


CASES: dict[str, Callable[[Path], Path]] = {f.__name__: f for f in
                                            (dirty_lazy, copied_flag_cleared, leaked_cluster, refcount_zeroed,
                                             with_snapshot)}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("repair", [None, "leaks", "all"])
def test_counts_equal_qemu_img(case: str, repair: str | None, tmp_path: Path) -> None:
    src = CASES[case](tmp_path)
    a, b = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    shutil.copy(src, a)
    shutil.copy(src, b)
    args = ("-r", repair) if repair else ()
    code_a, out_a = ours(a, *args)
    res = qemu.qemu_img("check", "--output=json", *args, str(b), check=False)
    if repair == "leaks" and res.returncode == 1 and "need to rebuild refcount structures" in res.stderr:
        # qemu-img gives up (no JSON); qjournal reports the corruptions and repairs nothing.
        assert code_a == 2 and out_a["corruptions"] == theirs(src)[1]["corruptions"]
        assert not out_a.get("corruptions-fixed") and a.read_bytes() == src.read_bytes()
        return
    code_b, out_b = res.returncode, json.loads(res.stdout)
    mine, qemus = counters(out_a), counters(out_b)
    if repair == "all":
        # QEMU rebuilds damaged refcount structures at the end of the file; qjournal
        # repairs them in place, so the image may end earlier.
        assert mine.pop("image-end-offset") <= qemus.pop("image-end-offset")
    assert mine == qemus
    assert code_a == code_b
    if repair == "all":
        qemu.assert_clean(a)
        assert qemu.info(a)["dirty-flag"] is False
        qemu.qemu_io(a, "read -P 0x11 0 64k")


def test_l2_tables_counted_a_chunk_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan takes L2 tables in chunks (bounded memory on large images): same counters."""
    import qjournal.ops.check
    monkeypatch.setattr(qjournal.ops.check, "L2_CHUNK_BYTES", 3 * 512)   # three tables at a time
    img = qemu.create(tmp_path / "c.qcow2", "4M", "cluster_size=512")   # 32 KiB per L2 table
    qemu.qemu_io(img, *(f"write -P {i + 1} {i * 40}k {(i % 5) + 1}k" for i in range(20)), "write -c 2M 512")
    qemu.qemu_img("snapshot", "-c", "s", str(img))
    qemu.qemu_io(img, "write 3k 1k")
    code, out = ours(img)
    assert (code, counters(out)) == (0, counters(theirs(img)[1]))
    assert out["fragmented-clusters"] > 0 and out["compressed-clusters"] == 1


def test_a_data_cluster_may_end_past_the_end_of_the_file(tmp_path: Path) -> None:
    """QEMU leaves the tail of a fresh last cluster unwritten: not an error, and -r all keeps it."""
    img = qemu.create(tmp_path / "t.qcow2", "16M")
    qemu.qemu_io(img, "write -P 0x5a 1M 4k")
    size = img.stat().st_size
    with open(img, "r+b") as f:
        f.truncate(size - 65536 + 4096)      # the last cluster is the data cluster: keep its first 4 KiB
    assert ours(img)[0] == theirs(img)[0] == 0
    assert counters(ours(img)[1]) == counters(theirs(img)[1])
    assert ours(img, "-r", "all")[0] == 0
    qemu.qemu_io(img, "read -P 0x5a 1M 4k", "read -P 0 1028k 60k")

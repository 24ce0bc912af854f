"""A 16 TiB image with 100 bitmaps: opened and listed through the map, reading only
metadata, in a small memory footprint; and QEMU's limits on bitmaps."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

import qemu
import qjournal
from qjournal.format import bitmaps as bm
from qjournal import Image
from qjournal.storage import medium as medium_mod
from qjournal.storage.medium import MmapMedium

TiB = 1 << 40


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = qemu.create(tmp_path_factory.mktemp("scale") / "big.qcow2", "16T")
    with qjournal.open(p, "r+") as img:
        with img.transaction():
            for i in range(100):
                img.bitmaps.add(f"bitmap-{i:03d}", 65536, disabled=bool(i % 2))
    return p


def test_qemu_sees_all_100(big: Path) -> None:
    got = qemu.bitmaps(big)
    assert [b["name"] for b in got] == [f"bitmap-{i:03d}" for i in range(100)]
    assert [b["flags"] for b in got] == [["auto"] if i % 2 == 0 else [] for i in range(100)]
    qemu.assert_clean(big)


class CountingMedium(MmapMedium):
    read_bytes = 0

    def read(self, off: int, n: int) -> bytes:
        CountingMedium.read_bytes += n
        return super().read(off, n)

    def array(self, off: int, count: int, dtype: str) -> "object":
        import numpy as np
        CountingMedium.read_bytes += count * np.dtype(dtype).itemsize
        return super().array(off, count, dtype)


def test_listing_reads_only_metadata(big: Path) -> None:
    CountingMedium.read_bytes = 0
    with Image(big, "r", medium=CountingMedium(big, False)) as img:
        assert len(img.bitmaps) == 100
        assert img.info().virtual_size == 16 * TiB
    # Header cluster, refcount table, L1 (256 KiB for 16 TiB), directory and 100 tables.
    assert CountingMedium.read_bytes < 2 << 20, CountingMedium.read_bytes


def test_listing_peak_rss_under_64_mib(big: Path) -> None:
    # VmHWM is the peak of this process's own address space; ru_maxrss would also
    # count the forked copy of pytest that exec replaced.
    code = ("import json, re, qjournal\n"
            f"img = qjournal.open({str(big)!r})\n"
            "names = list(img.bitmaps); info = img.info().to_json(); img.close()\n"
            "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
            "print(json.dumps([len(names), hwm]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    n, rss_kib = json.loads(out)
    assert n == 100
    assert rss_kib < 64 * 1024, f"peak RSS {rss_kib} KiB"


class TestLimits:
    def test_65535_bitmaps_at_most(self, tmp_path: Path) -> None:
        p = qemu.create(tmp_path / "l.qcow2", "1M")
        before = p.read_bytes()
        with qjournal.open(p, "r+") as img:
            with pytest.raises(qjournal.BitmapError, match="65535"):
                with img.transaction() as tx:
                    tx.entries.extend(bm.DirectoryEntry(f"{i}", 0, 0, 0, 16) for i in range(65535))
                    img.bitmaps.add("one-too-many")
        assert p.read_bytes() == before

    def test_directory_size_limit(self, tmp_path: Path) -> None:
        p = qemu.create(tmp_path / "l.qcow2", "1M")
        entry = bm.DirectoryEntry("n" * 1023, 0, 0, 0, 16)
        fits = bm.MAX_DIRECTORY_SIZE // entry.packed_size
        with qjournal.open(p, "r+") as img:
            with pytest.raises(qjournal.BitmapError, match="directory would exceed"):
                with img.transaction() as tx:
                    tx.entries.extend(attrs.evolve(entry, name=f"{i:04d}" + "n" * 1019) for i in range(fits))
                    img.bitmaps.add("m" * 1023)

    def test_bitmap_over_512_mib_refused(self, tmp_path: Path) -> None:
        p = qemu.create(tmp_path / "huge.qcow2", "4T")  # 2^33 bits at 512 B: 1 GiB of bitmap
        with qjournal.open(p, "r+") as img:
            with pytest.raises(qjournal.BitmapError, match="512"):
                img.bitmaps.add("fine-grained", 512)
        assert qemu.bitmaps(p) == []


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_scattered_reads_through_the_map_stay_bounded(tmp_path: Path) -> None:
    """Small reads all over a cached file (a check reading every L2 table of 2M clusters)
    fault in their pages and, through the kernel's fault-around, their neighbours: the map's
    pages are dropped from the process after about RESIDENT_MAX bytes of reads, so the
    file-backed resident size stays near that, not near the file's size."""
    p = tmp_path / "f"
    chunk = b"\x5a" * (1 << 20)
    with open(p, "wb") as f:
        for _ in range(256):
            f.write(chunk)
    p.read_bytes()                                           # the whole file in the page cache
    m = MmapMedium(p, writable=False)
    try:
        before = _rss_file_kib()
        for off in range(0, 256 << 20, 16 << 10):
            assert m.read(off, 8) == b"\x5a" * 8
        grown = _rss_file_kib() - before
    finally:
        m.close()
    assert grown < 2 * (medium_mod.RESIDENT_MAX >> 10), f"{grown} KiB of the 256 MiB file resident"

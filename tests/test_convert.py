"""``qjournal convert`` against ``qemu-img convert``.

Oracle: real QEMU 7.2. Every result is checked with ``qemu-img compare`` (same guest
bytes as the source) and, for qcow2 targets, ``qemu-img check`` (clean); where the
layout is meant to match, against what ``qemu-img convert`` makes of the same source
(``qemu-img map`` allocation, ``qemu-img info`` keys, ``st_blocks``). Bitmaps are
compared through ``qemu-nbd -B`` dirty extents, compressed clusters through
``qemu-img check``'s counter and ``qemu-io`` reading patterns back.
"""
from __future__ import annotations

import ctypes
import fcntl
import json
import mmap
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest

import damage
import qemu
from qjournal.cli.app import main
from qjournal.write.stream import DIRECT_ALIGN, DataSink

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def qj(*args: str | Path) -> int:
    return main([str(a) for a in args])


def compare(a: Path, b: Path) -> None:
    res = qemu.qemu_img("compare", "-U", str(a), str(b), check=False)
    assert res.returncode == 0, f"qemu-img compare {a} {b}: {res.stdout}{res.stderr}"


def data_map(path: Path, fmt: str = "qcow2") -> list[tuple[int, int, bool]]:
    """qemu-img map's (start, length, data) runs, offsets and depth left out."""
    out: list[tuple[int, int, bool]] = []
    for e in json.loads(qemu.qemu_img("map", "-f", fmt, "--output=json", str(path)).stdout):
        if out and out[-1][2] == e["data"] and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], e["data"])
        else:
            out.append((e["start"], e["length"], e["data"]))
    return out


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 MiB: data, a zero cluster written as data, a zeroed range, a partial cluster,
    a 16 KiB run of zeros inside data, and data in the last cluster."""
    d = tmp_path_factory.mktemp("convert-src")
    p = qemu.create(d / "src.qcow2", "64M")
    qemu.qemu_io(p, "write -P 0xab 0 3M", "write -P 0 8M 1M", "write -P 0x11 20M 100k", "write -z 30M 1M",
                 "write -P 0x5a 40M 1M", "write -P 0 42205184 16k", "write -P 0x77 67104768 4k")
    return p


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


class TestDirections:
    def test_qcow2_to_raw_is_sparse_as_qemu_img(self, src: Path, tmp: Path) -> None:
        assert qj("convert", "-O", "raw", src, tmp / "ours.raw") == 0
        qemu.qemu_img("convert", "-O", "raw", str(src), str(tmp / "theirs.raw"))
        compare(src, tmp / "ours.raw")
        assert os.path.getsize(tmp / "ours.raw") == 64 * MIB
        assert data_map(tmp / "ours.raw", "raw") == data_map(tmp / "theirs.raw", "raw")
        # Same holes; st_blocks also counts the file system's extent blocks (a few KiB either way).
        assert os.stat(tmp / "ours.raw").st_blocks <= os.stat(tmp / "theirs.raw").st_blocks + 16

    def test_raw_to_qcow2_allocates_what_qemu_img_allocates(self, src: Path, tmp: Path) -> None:
        qemu.qemu_img("convert", "-O", "raw", str(src), str(tmp / "src.raw"))
        assert qj("convert", "-f", "raw", "-O", "qcow2", tmp / "src.raw", tmp / "ours.qcow2") == 0
        qemu.qemu_img("convert", "-f", "raw", "-O", "qcow2", str(tmp / "src.raw"), str(tmp / "theirs.qcow2"))
        compare(tmp / "src.raw", tmp / "ours.qcow2")
        ours = qemu.assert_clean(tmp / "ours.qcow2")
        # The same clusters allocated (qemu-img map of QEMU's result also shows the holes
        # it left inside a cluster's host file range, so maps are compared by cluster).
        assert ours["allocated-clusters"] == qemu.assert_clean(tmp / "theirs.qcow2")["allocated-clusters"]
        assert [e[:2] for e in data_map(tmp / "ours.qcow2") if e[2]] == [(0, 3 * MIB),
                                                                       (20 * MIB, 128 << 10), (40 * MIB, MIB),
                                                                       (64 * MIB - (64 << 10), 64 << 10)]

    @pytest.mark.parametrize("opts", ["compat=0.10", "extended_l2=on", "refcount_bits=1", "cluster_size=512",
                                      "cluster_size=2M,refcount_bits=64", "lazy_refcounts=on,cluster_size=4k"])
    def test_qcow2_to_qcow2_with_create_options(self, src: Path, tmp: Path, opts: str) -> None:
        assert qj("convert", "-O", "qcow2", "-o", opts, src, tmp / "ours.qcow2") == 0
        qemu.qemu_img("convert", "-O", "qcow2", "-o", opts, str(src), str(tmp / "theirs.qcow2"))
        compare(src, tmp / "ours.qcow2")
        qemu.assert_clean(tmp / "ours.qcow2")
        ours, theirs = qemu.info(tmp / "ours.qcow2"), qemu.info(tmp / "theirs.qcow2")
        for key in ("virtual-size", "cluster-size"):
            assert ours[key] == theirs[key]
        assert ours["format-specific"]["data"] == theirs["format-specific"]["data"]
        assert data_map(tmp / "ours.qcow2") == data_map(tmp / "theirs.qcow2")

    def test_a_backing_chain_is_flattened(self, tmp: Path) -> None:
        base = qemu.create(tmp / "base.qcow2", "16M")
        qemu.qemu_io(base, "write -P 0x22 0 4M")
        top = tmp / "top.qcow2"
        qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
        qemu.qemu_io(top, "write -P 0x44 1M 128k", "write -z 2M 64k")
        assert qj("convert", "-O", "qcow2", top, tmp / "flat.qcow2") == 0
        compare(top, tmp / "flat.qcow2")
        assert "backing-filename" not in qemu.info(tmp / "flat.qcow2")
        qemu.qemu_io(tmp / "flat.qcow2", "read -P 0x22 0 1M", "read -P 0x44 1M 128k", "read -P 0 2M 64k")


class TestSparse:
    def test_S0_allocates_the_whole_raw_file(self, src: Path, tmp: Path) -> None:
        assert qj("convert", "-S", "0", "-O", "raw", src, tmp / "full.raw") == 0
        compare(src, tmp / "full.raw")
        assert os.stat(tmp / "full.raw").st_blocks * 512 >= 64 * MIB

    def test_a_larger_S_keeps_short_zero_runs(self, src: Path, tmp: Path) -> None:
        assert qj("convert", "-O", "raw", src, tmp / "4k.raw") == 0
        assert qj("convert", "-S", "64k", "-O", "raw", src, tmp / "64k.raw") == 0
        compare(src, tmp / "64k.raw")
        # The 16 KiB zero run at 40M + 256k is a hole with -S 4k, data with -S 64k.
        diff = (os.stat(tmp / "64k.raw").st_blocks - os.stat(tmp / "4k.raw").st_blocks) * 512
        assert diff >= 16 << 10

    PEAK = ("import sys; from qjournal.cli import main; code = main(sys.argv[1:]); "
            "sys.stderr.write([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]); sys.exit(code)")

    def test_a_1TiB_sparse_disk_streams_in_bounded_memory(self, tmp: Path) -> None:
        big = qemu.create(tmp / "big.qcow2", "1T")
        qemu.qemu_io(big, "write -P 5 512G 1M", "write -P 6 1099511562240 64k")
        for fmt, out in (("qcow2", tmp / "out.qcow2"), ("raw", tmp / "out.raw")):
            # The command reports its own peak (VmHWM of its address space): a child's
            # ru_maxrss also counts the test process it was forked from.
            res = subprocess.run([sys.executable, "-c", self.PEAK, "convert", "-O", fmt, str(big), str(out)],
                                 env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
            assert res.returncode == 0, res.stderr
            peak = int(res.stderr.rsplit("VmHWM:", 1)[1].split()[0])
            assert peak < 200 << 10, f"-O {fmt}: peak RSS {peak} KiB"
            assert os.stat(out).st_blocks * 512 < 16 * MIB
        qemu.assert_clean(tmp / "out.qcow2")
        qemu.qemu_io(tmp / "out.qcow2", "read -P 5 512G 1M", "read -P 6 1099511562240 64k", "read -P 0 0 1M")
        compare(big, tmp / "out.raw")


class TestCompressed:
    @pytest.mark.parametrize("ctype", ["zlib", "zstd"])
    def test_compressed_clusters_read_back(self, src: Path, tmp: Path, ctype: str) -> None:
        out = tmp / "c.qcow2"
        assert qj("convert", "-c", "-m", "2", "-O", "qcow2", "-o", f"compression_type={ctype}", src, out) == 0
        qemu.qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", str(src),
                      str(tmp / "theirs.qcow2"))
        compare(src, out)
        clean = qemu.assert_clean(out)
        assert clean["compressed-clusters"] == qemu.assert_clean(tmp / "theirs.qcow2")["compressed-clusters"] > 0
        assert qemu.info(out)["format-specific"]["data"]["compression-type"] == ctype
        qemu.qemu_io(out, "read -P 0xab 0 3M", "read -P 0x11 20M 100k", "read -P 0x77 67104768 4k")
        assert os.path.getsize(out) < os.path.getsize(tmp / "theirs.qcow2") + 256 * 1024

    def test_narrow_refcounts_never_overflow(self, src: Path, tmp: Path) -> None:
        # With 1-bit refcounts no two compressed clusters may share a host cluster.
        out = tmp / "c1.qcow2"
        assert qj("convert", "-c", "-O", "qcow2", "-o", "refcount_bits=1,cluster_size=4k", src, out) == 0
        compare(src, out)
        qemu.assert_clean(out)


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (mincore(2) over a read-only map of it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        a = np.frombuffer(m, dtype=np.uint8)
        rc = libc.mincore(ctypes.c_void_p(a.ctypes.data), ctypes.c_size_t(size), vec)
        del a
    assert rc == 0, os.strerror(ctypes.get_errno())
    return sum(v & 1 for v in vec) * mmap.PAGESIZE


def direct_io_works(directory: Path) -> bool:
    probe = directory / ".direct-probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


class TestDataPath:
    """Bulk data goes to a new target with O_DIRECT, from a writer thread (oracle: mincore
    and qemu-img compare)."""

    @pytest.mark.parametrize("fmt, sparse", [("raw", "4k"), ("raw", "0"), ("qcow2", "4k")])
    def test_a_new_target_leaves_no_copy_of_the_disk_in_the_page_cache(self, src: Path, tmp: Path,
                                                                     fmt: str, sparse: str) -> None:
        out = tmp / f"out.{fmt}"
        assert qj("convert", "-S", sparse, "-O", fmt, src, out) == 0
        resident = resident_bytes(out)   # before anything reads the target
        compare(src, out)
        data = sum(n for _, n, is_data in data_map(out, fmt) if is_data)
        assert data >= 4 * MIB
        if direct_io_works(tmp):
            assert resident < MIB   # headers and tables at most
        else:                       # plain writes: the data went through the cache
            assert resident >= data

    def test_a_sink_writes_aligned_pages_directly_and_the_rest_plainly(self, tmp: Path) -> None:
        path = tmp / "f"
        path.write_bytes(b"")
        fd = os.open(path, os.O_RDWR)
        aligned = mmap.mmap(-1, 4 * DIRECT_ALIGN)
        aligned[:] = bytes(range(256)) * (len(aligned) // 256)
        sink = DataSink(fd, str(path), background=True)
        try:
            sink.write(memoryview(aligned), DIRECT_ALIGN)            # whole pages: direct
            sink.write(b"\x07" * 100, 10)                           # unaligned: plain
            sink.write(memoryview(aligned)[1:DIRECT_ALIGN + 1], 8 * DIRECT_ALIGN)  # unaligned buffer: plain
            sink.wait()
            assert (sink.direct >= 0) == direct_io_works(tmp)
        finally:
            sink.close()
            os.close(fd)
        got = path.read_bytes()
        assert got[10:110] == b"\x07" * 100 and got[:10] == bytes(10)
        assert got[DIRECT_ALIGN:5 * DIRECT_ALIGN] == aligned[:]
        assert got[8 * DIRECT_ALIGN:] == aligned[1:DIRECT_ALIGN + 1]

    def test_a_failed_background_write_is_raised_by_wait(self, tmp: Path) -> None:
        path = tmp / "ro"
        path.write_bytes(b"")
        fd = os.open(path, os.O_RDONLY)
        sink = DataSink(fd, background=True)
        try:
            sink.write(b"x" * 10, 0)
            with pytest.raises(OSError):
                sink.wait()
        finally:
            sink.close()
            os.close(fd)


class TestExistingTargets:
    def test_n_into_qcow2_overwrites_data_and_zeros(self, src: Path, tmp: Path) -> None:
        t = qemu.create(tmp / "t.qcow2", "64M")
        qemu.qemu_io(t, "write -P 0x99 0 64M")
        assert qj("convert", "-n", "-O", "qcow2", src, t) == 0
        compare(src, t)
        qemu.assert_clean(t)

    def test_n_into_raw_overwrites_data_and_zeros(self, src: Path, tmp: Path) -> None:
        t = tmp / "t.raw"
        t.write_bytes(b"\x77" * (64 * MIB))
        assert qj("convert", "-n", src, t) == 0
        compare(src, t)

    def test_n_S0_into_raw_zeroes_what_the_source_reads_as_zeros(self, src: Path, tmp: Path) -> None:
        t = tmp / "t.raw"
        t.write_bytes(b"\x77" * (64 * MIB))
        assert qj("convert", "-n", "-S", "0", src, t) == 0
        compare(src, t)

    def test_an_existing_target_without_n_is_replaced(self, src: Path, tmp: Path) -> None:
        t = tmp / "old.qcow2"
        t.write_bytes(b"not an image")
        assert qj("convert", "-O", "qcow2", src, t) == 0
        compare(src, t)
        assert not [p for p in os.listdir(tmp) if p.endswith(".tmp")]


    def test_a_target_in_use_is_refused_and_kept(self, src: Path, tmp: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
        t = qemu.create(tmp / "busy.qcow2", "1M")
        before = t.read_bytes()
        with qemu.held_for_writing(t):
            assert qj("convert", "-O", "qcow2", src, t) == 1
        assert "lock" in capsys.readouterr().err.lower()
        assert t.read_bytes() == before
        assert sorted(os.listdir(tmp)) == ["busy.qcow2"]


class TestBacking:
    def test_B_writes_only_what_differs(self, tmp: Path) -> None:
        base = qemu.create(tmp / "base.qcow2", "16M")
        qemu.qemu_io(base, "write -P 0x22 0 4M", "write -P 0x33 8M 1M")
        top = tmp / "top.qcow2"
        qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
        qemu.qemu_io(top, "write -P 0x44 1M 128k", "write -z 8M 64k")
        out = tmp / "ov.qcow2"
        assert qj("convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", top, out) == 0
        compare(top, out)
        qemu.assert_clean(out)
        info = qemu.info(out)
        assert info["backing-filename"] == "base.qcow2" and info["backing-filename-format"] == "qcow2"
        own = [(e["start"], e["length"], e["zero"]) for e in
               json.loads(qemu.qemu_img("map", "--output=json", str(out)).stdout) if e["depth"] == 0 and e["present"]]
        assert own == [(1 * MIB, 128 << 10, False), (8 * MIB, 64 << 10, True)]


class TestBitmaps:
    def test_bitmaps_are_carried_across(self, src: Path, tmp: Path) -> None:
        b = tmp / "bm.qcow2"
        qemu.qemu_img("convert", "-O", "qcow2", str(src), str(b))
        qemu.qemu_img("bitmap", "--add", "-g", "64k", str(b), "b1")
        qemu.qemu_img("bitmap", "--add", "--disable", "-g", "128k", str(b), "b2")
        qemu.qemu_io(b, "write -P 1 5M 200k")
        qemu.qemu_img("bitmap", "--enable", str(b), "b2")
        qemu.qemu_io(b, "write -P 2 33M 1k")
        out = tmp / "out.qcow2"
        assert qj("convert", "--bitmaps", "-O", "qcow2", "-o", "cluster_size=4k", b, out) == 0
        qemu.qemu_img("convert", "--bitmaps", "-O", "qcow2", "-o", "cluster_size=4k", str(b),
                      str(tmp / "theirs.qcow2"))
        compare(b, out)
        qemu.assert_clean(out)
        assert qemu.bitmaps(out) == qemu.bitmaps(tmp / "theirs.qcow2")
        for name in ("b1", "b2"):
            assert qemu.nbd_dirty_extents(out, name) == qemu.nbd_dirty_extents(b, name) != []
        assert not (tmp / "out.qcow2.qjournal").exists()


class TestCrashSafety:
    def test_a_failure_midway_leaves_the_old_target(self, tmp: Path) -> None:
        d = tmp / "d"
        d.mkdir()
        p = damage.fresh(d)
        damage.poke64(p, damage.l2_pos(p, 14 * MIB), damage.u64(p, damage.l2_pos(p, 14 * MIB)) | 0x2)  # reserved bit
        t = tmp / "t.qcow2"
        qemu.create(t, "1M")
        before = t.read_bytes()
        assert qj("convert", "-O", "qcow2", p, t) != 0
        assert t.read_bytes() == before
        assert sorted(os.listdir(tmp)) == ["d", "t.qcow2"]


class TestCommandLine:
    @pytest.mark.parametrize("argv, message", [
        (["missing.qcow2", "x.raw"], "could not open 'missing.qcow2'"),
        (["-O", "vmdk", "SRC", "x.vmdk"], "-O 'vmdk'"),
        (["-n", "SRC", "absent.raw"], "could not open 'absent.raw'"),
        (["-c", "SRC", "x.raw"], "-c: needs -O qcow2"),
        (["-S", "100", "SRC", "x.raw"], "-S 100"),
        (["LOOP", "x.raw"], "loops back"),
    ])
    def test_bad_input_is_one_line_and_exit_1(self, src: Path, tmp: Path, argv: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
        a, b = tmp / "a.qcow2", tmp / "b.qcow2"
        qemu.create(a, "1M")
        qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", str(b))
        qemu.qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", str(a))
        names = {"SRC": str(src), "LOOP": str(b)}
        os.chdir(tmp)
        assert qj("convert", *[names.get(x, x) for x in argv]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("qjournal: ") and message in err, err
        assert not (tmp / "x.raw").exists()

    def test_progress_only_on_a_terminal(self, src: Path, tmp: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        argv = [sys.executable, "-m", "qjournal", "convert", "-p", "-O", "raw", str(src)]
        quiet = subprocess.run(argv + [str(tmp / "q.raw")], env=env, capture_output=True, text=True)
        assert quiet.returncode == 0 and quiet.stderr == ""
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))   # a terminal 80 wide
        try:
            proc = subprocess.run(argv + [str(tmp / "t.raw")], env=env, stdout=subprocess.DEVNULL, stderr=slave)
            os.close(slave)
            seen = b""
            while True:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                seen += chunk
        finally:
            os.close(master)
        assert proc.returncode == 0
        assert b"convert" in seen and b"MiB" in seen

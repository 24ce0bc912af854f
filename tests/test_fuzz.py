"""Mutation fuzz over qemu-made images of every create option (the fuzzer is
``tests/fuzz.py``; its docstring lists the rules each case must hold), and the
regression tests of the crashes it found.

CI runs ``QJ_FUZZ_CASES`` cases (default 70, about 25 s on a loaded machine) of the fixed seed; the
long run is ``python -m tests.fuzz --cases 100000``. Oracle: the rules themselves (exit
code, one-line error, byte-identical file, time, tracemalloc peak) and, for the
regressions, ``qemu-img``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

import fuzz
import qemu
import qjournal
from qjournal.cli import main

CASES = int(os.environ.get("QJ_FUZZ_CASES", "70"))
EXT_DATA_FILE = 0x44415441


def qj(*args: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


class TestFuzz:
    def test_corpus_covers_every_create_option(self, tmp_path: Path) -> None:
        opts = " ".join(" ".join(s[1]) for s in fuzz.SPECS)
        for want in ("compat=0.10", "lazy_refcounts=on", "extended_l2=on", "compression_type=zstd",
                     "compression_type=zlib", "backing_file=", "data_file=", "data_file_raw=on"):
            assert want in opts
        assert {f"refcount_bits={b}" for b in (1, 2, 4, 8, 32, 64, 16)} <= set(opts.replace(",", " ").split())
        assert {512, 2 << 20} <= {int(o.split("=")[1]) for s in fuzz.SPECS for o in s[1]
                                  if o.startswith("cluster_size=")}
        assert any(s[4] for s in fuzz.SPECS) and any(s[5] for s in fuzz.SPECS)
        assert any("write -c" in w for s in fuzz.SPECS for w in s[3])

    def test_seeded_cases(self, tmp_path: Path) -> None:
        (tmp_path / "corpus").mkdir()
        (tmp_path / "work").mkdir()
        bases = fuzz.build_corpus(tmp_path / "corpus")
        # Every kind of structure is a target in some image.
        kinds = {t.what.split("[")[0].split(".")[0] for b in bases for t in b.targets}
        assert {"header", "l1", "l2", "reftable", "refblock", "bitmaps", "bitmap", "snapshot"} <= kinds, kinds
        failures, opened = [], 0
        for i, failure, what, info in fuzz.cases(bases, fuzz.SEED, 0, CASES, tmp_path / "work"):
            if failure:
                failures.append(f"case {i} ({what}): {failure}")
            opened += info == 0
        assert not failures, "\n".join(failures)
        # Both paths are exercised: images qjournal opens, and images it refuses.
        assert CASES // 10 < opened < CASES - CASES // 10, opened


class TestRegressions:
    """Crashes the fuzz found, each on a qemu-made image damaged in one way."""

    def test_data_file_name_with_nul_bytes_ends_at_the_first(self, tmp_path: Path) -> None:
        # The extension's length covers its padding: QEMU reads the name as a C string.
        img = tmp_path / "d.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", str(img), "4M"],
                       cwd=tmp_path, check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 64k", str(img)], cwd=tmp_path, check=True,
                       capture_output=True)
        raw = bytearray(img.read_bytes())
        off = 104 + 8  # v3 header_length is 112 for qemu-made images
        while struct.unpack_from(">I", raw, off)[0] != EXT_DATA_FILE:
            off += 8 + (struct.unpack_from(">I", raw, off + 4)[0] + 7 & ~7)
        struct.pack_into(">I", raw, off + 4, 8)  # "d.raw" + its NUL padding
        img.write_bytes(raw)
        want = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(img)], cwd=tmp_path, check=True,
                                         capture_output=True, text=True).stdout)
        code, out, err = qj("map", "--output=json", img)
        assert (code, err) == (0, "")
        assert [(e["start"], e["length"], e["data"]) for e in json.loads(out)] == \
            [(e["start"], e["length"], e["data"]) for e in want]
        assert qj("read", "-P", "7", img, 0, 65536)[0] == 0
        assert img.read_bytes() == raw

    def test_backing_name_with_nul_bytes_ends_at_the_first(self, tmp_path: Path) -> None:
        base = qemu.create(tmp_path / "base.qcow2", "4M")
        qemu.qemu_io(base, "write -P 9 0 64k")
        img = tmp_path / "top.qcow2"
        qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(img))
        raw = bytearray(img.read_bytes())
        size_at = 16
        struct.pack_into(">I", raw, size_at, struct.unpack_from(">I", raw, size_at)[0] + 3)
        img.write_bytes(raw)  # the name now ends in NUL bytes (the cluster's zeros)
        assert qemu.info(img)["backing-filename"] == "base.qcow2"
        code, out, err = qj("info", "--output=json", img)
        assert (code, err) == (0, "")
        assert json.loads(out)["backing-filename"] == "base.qcow2"
        assert qj("read", "-P", "9", img, 0, 65536)[0] == 0
        assert img.read_bytes() == raw

    def test_refcount_block_that_is_a_bitmap_table_refuses_writes(self, tmp_path: Path) -> None:
        # Fuzz case 760: the refcount table's entry 0 names the cluster of a bitmap table.
        # The garbage "refcounts" called clusters free that guest data used; a write put its
        # data there, then its commit was refused: a refused write had changed the image.
        img = qemu.create(tmp_path / "s.qcow2", "16M", "cluster_size=4096", "refcount_bits=8")
        qemu.qemu_img("bitmap", "--add", "-g", "4096", str(img), "b0")
        qemu.qemu_io(img, "write -P 6 0 64k")
        raw = bytearray(img.read_bytes())
        rt_offset, = struct.unpack_from(">Q", raw, 48)
        ext = 112  # qemu-made v3 header_length: the bitmaps extension comes first
        assert struct.unpack_from(">I", raw, ext)[0] == fuzz.EXT_BITMAPS
        dir_offset, = struct.unpack_from(">Q", raw, ext + 8 + 16)
        table_offset, = struct.unpack_from(">Q", raw, dir_offset)
        struct.pack_into(">Q", raw, rt_offset, table_offset)
        img.write_bytes(raw)
        for args in (("write", img, 12 << 20, "-P", "0x5a", 65536), ("bitmap", "--add", img, "x")):
            code, _, err = qj(*args)
            assert code == 1 and err.count("\n") == 1, err
            assert img.read_bytes() == raw, f"{args[0]} changed the image"
            if args[0] == "write":
                assert "is both the bitmap table of 'b0' and the refcount block" in err, err
        assert qj("read", "-P", "6", img, 0, 65536)[0] == 0

    def test_repair_never_writes_a_snapshot_l1_table_over_the_header(self, tmp_path: Path) -> None:
        # Fuzz case 2590: a snapshot's L1 table offset set to 0. check -r all "repaired" the
        # entries of that L1 table, which are the header's bytes: the image lost its magic.
        img = qemu.create(tmp_path / "s.qcow2", "4M", "compat=0.10", "cluster_size=512")
        qemu.qemu_io(img, "write -P 1 0 8k")
        qemu.qemu_img("snapshot", "-c", "s1", str(img))
        qemu.qemu_io(img, "write -P 2 0 4k")
        raw = bytearray(img.read_bytes())
        snapshots_offset, = struct.unpack_from(">Q", raw, 64)
        struct.pack_into(">Q", raw, snapshots_offset, 0)
        img.write_bytes(raw)
        code, _, err = qj("check", "-r", "all", img)
        assert code == 1 and err.count("\n") == 1, err
        assert "is both the header cluster and the L1 table of snapshot 's1'" in err, err
        assert img.read_bytes() == raw
        assert qj("read", "-P", "2", img, 0, 4096)[0] == 0

    def test_zeroes_that_would_free_a_cluster_of_refcount_0_are_refused_before_any_write(self, tmp_path: Path) -> None:
        # The sibling of fuzz case 83108: zeroing a whole cluster releases what it maps; with
        # a refcount of 0 there the commit's free step refused after the edges' zeros were
        # written in place. Now refused up front; an overwrite in place releases nothing.
        img = qemu.create(tmp_path / "z.qcow2", "1M", "cluster_size=4096", "refcount_bits=16")
        qemu.qemu_io(img, "write -P 3 0 64k")
        raw = bytearray(img.read_bytes())
        rt_offset, l1_offset = struct.unpack_from(">Q", raw, 48)[0], struct.unpack_from(">Q", raw, 40)[0]
        rb_offset, = struct.unpack_from(">Q", raw, rt_offset)
        l2_offset = struct.unpack_from(">Q", raw, l1_offset)[0] & fuzz.L2_OFFSET_MASK
        data = struct.unpack_from(">Q", raw, l2_offset + 8)[0] & fuzz.L2_OFFSET_MASK   # guest cluster 1
        struct.pack_into(">H", raw, rb_offset + 2 * (data // 4096), 0)
        img.write_bytes(raw)
        with qjournal.open(img, "r+") as image:
            with pytest.raises(qjournal.FormatError, match=f"cluster {data:#x} has refcount 0, but the write would"):
                image.write_zeroes(2048, 8192)
        assert img.read_bytes() == raw
        assert qj("write", img, 4096, "-P", "0x5a", 4096)[0] == 0
        assert qj("read", "-P", "0x5a", img, 4096, 4096)[0] == 0

    @pytest.mark.parametrize("name, index", [("datafile-raw", 2561), ("64k-zlib", 49), ("r64-16k-l2x", 4402),
                                             ("r64-16k-l2x", 11094), ("datafile-raw", 7279), ("r64-16k-l2x", 4430),
                                             ("2m", 10930), ("64k-zlib", 16107), ("r64-16k-l2x", 28496),
                                             ("2m", 54680), ("256k-l2x-zstd", 76000), ("256k-l2x-zstd", 41000),
                                             ("2m", 69100), ("2m", 87090), ("r8-4k", 83108),
                                             ("256k-l2x-zstd", 99170)])
    def test_cases_that_failed_once_pass(self, tmp_path: Path, name: str, index: int) -> None:
        # Replayed: 2561 and 49, check -r all wrote its new refcount structure past the end
        # of the file, then its switch was refused, and the file stayed longer; 4402 and
        # 11094, a snapshot id or name of 0xffff bytes that are not UTF-8 made info fail
        # (written back from the replacement characters, 65535 bytes grew past a u16);
        # 7279, a data file name with a newline made a two-line error; 4430, a snapshot L1
        # table of 16384 entries naming the same few tables made check decode 64 MiB chunks
        # of them (349 MiB peak for a 1 MiB file); 10930, check -r all on 2 MiB clusters
        # planned its header switch with an 8-byte sector index per byte of cluster 0 (51 MiB
        # peak, bound 40); 16107, check -r all repaired refcounts, then refused the header
        # switch of its snapshot table completion (a snapshot L1 table on cluster 0), and
        # exited 1 with the file changed: it now refuses before the first write; 28496, a
        # write over an L2 entry mapping a cluster past the end of the file wrote its other
        # clusters in place, then was refused at the commit: now refused up front; 54680 and
        # 76000, refcount_order set to 1 or 2 made check decode whole refcount blocks of
        # narrow counts into int64 (8 Mi counts for 2 MiB clusters: 212 MiB peak, bound 40;
        # 14 MiB, bound 9): it now decodes only the counts of clusters it looks at; 41000, a
        # guest size of 4 GiB made map classify a whole extended L2 table of 256 KiB clusters
        # at once (512 Ki subclusters, and two Python lists of them: 19 MiB, bound 9); 69100
        # and 87090 (refcount_order 0), the same whole-block decode in check and check -r all
        # (52 and 413 MiB, bound 40; 99170, 52 MiB, bound 9), and the rebuild packed its new
        # blocks from whole blocks of int64 counts; 87090's write then peaked at 37 MiB,
        # unpacking a whole 2 MiB bitmap cluster to set one bit (now 24 MiB); 83108, a write
        # that copies a snapshot's shared L2 table whose refcount is 0 wrote its data into a
        # free cluster, then was refused at the commit (the count would drop below zero):
        # now refused before anything is written.
        (tmp_path / "c").mkdir()
        (tmp_path / "w").mkdir()
        spec = [s for s in fuzz.SPECS if s[0] == name]
        saved = fuzz.SPECS[:]
        try:
            fuzz.SPECS[:] = spec
            base, = fuzz.build_corpus(tmp_path / "c")
        finally:
            fuzz.SPECS[:] = saved
        fuzz.case(base, fuzz.SEED, index, tmp_path / "w", memory=True)

"""Guest reads (`qjournal.guest.read`, `qjournal read`) against QEMU's own reads.

Oracle: `qemu-img convert -O raw` of the whole disk (QEMU's read of every byte) and
`qemu-io -c "read -P ..."` for unaligned windows. Images are made by qemu-img and
written by qemu-io only (pattern, zero, compressed writes and discards), over a matrix
of qemu-img create options; every qemu command runs in the image's folder, so that
relative backing and data file names resolve the same way for QEMU and for us.

The matrix and its builder live here; test_map.py and test_disk.py use them too.
"""
from __future__ import annotations

from contextlib import chdir

import contextlib
import io
import os
import random
import subprocess
from pathlib import Path

import attrs
import pytest
from hypothesis import assume, example, given, settings, strategies as st

import qjournal
from profiles import examples
from qjournal.cli import main
from qjournal.read import guest
from qjournal.read.copy import copy_out
from qjournal.errors import FormatError, UnsupportedError, UsageError

KiB, MiB = 1 << 10, 1 << 20


# -- building images with QEMU ---------------------------------------------------------
def run(cwd: Path, *cmd: str) -> str:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "failed" not in out and "error" not in out.lower(), f"{cmd}: {out}"
    return res.stdout


def qemu_io(cwd: Path, name: str, fmt: str, commands: tuple[str, ...]) -> None:
    """Run the commands in qemu-io; QEMU 7.2 refuses a compressed write over an
    allocated cluster, and only that refusal is let through.

    Each compressed write starts a new qemu-io, which runs the commands after it. Within one
    process QEMU 7.2 keeps packing compressed clusters into the host cluster it packed
    the last one into, even after a zero write has freed that cluster and a copy on write
    has taken it as a data cluster: with a backing file, ``write -c 0 4k``, ``write -z 0
    4097``, ``write -c 0 4k`` leave a COPIED data cluster with refcount 2, and with
    512-byte clusters QEMU's overlap check refuses the write (any cluster size; a fresh
    open starts a new host cluster, so separate processes build what the example means).

    The overlap check also refuses some compressed writes for a reason of its own, and
    then marks the image corrupt and fails every later write of the run ("No medium
    found"; seen with 4 KiB clusters: ``write -c 0 4k``, ``write 0 1``, ``write 2M 1``,
    ``write -c 0 8k``, after which ``qemu-img check`` finds no error). Such a run built no
    image the example meant: hypothesis drops it (``assume``)."""
    groups: list[list[str]] = []
    for c in commands:
        if not groups or c.startswith("write -c"):
            groups.append([])
        groups[-1].append(c)
    out = ""
    for group in groups:
        args = ["qemu-io", "-f", fmt]
        for c in group:
            args += ["-c", c]
        res = subprocess.run([*args, name], cwd=cwd, capture_output=True, text=True)
        out += res.stdout + res.stderr
    assume("Marking image as corrupt" not in out)
    refused = out.count("write failed: Input/output error")
    assert out.count("failed") == refused <= sum(c.startswith("write -c") for c in commands), f"{commands}: {out}"


@attrs.frozen
class Layer:
    """One file of a chain: ``fmt`` qcow2 (made by qemu-img create) or raw (exactly
    ``size`` bytes), then written by qemu-io."""

    fmt: str
    size: int
    opts: str = ""
    writes: tuple[str, ...] = ()


def build(d: Path, layers: list[Layer]) -> Path:
    """The chain, bottom first; layer ``i`` is ``l{i}.{fmt}`` with ``l{i-1}`` as its backing file."""
    name = ""
    for i, layer in enumerate(layers):
        prev, name = name, f"l{i}.{layer.fmt}"
        if layer.fmt == "raw":
            with open(d / name, "wb") as f:
                f.truncate(layer.size)
        else:
            args = ["qemu-img", "create", "-q", "-f", "qcow2"]
            if layer.opts:
                args += ["-o", layer.opts]
            if prev:
                args += ["-b", prev, "-F", layers[i - 1].fmt]
            run(d, *args, name, str(layer.size))
        if layer.writes:
            qemu_io(d, name, layer.fmt, layer.writes)
    return d / name


def convert(img: Path) -> bytes:
    """What QEMU reads from every byte of the guest disk."""
    out = img.parent / (img.name + ".converted")
    run(img.parent, "qemu-img", "convert", "-O", "raw", img.name, out.name)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def writes(cs: int, size: int, compress: bool = True) -> tuple[str, ...]:
    """Pattern, zero and compressed writes and discards, aligned and not, across
    cluster and L2-table boundaries."""
    cmds = [
        f"write -P 0x11 0 {3 * cs + 100}",
        f"write -P 0x22 {cs // 2 + 7} {cs}",
        f"write -z {5 * cs + 100} {2 * cs}",
        f"write -z {8 * cs} {cs}",
        f"write -P 0x44 {10 * cs} {4 * cs}",
        f"discard {11 * cs} {cs}",
        f"write -P 0x55 {size - cs - 77} {cs + 77}",  # the last bytes of the disk
    ]
    table_end = cs // 8 * cs  # where the first L2 table ends (standard entries)
    if table_end + cs < size:
        cmds.append(f"write -P 0x33 {table_end - cs // 2 - 3} {cs + 1001}")
    if compress:
        cmds += [f"write -c -P 0x66 {16 * cs} {cs}", f"write -c -P 0x67 {17 * cs} {2 * cs}",
                 f"write -c -P 0 {20 * cs} {cs}", f"write -P 0x68 {17 * cs + 5} 99"]
    return tuple(cmds)


def case(opts: str, size: int, cs: int, compress: bool = True) -> list[Layer]:
    return [Layer("qcow2", size, opts, writes(cs, size, compress))]


def over(base: list[Layer], top: Layer) -> list[Layer]:
    return [*base, top]


BASE_WRITES = (f"write -P 0xa1 0 {3 * MiB}", f"write -P 0xa2 {5 * MiB} {MiB + 3}")
TOP_WRITES = ("write -P 0xb1 100k 10000", f"write -z {1 * MiB + 512} 64k", f"write -P 0xb2 {5 * MiB - 4096} 8k",
              f"write -P 0xb3 {7 * MiB - 1} 3")

CASES: dict[str, list[Layer]] = {
    "cluster-512": case("cluster_size=512", 4 * MiB, 512),
    "cluster-4k": case("cluster_size=4096", 8 * MiB, 4096),
    "cluster-64k": case("", 16 * MiB, 64 * KiB),
    "cluster-2m": case("cluster_size=2M", 64 * MiB, 2 * MiB),
    "extended-l2": case("extended_l2=on", 16 * MiB, 64 * KiB),
    "extended-l2-16k": case("extended_l2=on,cluster_size=16k", 24 * MiB, 16 * KiB),
    "compat-0.10": case("compat=0.10", 16 * MiB, 64 * KiB),
    "zstd": case("compression_type=zstd,cluster_size=4k", 8 * MiB, 4096),
    "preallocation-metadata": case("preallocation=metadata,cluster_size=4k", 4 * MiB, 4096, compress=False),
    "data-file": case("data_file=data.raw", 16 * MiB, 64 * KiB, compress=False),
    "data-file-raw": case("data_file=data.raw,data_file_raw=on,cluster_size=4k", 8 * MiB, 4096,
                          compress=False),
    "backing-qcow2": over([Layer("qcow2", 8 * MiB, "cluster_size=4k", BASE_WRITES)],
                          Layer("qcow2", 8 * MiB, "", TOP_WRITES)),
    "backing-qcow2-shorter": over([Layer("qcow2", 4 * MiB, "", (f"write -P 0xa1 0 {4 * MiB}",))],
                                  Layer("qcow2", 8 * MiB, "cluster_size=4k", TOP_WRITES)),
    "backing-raw-shorter": over([Layer("raw", 5 * MiB + 1000, "", (f"write -P 0xa1 0 {MiB}",
                                                                   f"write -P 0xa2 {5 * MiB} 1000"))],
                                Layer("qcow2", 8 * MiB, "", TOP_WRITES)),
    "backing-extended-l2": over([Layer("qcow2", 8 * MiB, "", BASE_WRITES)],
                                Layer("qcow2", 8 * MiB, "extended_l2=on", TOP_WRITES)),
    "chain-of-three": [Layer("raw", 6 * MiB, "", (f"write -P 0xc1 {MiB} {2 * MiB}",)),
                       Layer("qcow2", 7 * MiB, "cluster_size=512", BASE_WRITES[:1] + ("write -z 2M 4k",)),
                       Layer("qcow2", 8 * MiB, "extended_l2=on,compression_type=zstd",
                             TOP_WRITES + ("write -c -P 0xd1 6M 64k",))],
}


_BUILT: dict[str, Path] = {}
_CONVERTED: dict[str, bytes] = {}


def matrix(factory: pytest.TempPathFactory) -> tuple[dict[str, Path], dict[str, bytes]]:
    """Every case of the matrix, built once per session (test_map.py and test_disk.py
    share it): name -> top image, and name -> what QEMU reads from it."""
    if not _BUILT:
        for name, layers in CASES.items():
            _BUILT[name] = build(factory.mktemp(name), layers)
            _CONVERTED[name] = convert(_BUILT[name])
    return _BUILT, _CONVERTED






def read_all(img: Path) -> bytes:
    with qjournal.open(img) as q:
        return guest.read(q, 0, q.header.size)


# -- the matrix -------------------------------------------------------------------------
class TestWholeDisk:
    @pytest.mark.parametrize("name", CASES)
    def test_equals_qemu_img_convert(self, name: str, images: dict[str, Path], converted: dict[str, bytes]) -> None:
        assert read_all(images[name]) == converted[name]

    @pytest.mark.parametrize("name", CASES)
    def test_unaligned_windows(self, name: str, images: dict[str, Path], converted: dict[str, bytes]) -> None:
        """Seeded windows of every alignment agree with the conversion, and the uniform
        ones with qemu-io read -P."""
        ref = converted[name]
        rng = random.Random(name)
        probes: list[str] = []
        with qjournal.open(images[name]) as q:
            for _ in range(300):
                off = rng.randrange(len(ref))
                n = rng.choice([1, 3, 511, 513, 4095, 70000, 300000])
                n = min(n, len(ref) - off)
                got = guest.read(q, off, n)
                assert got == ref[off:off + n], (off, n)
                if len(probes) < 40 and got == got[:1] * n:
                    probes.append(f"read -P {got[0]:#x} {off} {n}")
        qemu_io(images[name].parent, images[name].name, "qcow2", tuple(probes))


# -- semantics ---------------------------------------------------------------------------
class TestRequests:
    def test_range_checks(self, images: dict[str, Path]) -> None:
        with qjournal.open(images["cluster-4k"]) as q:
            size = q.header.size
            assert guest.read(q, size, 0) == b""
            assert guest.read(q, 5, 0) == b""
            for off, n in ((size - 1, 2), (-1, 1), (0, -1), (size + 1, 0)):
                with pytest.raises(UsageError, match="outside"):
                    guest.read(q, off, n)

    def test_image_read_is_guest_read(self, images: dict[str, Path], converted: dict[str, bytes]) -> None:
        with qjournal.open(images["backing-qcow2"]) as q:
            assert q.read(MiB - 5, 10000) == converted["backing-qcow2"][MiB - 5:MiB - 5 + 10000]

    def test_reader_sees_a_reloaded_image(self, tmp_path: Path) -> None:
        """A reader kept for an image keeps its L2 tables until the image reloads (as it
        does after every transaction), then reads the new mapping."""
        img = build(tmp_path, [Layer("qcow2", 4 * MiB, "", ("write -P 0x11 0 64k", "write -P 0x22 64k 64k"))])
        with qjournal.open(img) as q:
            assert guest.read(q, 0, 4) == b"\x11" * 4
            at = _l2_entry(q, 0)
            _patch(img, at, img.read_bytes()[at + 8:at + 16])  # guest cluster 0 -> the host cluster of 1
            assert guest.read(q, 0, 4) == b"\x11" * 4
            q.reload()
            assert guest.read(q, 0, 4) == b"\x22" * 4

    def test_large_reads_use_threads_and_agree(self, images: dict[str, Path], converted: dict[str, bytes]) -> None:
        ref = converted["cluster-64k"]
        with qjournal.open(images["cluster-64k"]) as q:
            r = guest.reader(q)
            for off, n in ((0, len(ref)), (12345, 9 * MiB + 7), (len(ref) - 5 * MiB, 5 * MiB)):
                buf = bytearray(n)
                r.readinto(off, memoryview(buf))
                assert bytes(buf) == ref[off:off + n]

    def test_backing_name_resolves_against_the_image_folder(self, images: dict[str, Path],
                                                            converted: dict[str, bytes], tmp_path: Path) -> None:
        """(QEMU 7.2 resolves a relative data file name against the working directory
        instead; qjournal does as for backing files, as later QEMU does.)"""
        with chdir(tmp_path):
            for name in ("chain-of-three", "data-file"):
                assert read_all(Path(os.path.relpath(images[name], tmp_path))) == converted[name]


class TestRefused:
    def test_encrypted(self, tmp_path: Path) -> None:
        run(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=123456",
            "-o", "encrypt.format=aes,encrypt.key-secret=s0", "enc.qcow2", "1M")
        with qjournal.open(tmp_path / "enc.qcow2") as q:
            with pytest.raises(UnsupportedError, match="encrypted"):
                guest.read(q, 0, 512)

    def test_missing_backing_file(self, tmp_path: Path) -> None:
        img = build(tmp_path, [Layer("qcow2", MiB), Layer("qcow2", MiB, "", ("write -P 1 0 4k",))])
        (tmp_path / "l0.qcow2").unlink()
        with qjournal.open(img) as q:
            assert guest.read(q, 0, 4096) == b"\x01" * 4096  # allocated: the backing file is not needed
            with pytest.raises(UsageError, match="l0.qcow2"):
                guest.read(q, 64 * KiB, 1)

    def test_backing_loop(self, tmp_path: Path) -> None:
        img = build(tmp_path, [Layer("qcow2", MiB), Layer("qcow2", MiB)])
        run(tmp_path, "qemu-img", "rebase", "-u", "-b", "l1.qcow2", "-F", "qcow2", "l0.qcow2")
        with qjournal.open(img) as q:
            with pytest.raises(FormatError, match="loops"):
                guest.read(q, 0, 1)


# -- damaged tables ------------------------------------------------------------------------
def _l2_entry(q: qjournal.Image, guest_off: int) -> int:
    """File offset of the L2 entry of ``guest_off``."""
    cs = q.header.cluster_size
    size = 16 if q.header.extended_l2 else 8
    per = cs // size
    l2 = int(q.l1_table()[guest_off // cs // per]) & 0x00FFFFFFFFFFFE00
    return l2 + (guest_off // cs % per) * size


def _patch(path: Path, off: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def _damaged(tmp_path: Path, opts: str, edit: str) -> tuple[Path, int]:
    img = build(tmp_path, [Layer("qcow2", 4 * MiB, opts, ("write -P 1 0 128k", "write -c -P 2 1M 64k"))])
    with qjournal.open(img) as q:
        entry_at = _l2_entry(q, 0 if edit != "compressed" else MiB)
        entry = int.from_bytes(img.read_bytes()[entry_at:entry_at + 8], "big")
        bitmap = int.from_bytes(img.read_bytes()[entry_at + 8:entry_at + 16], "big")
        fsize = img.stat().st_size
    beyond = -(-fsize // (64 * KiB)) * 64 * KiB + MiB
    new = {"reserved": entry | 0x2, "unaligned": entry + 0x200, "past-eof": (entry & ~0x00FFFFFFFFFFFE00) | beyond,
           "v2-zero": entry | 1, "compressed": entry - 0x40,
           "both-bits": bitmap | (1 << 32)}[edit]
    if edit == "both-bits":
        _patch(img, entry_at + 8, new.to_bytes(8, "big"))
    else:
        _patch(img, entry_at, new.to_bytes(8, "big"))
    return img, entry_at


class TestDamaged:
    @pytest.mark.parametrize("edit, opts, rule", [
        ("reserved", "", "reserved bits"),
        ("unaligned", "", "unaligned"),
        ("past-eof", "", "past the end"),
        ("v2-zero", "compat=0.10", "version 2"),
        ("both-bits", "extended_l2=on", "both allocated and zero"),
        ("compressed", "", "zlib"),
        ("compressed", "compression_type=zstd", "zstd"),
    ])
    def test_format_error_names_the_entry(self, tmp_path: Path, edit: str, opts: str, rule: str) -> None:
        img, entry_at = _damaged(tmp_path, opts, edit)
        with qjournal.open(img) as q:
            where = MiB if edit == "compressed" else 0
            with pytest.raises(FormatError, match=rule) as exc:
                guest.read(q, where + 100, 10)
            if edit != "compressed":
                assert exc.value.structure == "L2 table" and exc.value.offset == entry_at
            # The rest of the disk stays readable.
            assert guest.read(q, 2 * MiB, 4096) == bytes(4096)
            if edit != "compressed":
                assert guest.read(q, 64 * KiB, 4) == b"\x01" * 4
        res = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read {where + 100} 10", str(img)],
                             capture_output=True, text=True)
        if edit in ("unaligned", "both-bits", "compressed", "v2-zero"):
            assert "failed" in res.stdout + res.stderr, "QEMU refuses these too"


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_clusters_packed_across_host_clusters(tmp_path: Path, ctype: str) -> None:
    """qemu-img convert -c packs compressed clusters back to back, so that most span two
    host clusters and the last may end past the end of the file."""
    rng = random.Random(ctype)
    cs = 64 * KiB
    raw = b"".join(rng.randbytes(rng.randrange(8 * KiB, 40 * KiB)).ljust(cs, b"\0") for _ in range(24))
    (tmp_path / "src.raw").write_bytes(raw)
    run(tmp_path, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"compression_type={ctype}",
        "src.raw", "c.qcow2")
    img = tmp_path / "c.qcow2"
    assert convert(img) == raw
    with qjournal.open(img) as q:
        assert guest.read(q, 0, len(raw)) == raw
        for _ in range(100):
            off = rng.randrange(len(raw))
            n = rng.randrange(min(len(raw) - off, 3 * cs) + 1)
            assert guest.read(q, off, n) == raw[off:off + n], (off, n)


def test_entries_sharing_a_compressed_cluster(tmp_path: Path) -> None:
    """Two L2 entries may point at the same compressed data (as after an internal
    snapshot): each reads the whole cluster."""
    img = build(tmp_path, [Layer("qcow2", MiB, "cluster_size=4k", ("write -c -P 0x77 0 4k",
                                                                    "write -c -P 0x78 8k 4k"))])
    with qjournal.open(img) as q:
        first = _l2_entry(q, 0)
    _patch(img, first + 8, img.read_bytes()[first:first + 8])  # guest cluster 1 = guest cluster 0
    ref = convert(img)
    assert ref[:8192] == b"\x77" * 8192 and ref[8192:12288] == b"\x78" * 4096
    with qjournal.open(img) as q:
        assert guest.read(q, 0, MiB) == ref
        assert guest.read(q, 4000, 200) == ref[4000:4200]


# -- the command line ---------------------------------------------------------------------
def qj(*argv: str) -> tuple[int, str, str]:
    """``qjournal ARGV`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


class TestCli:
    def test_summary_and_pattern(self, images: dict[str, Path]) -> None:
        img = str(images["cluster-4k"])
        assert qj("read", img, "0", "4k") == (0, "read 4096/4096 bytes at offset 0\n", "")
        code, out, err = qj("read", "-P", "0x11", img, "1", "2054")
        assert (code, out, err) == (0, "read 2054/2054 bytes at offset 1\n", "")
        code, out, err = qj("read", "-P", "0x11", img, "0", "8k")
        assert code == 1 and out == ""
        assert err.count("\n") == 1 and "failed at offset 2055:" in err  # 0x22 starts at 2048 + 7

    def test_output_file(self, images: dict[str, Path], converted: dict[str, bytes], tmp_path: Path) -> None:
        out = tmp_path / "out.bin"
        code, stdout, _ = qj("read", "--output-file", str(out), str(images["zstd"]), "1000", "1M")
        assert (code, stdout) == (0, "")
        assert out.read_bytes() == converted["zstd"][1000:1000 + MiB]

    @pytest.mark.parametrize("name", CASES)
    def test_output_file_of_every_case_is_qemus_raw_with_holes(self, name: str, images: dict[str, Path],
                                                               converted: dict[str, bytes], tmp_path: Path) -> None:
        """To a regular file, data goes over by copy_file_range and zeros stay holes; the bytes
        are qemu-img convert's, whole and in an unaligned window; an old longer file is cut."""
        ref = converted[name]
        out = tmp_path / "out.bin"
        out.write_bytes(b"\xee" * (len(ref) + 12345))
        assert qj("read", "--output-file", str(out), str(images[name]), "0", str(len(ref)))[0] == 0
        assert out.read_bytes() == ref
        if name == "cluster-4k":
            assert out.stat().st_blocks * 512 < len(ref)         # zeros left as holes
        off, n = 777, len(ref) - 777 - 5000
        assert qj("read", "--output-file", str(out), str(images[name]), str(off), str(n))[0] == 0
        assert out.read_bytes() == ref[off:off + n]

    def test_copy_out_cuts_a_file_opened_without_truncation(self, images: dict[str, Path],
                                                            converted: dict[str, bytes], tmp_path: Path) -> None:
        """The library call cuts away old contents itself (the command's file is empty already)."""
        ref = converted["cluster-4k"]
        out = tmp_path / "out.bin"
        out.write_bytes(b"\xee" * (len(ref) + 4096))
        fd = os.open(out, os.O_WRONLY)
        try:
            with qjournal.Image(images["cluster-4k"], "r") as img:
                copy_out(img, 0, len(ref), fd)
        finally:
            os.close(fd)
        assert out.read_bytes() == ref

    def test_errors_are_one_line(self, images: dict[str, Path]) -> None:
        img = str(images["cluster-4k"])
        for argv in (("read", img, "8M", "1"), ("read", "-P", "256", img, "0", "1"), ("read", img, "0", "1x")):
            code, out, err = qj(*argv)
            assert code == 1 and out == "" and err.startswith("qjournal: ") and err.count("\n") == 1, (argv, err)


# -- property: random QEMU writes, random windows ----------------------------------------
CLUSTER = {"cluster_size=512": 512, "cluster_size=4k": 4096, "": 64 * KiB, "extended_l2=on,cluster_size=16k": 16 * KiB,
           "compat=0.10,cluster_size=4k": 4096}
PROPERTY_DISK = 4 * MiB
QEMU_OP = st.tuples(st.sampled_from(["write -P", "write -z", "discard", "write -c -P"]),
                    st.integers(0, 255), st.integers(0, PROPERTY_DISK - 1), st.integers(1, 300 * KiB))
PROPERTY_EXAMPLES = examples(25)
"""A quarter of the profile's examples: each one builds an image with QEMU."""
RANDOM_IMAGE = {"config": st.sampled_from(sorted(CLUSTER)), "backing": st.booleans(),
                "ops": st.lists(QEMU_OP, min_size=1, max_size=12)}
"""The strategies of a random image (test_map.py uses them too)."""


def random_image(d: Path, config: str, backing: bool, ops: list[tuple[str, int, int, int]]) -> Path:
    """A 4 MiB image made with ``config``, on a shorter raw backing file if asked, written by qemu-io."""
    size, cs = PROPERTY_DISK, CLUSTER[config]
    cmds = []
    for op, pattern, off, n in ops:
        n = min(n, size - off)
        if op == "write -c -P":  # QEMU compresses whole clusters only
            off, n = off - off % cs, max(cs, n - n % cs)
            n = min(n, size - off)
        cmds.append(f"{op} {pattern:#x} {off} {n}" if op.endswith("-P") else f"{op} {off} {n}")
    layers = [Layer("qcow2", size, config, tuple(cmds))]
    if backing:
        layers.insert(0, Layer("raw", 3 * MiB + 512 + 17, "", (f"write -P 0x5b 0 {3 * MiB}",)))
    return build(d, layers)


@settings(max_examples=PROPERTY_EXAMPLES)
@given(seed=st.integers(0, 2 ** 32 - 1), **RANDOM_IMAGE)
@example(seed=0, config="cluster_size=4k", backing=True,     # QEMU's own bug, see qemu_io
         ops=[("write -c -P", 0, 0, 1), ("write -z", 0, 0, 4097), ("write -c -P", 0, 0, 1), ("write -P", 0, 4096, 21)])
@example(seed=0, config="cluster_size=512", backing=False,
         ops=[("write -c -P", 0, 0, 512), ("write -z", 0, 0, 32769), ("write -c -P", 0, 0, 512), ("write -P", 0, 0, 1)])
def test_random_qemu_writes_read_back(config: str, backing: bool, ops: list[tuple[str, int, int, int]],
                                      seed: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    img = random_image(tmp_path_factory.mktemp("prop"), config, backing, ops)
    ref = convert(img)
    rng = random.Random(seed)
    cs = CLUSTER[config]
    with qjournal.open(img) as q:
        assert guest.read(q, 0, len(ref)) == ref
        for _ in range(20):
            off = rng.randrange(len(ref))
            n = rng.randrange(min(len(ref) - off, 2 * cs + 3) + 1)
            assert guest.read(q, off, n) == ref[off:off + n], (off, n)

"""Creating images with ``qjournal.create`` against ``qemu-img create -f qcow2``.

Oracle: real QEMU 7.2. For every case qemu-img makes the reference image in a sibling
directory, with the same file names (so stored backing and data file names match), and:
- our file must equal QEMU's byte for byte (whole file, and the data file's length);
- ``qemu-img info --output=json`` must agree (minus actual-size);
- ``qemu-img check`` must find our image clean;
- ``qemu-io`` must write a pattern into our image and read it back.
Refusals are checked against qemu-img refusing the same request, and must leave no file.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import qemu

from qjournal.ops.create import CreateOptions, create_image, parse_options
from qjournal.ops.syntax import parse_size
from qjournal.errors import LockError, UsageError

qcreate = importlib.import_module("qjournal.ops.create")

IMG = "img.qcow2"
BASE_QCOW2_SIZE = "1G"
BASE_RAW_SIZE = 3 * 1024 * 1024 + 1  # not a multiple of 512: the new image rounds it up


def run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Backing files every case may refer to: a qcow2 image and an odd-sized raw file."""
    d = tmp_path_factory.mktemp("bases")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", BASE_QCOW2_SIZE], d)
    with open(d / "base.raw", "wb") as f:
        f.truncate(BASE_RAW_SIZE)
    return d


def twin_dirs(tmp_path: Path, bases: Path) -> tuple[Path, Path]:
    """Two directories holding the same backing files: one for QEMU, one for us."""
    dirs = (tmp_path / "qemu", tmp_path / "ours")
    for d in dirs:
        d.mkdir(parents=True)
        for b in ("base.qcow2", "base.raw"):
            shutil.copy(bases / b, d / b)
    return dirs


def qemu_create(d: Path, spec: str, size: str | None, check: bool = True) -> subprocess.CompletedProcess[str]:
    args = ["qemu-img", "create", "-q", "-f", "qcow2"] + (["-o", spec] if spec else []) + [IMG]
    return run(args + ([size] if size is not None else []), d, check=check)


def ours_create(d: Path, spec: str, size: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Create as the CLI would: parse the -o string and the size, run from ``d``
    (QEMU creates a relative data_file in the current directory)."""
    with monkeypatch.context() as m:
        m.chdir(d)
        create_image(IMG, None if size is None else parse_size(size), parse_options(spec))


def info(d: Path, name: str = IMG) -> dict[str, object]:
    out = json.loads(run(["qemu-img", "info", "-U", "--output=json", name], d).stdout)
    out.pop("actual-size", None)
    return out


def assert_check_clean(d: Path, name: str = IMG) -> None:
    res = run(["qemu-img", "check", "--output=json", name], d, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout)
    assert out["check-errors"] == 0 and not out.get("leaks") and not out.get("corruptions"), out


def assert_qemu_io_roundtrip(d: Path, name: str = IMG) -> None:
    res = run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", "-c", "read -P 0x5a 0 64k", name], d)
    assert "wrote 65536/65536 bytes at offset 0" in res.stdout, res.stdout + res.stderr
    assert "read 65536/65536 bytes at offset 0" in res.stdout, res.stdout + res.stderr
    assert "fail" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr


def data_file_of(spec: str) -> str | None:
    return parse_options(spec).data_file


def compare_with_qemu(tmp_path: Path, bases: Path, monkeypatch: pytest.MonkeyPatch, spec: str,
                      size: str | None) -> Path:
    qdir, odir = twin_dirs(tmp_path, bases)
    qemu_create(qdir, spec, size)
    ours_create(odir, spec, size, monkeypatch)
    assert (odir / IMG).read_bytes() == (qdir / IMG).read_bytes()
    assert info(odir) == info(qdir)
    data = data_file_of(spec)
    if data is not None:
        assert os.path.getsize(odir / data) == os.path.getsize(qdir / data)
    assert sorted(os.listdir(odir)) == sorted(os.listdir(qdir))  # no temporary file left behind
    assert_check_clean(odir)
    return odir


# One axis at a time, with the values that change the layout, rather than the product.
MATRIX = [
    # compat and cluster size
    ("compat=0.10,cluster_size=512", "1G"),
    ("compat=0.10,cluster_size=4k", "1G"),
    ("compat=0.10", "16T"),
    ("compat=0.10,cluster_size=2M", "1M"),
    ("", "1M"),
    ("", "1G"),
    ("", "16T"),
    ("cluster_size=512", "1M"),
    ("cluster_size=4k", "1M"),
    ("cluster_size=2M", "16T"),
    # every refcount width, at each cluster size; 512-byte clusters with a 1G disk give
    # a 256 KiB L1 that needs several refcount blocks
    *[(f"cluster_size={cs},refcount_bits={rb}", size)
      for rb in (1, 2, 4, 8, 16, 32, 64)
      for cs, size in (("512", "1G"), ("4k", "1G"), ("64k", "16T"), ("2M", "1M"))],
    # an L1 larger than the first refcount table covers: the table is replaced
    ("cluster_size=512,refcount_bits=64", "10G"),
    # features
    ("lazy_refcounts=on", "1G"),
    ("extended_l2=on,cluster_size=16k", "1G"),
    ("extended_l2=on", "16T"),
    ("extended_l2=on,cluster_size=2M,refcount_bits=1", "1G"),
    ("compression_type=zstd", "1G"),
    ("lazy_refcounts=on,extended_l2=on,compression_type=zstd,refcount_bits=64", "16T"),
    # backing files (no size: the backing file's)
    ("backing_file=base.qcow2,backing_fmt=qcow2", None),
    ("backing_file=base.qcow2,backing_fmt=qcow2", "16T"),
    ("backing_file=base.raw,backing_fmt=raw", None),
    ("backing_file=base.raw,backing_fmt=raw,compat=0.10", "1G"),
    ("backing_file=base.qcow2,backing_fmt=raw", None),
    ("backing_file=base.raw,backing_fmt=raw,cluster_size=512", "1M"),
    # external data files
    ("data_file=data.raw", "1G"),
    ("data_file=data.raw,cluster_size=512", "1000000"),
    ("data_file=data.raw,data_file_raw=on", "1G"),
    ("data_file=data.raw,data_file_raw=on", "1049088"),
    ("data_file=data.raw,data_file_raw=on,extended_l2=on", "1000000"),
    ("data_file=data.raw,data_file_raw=on,cluster_size=512", "16M"),
    ("data_file=data.raw,backing_file=base.qcow2,backing_fmt=qcow2,lazy_refcounts=on", None),
    # option syntax: aliases, suffixes, hex, flags, repeats, escaped commas
    ("compat=v3,cluster_size=0.5k,lazy_refcounts=yes,refcount_bits=0x20", "1.5G"),
    ("compat=v2,cluster_size=4096B", "1000"),
    ("cluster_size=64k,cluster_size=4k,lazy_refcounts,nolazy_refcounts", "1G"),
    ("data_file=da,,ta.raw,id=x", "1M"),
]


@pytest.mark.parametrize("spec,size", MATRIX, ids=[f"{s or 'defaults'}@{z}" for s, z in MATRIX])
def test_same_image_as_qemu(tmp_path: Path, bases: Path, monkeypatch: pytest.MonkeyPatch,
                            spec: str, size: str | None) -> None:
    odir = compare_with_qemu(tmp_path, bases, monkeypatch, spec, size)
    if info(odir)["virtual-size"] >= 65536:  # type: ignore[operator]
        assert_qemu_io_roundtrip(odir)


def test_reftable_replaced_during_metadata_preallocation(tmp_path: Path, bases: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """data_file_raw with 4000+ L2 tables at 512-byte clusters and 64-bit refcounts: the
    refcount table is replaced mid-way and the freed old table's cluster is reused for an
    L2 table. QEMU takes ~5 s here (one sync per L2 table); this is the slowest case."""
    spec = "cluster_size=512,refcount_bits=64,data_file=data.raw,data_file_raw=on"
    odir = compare_with_qemu(tmp_path, bases, monkeypatch, spec, "160M")
    header = (odir / IMG).read_bytes()[:64]
    assert int.from_bytes(header[48:56], "big") != 512  # the table moved away from cluster 1
    assert_qemu_io_roundtrip(odir)


def test_data_file_contents_are_discarded(tmp_path: Path, bases: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An existing data file is emptied and sized to the disk, as QEMU does."""
    qdir, odir = twin_dirs(tmp_path, bases)
    for d in (qdir, odir):
        (d / "data.raw").write_bytes(os.urandom(3 << 20))
    qemu_create(qdir, "data_file=data.raw", "1M")
    ours_create(odir, "data_file=data.raw", "1M", monkeypatch)
    assert (odir / "data.raw").read_bytes() == (qdir / "data.raw").read_bytes() == bytes(1 << 20)
    assert (odir / IMG).read_bytes() == (qdir / IMG).read_bytes()


# ------------------------------------------------------------------------ refusals

def long_name(length: int) -> str:
    """A name of ``length`` bytes for base.raw ("././.../base.raw", or "./" then "/base.raw")."""
    pad = length - len("base.raw")
    return "./" * (pad // 2) + ("/" if pad % 2 else "") + "base.raw"


REFUSALS = [
    ("compat=0.10,refcount_bits=8", "1G", r"refcount_bits=8 needs compat=1\.1"),
    ("compat=0.10,lazy_refcounts=on", "1G", r"lazy_refcounts=on needs compat=1\.1"),
    ("compat=0.10,extended_l2=on", "1G", r"extended_l2=on needs compat=1\.1"),
    ("compat=0.10,compression_type=zstd", "1G", r"compression_type=zstd needs compat=1\.1"),
    ("compat=0.10,data_file=data.raw", "1G", r"data_file needs compat=1\.1"),
    ("compat=1.0", "1G", r"compat=1\.0: expected"),
    ("cluster_size=256", "1G", r"cluster_size=256: must be a power of two between 512 and 2M"),
    ("cluster_size=4M", "1G", r"cluster_size=4194304: must be a power of two"),
    ("cluster_size=3000", "1G", r"cluster_size=3000: must be a power of two"),
    ("cluster_size=8k,extended_l2=on", "1G", r"extended_l2=on needs cluster_size of at least 16k"),
    ("refcount_bits=128", "1G", r"refcount_bits=128: must be a power of two no larger than 64"),
    ("refcount_bits=3", "1G", r"refcount_bits=3: must be a power of two"),
    ("refcount_bits=0", "1G", r"refcount_bits=0: must be a power of two"),
    ("refcount_bits=16k", "1G", r"refcount_bits=16k: expected a number"),
    ("data_file_raw=on", "1G", r"data_file_raw=on needs data_file"),
    ("data_file=data.raw,data_file_raw=on,backing_file=base.raw,backing_fmt=raw", "1G",
     r"data_file_raw=on and backing_file cannot be used together"),
    ("backing_fmt=raw", "1G", r"backing_fmt=raw given without backing_file"),
    ("backing_file=base.qcow2", "1G", r"backing_file given without backing_fmt \(it looks like qcow2\)"),
    ("backing_file=base.raw", None, r"backing_file given without backing_fmt \(it looks like raw\)"),
    ("backing_file=missing.qcow2,backing_fmt=qcow2", "1G", r"could not open backing file 'missing.qcow2'"),
    ("backing_file=base.raw,backing_fmt=qcow2", "1G", r"backing file 'base.raw' is not a usable qcow2 image"),
    ("backing_file=,backing_fmt=raw", "1G", r"backing_file is an empty string"),
    (f"backing_file={IMG},backing_fmt=raw", "1G", r"is the image being created"),
    ("compression_type=lz4", "1G", r"compression_type=lz4: expected zlib or zstd"),
    ("lazy_refcounts=maybe", "1G", r"lazy_refcounts=maybe: expected on or off"),
    ("lazy_refcounts=ON", "1G", r"lazy_refcounts=ON: expected on or off"),
    ("foo=bar", "1G", r"unknown option 'foo'"),
    ("lazy_refcounts=on,", "1G", r"invalid option list"),
    (",lazy_refcounts=on", "1G", r"invalid option list"),
    ("", None, r"no size given"),
    ("cluster_size=512", "16T", r"too large for qcow2 with 512-byte clusters"),
    ("cluster_size=4k", "16T", r"too large for qcow2 with 4096-byte clusters"),
    ("cluster_size=512", "137438953984", r"too large"),  # 128G + 512: one L1 entry too many
    ("cluster_size=2M,extended_l2=on", "1152921504606847488", r"too large .* and extended L2"),
    ("", "9223372036854775807", r"out of range"),  # rounding up to 512 leaves int64
    (f"cluster_size=512,backing_file={long_name(377)},backing_fmt=raw", "1M", r"backing_file name too long"),
    (f"backing_file={long_name(1024)},backing_fmt=raw", "1M", r"at most 1023"),
    (f"cluster_size=512,data_file={'./' * 190}data.raw", "1M", r"data_file name too long"),
]


@pytest.mark.parametrize("spec,size,message", REFUSALS, ids=[f"{s[:50]}@{z}" for s, z, _ in REFUSALS])
def test_refused_like_qemu(tmp_path: Path, bases: Path, monkeypatch: pytest.MonkeyPatch,
                           spec: str, size: str | None, message: str) -> None:
    qdir, odir = twin_dirs(tmp_path, bases)
    before = sorted(os.listdir(odir))
    res = qemu_create(qdir, spec, size, check=False)
    assert res.returncode != 0, f"qemu-img accepted {spec} {size}"
    assert sorted(os.listdir(qdir)) == before  # QEMU leaves nothing behind either
    with pytest.raises(UsageError, match=message) as err:
        ours_create(odir, spec, size, monkeypatch)
    assert "\n" not in str(err.value)
    assert sorted(os.listdir(odir)) == before


def test_longest_names_that_fit(tmp_path: Path, bases: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The limits above are exact: one byte less fits, for QEMU and for us."""
    compare_with_qemu(tmp_path / "a", bases, monkeypatch,
                      f"cluster_size=512,backing_file={long_name(376)},backing_fmt=raw", "1M")
    compare_with_qemu(tmp_path / "b", bases, monkeypatch,
                      f"backing_file={long_name(1023)},backing_fmt=raw", "1M")


def test_options_are_checked_on_construction() -> None:
    with pytest.raises(UsageError, match=r"refcount_bits=8 needs compat=1\.1"):
        CreateOptions(compat="0.10", refcount_bits=8)
    with pytest.raises(UsageError, match=r"backing_fmt=vmdk: qjournal reads only qcow2 and raw"):
        CreateOptions(backing_file="b.vmdk", backing_fmt="vmdk")
    with pytest.raises(UsageError, match=r"protocol prefixes are not supported"):
        CreateOptions(data_file="nbd:localhost:10809")
    with pytest.raises(UsageError, match=r"cluster_size='64k': must be of type int"):
        CreateOptions(cluster_size="64k")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"lazy_refcounts=1: must be of type bool"):
        CreateOptions(lazy_refcounts=1)  # type: ignore[arg-type]
    assert CreateOptions(compat="v2").compat == "0.10"
    assert CreateOptions(compat="v3").version == 3


def test_unsupported_qemu_options(tmp_path: Path) -> None:
    assert parse_options("preallocation=off,nocow=off") == CreateOptions()
    for spec in ("preallocation=metadata", "encrypt.format=luks", "extent_size_hint=1M"):
        with pytest.raises(UsageError, match="not supported by qjournal create"):
            parse_options(spec)
    with pytest.raises(UsageError, match="give the size as the SIZE argument"):
        parse_options("size=1G")
    with pytest.raises(UsageError, match="qcow2 create options: compat, cluster_size"):
        parse_options("help")


# ------------------------------------------------------------------------ sizes

SIZES = ["1024", "1000", "1", "511", "0", "1k", "1K", "1M", "512M", "1G", "16T", "1P", "1.5G", "1.1k",
         "1.0005k", "0.0005k", "4.7M", "1.k", "1.", "1.0", "0x1000", "0x1000k", "0X10", "0x10B", "1b", "1B",
         " 1k", "+1k", "00012", "7.99E", "9223372036854775807", "1.999999999999999999999k",
         # refused
         "1kB", "1.5", "1.5B", ".5k", "1e3", "1.5e3k", "-1", "1k ", "1kk", "1,5k", "1.5 k", "0x", "0xk",
         "0x1.5", "", "8E", "16E", "99999999999999999999"]


@pytest.mark.parametrize("text", SIZES)
def test_parse_size_like_qemu_img(tmp_path: Path, text: str) -> None:
    """qemu-img prints the size it parsed ("Formatting ... size=N") or refuses the text."""
    res = run(["qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=2M", "x.qcow2", "--", text],
              tmp_path, check=False)
    m = re.search(r"^Formatting .* size=(\d+) ", res.stdout, re.M)
    if m:
        assert parse_size(text) == int(m.group(1))
    else:
        assert res.returncode != 0
        with pytest.raises(UsageError, match="size"):
            parse_size(text)


# ------------------------------------------------------------------------ replacing files

def test_overwrite_keeps_mode_and_replaces_content(tmp_path: Path, bases: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    qdir, odir = twin_dirs(tmp_path, bases)
    qemu_create(qdir, "cluster_size=4k", "2G")
    target = odir / IMG
    target.write_bytes(os.urandom(300000))  # longer than the new image: must not survive
    target.chmod(0o600)
    ours_create(odir, "cluster_size=4k", "2G", monkeypatch)
    assert target.read_bytes() == (qdir / IMG).read_bytes()
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(odir)) == sorted(os.listdir(qdir))
    assert_check_clean(odir)


def test_refusal_leaves_an_existing_file_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(qemu-img deletes the target when qcow2 creation fails; we never touch it.)"""
    target = tmp_path / IMG
    old = os.urandom(5000)
    target.write_bytes(old)
    with pytest.raises(UsageError):
        ours_create(tmp_path, "cluster_size=3000", "1G", monkeypatch)
    assert target.read_bytes() == old
    assert os.listdir(tmp_path) == [IMG]


def test_failed_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error before the rename (here: fsync) leaves the old image and no temporary file."""
    target = tmp_path / IMG
    run(["qemu-img", "create", "-q", "-f", "qcow2", IMG, "1M"], tmp_path)
    old = target.read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(qcreate.os, "fsync", failing_fsync)
    with pytest.raises(UsageError, match="could not write .*Input/output error"):
        create_image(str(target), 1 << 30, CreateOptions(cluster_size=512))
    assert target.read_bytes() == old
    assert os.listdir(tmp_path) == [IMG]


def test_image_in_use_is_refused(tmp_path: Path) -> None:
    """qemu-img refuses to recreate an image QEMU has open for writing; so do we."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", IMG, "1M"], tmp_path)
    old = (tmp_path / IMG).read_bytes()
    with qemu.held_for_writing(tmp_path / IMG):
        res = qemu_create(tmp_path, "", "2M", check=False)
        assert res.returncode != 0 and 'Failed to get "write" lock' in res.stderr
        with pytest.raises(LockError, match='failed to get "write" lock'):
            create_image(str(tmp_path / IMG), 4 << 20, CreateOptions())
    assert (tmp_path / IMG).read_bytes() == old
    assert os.listdir(tmp_path) == [IMG]

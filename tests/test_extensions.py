"""Unknown header extensions: `qjournal info` lists them, and every write keeps them byte for byte.

Images are made by qemu-img/qemu-io; the unknown extension is then spliced into
cluster 0 by :func:`insert_extension` (QEMU itself keeps unknown extensions, so the
image stays valid for it: `qemu-img check` is clean and `qemu-img info` works before
qjournal touches it). After each qjournal write the extension must still be there with
the same type, length, data and zero padding, in the same place in the list relative
to the extensions that were there before; QEMU must still find the image clean and
see the right bitmaps, backing file and guest data.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

import qemu
from qjournal.cli import main
from qjournal import Image
from qjournal.core import image as core_image

UNKNOWN = 0x12345678
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
SECTOR = 512
MiB = 1 << 20
Buf = bytes | bytearray


def qj(*args: object) -> int:
    return main([str(a) for a in args])


# -- cluster 0 surgery ----------------------------------------------------------------
def pad8(n: int) -> int:
    return (n + 7) & ~7


def pack_ext(etype: int, data: bytes) -> bytes:
    return struct.pack(">II", etype, len(data)) + data + bytes(pad8(len(data)) - len(data))


def cluster0(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(32)
        cs = 1 << struct.unpack_from(">I", head, 20)[0]
        return head + f.read(cs - 32)


def parse_exts(c0: Buf) -> list[tuple[int, int, bytes]]:
    """(offset of the type field, type, data) of every extension, in order (v3 header)."""
    off = struct.unpack_from(">I", c0, 100)[0]
    out: list[tuple[int, int, bytes]] = []
    while True:
        assert off + 8 <= len(c0), f"extension list runs past cluster 0 at {off}"
        etype, n = struct.unpack_from(">II", c0, off)
        if etype == 0:
            return out
        assert off + 8 + n <= len(c0), f"extension {etype:#x} at {off} runs past cluster 0"
        out.append((off, etype, bytes(c0[off + 8:off + 8 + n])))
        off += 8 + pad8(n)


def ext_end(c0: Buf) -> int:
    """Offset just past the end marker."""
    exts = parse_exts(c0)
    if not exts:
        return struct.unpack_from(">I", c0, 100)[0] + 8
    off, _, data = exts[-1]
    return off + 8 + pad8(len(data)) + 8


def backing_name(c0: Buf) -> bytes | None:
    off, n = struct.unpack_from(">QI", c0, 8)
    return bytes(c0[off:off + n]) if off else None


def insert_extension(path: Path, etype: int, data: bytes, before: int | None = None) -> None:
    """Insert an extension before the one of type ``before`` (or last); move the backing name after the list."""
    c0 = bytearray(cluster0(path))
    hl = struct.unpack_from(">I", c0, 100)[0]
    exts = [(t, d) for _, t, d in parse_exts(c0)]
    name = backing_name(c0)
    pos = len(exts) if before is None else [t for t, _ in exts].index(before)
    exts.insert(pos, (etype, data))
    packed = b"".join(pack_ext(t, d) for t, d in exts) + bytes(8)
    old_end = ext_end(c0)
    old_name_end = struct.unpack_from(">Q", c0, 8)[0] + len(name) if name else 0
    c0[hl:max(old_end, old_name_end)] = bytes(max(old_end, old_name_end) - hl)
    c0[hl:hl + len(packed)] = packed
    if name:
        noff = hl + len(packed)  # where QEMU puts it: right after the end marker
        assert noff + len(name) <= len(c0), "the backing file name would not fit in cluster 0"
        c0[noff:noff + len(name)] = name
        struct.pack_into(">QI", c0, 8, noff, len(name))
    with open(path, "r+b") as f:
        f.write(c0)


def split_length(c0: Buf, before: int | None) -> int:
    """A data length for an extension inserted before ``before`` (or last) that puts the
    bitmaps extension's directory size and directory offset fields in different 512-byte
    sectors: the existing bitmaps extension if it comes after the insertion point, else
    the one qjournal will append after the list."""
    exts = parse_exts(c0)
    types = [t for _, t, _ in exts]
    if EXT_BITMAPS in types and before is not None and types.index(before) <= types.index(EXT_BITMAPS):
        base = exts[types.index(EXT_BITMAPS)][0]
    else:
        base = ext_end(c0) - 8
    # Inserting 8 + P bytes moves the directory offset field (24 bytes into the
    # bitmaps extension) to base + 8 + P + 24: make that a sector boundary.
    return (-(base + 32)) % SECTOR or SECTOR


def assert_kept(path: Path, etype: int, data: bytes, order: list[int]) -> None:
    """The extension is there, byte for byte, and the old extensions kept their order."""
    c0 = cluster0(path)
    exts = parse_exts(c0)
    found = [(off, d) for off, t, d in exts if t == etype]
    assert found, f"extension {etype:#x} is gone: {[hex(t) for _, t, _ in exts]}"
    off, d = found[0]
    assert d == data
    assert c0[off:off + 8 + pad8(len(data))] == pack_ext(etype, data)
    types = [t for _, t, _ in exts if t != EXT_BITMAPS]
    assert types == [t for t in order if t != EXT_BITMAPS]
    name = backing_name(c0)
    if name is not None:
        assert struct.unpack_from(">Q", c0, 8)[0] >= ext_end(c0), "backing name overlaps the extensions"


Steps = list[tuple[bytes, list[tuple[str, list[tuple[int, bytes]]]]]]


# -- what a reader that ignores the journal sees between the steps of a write ---------
@pytest.fixture
def header_steps(monkeypatch: pytest.MonkeyPatch) -> Steps:
    """Records, for every commit, cluster 0 before it and the ordered steps it applies."""
    recorded: Steps = []
    build = core_image.plan

    def wrapper(img: Image, tx: object) -> list[tuple[str, list[tuple[int, bytes]]]]:
        steps = build(img, tx)  # type: ignore[arg-type]
        recorded.append((img.cluster0_bytes, steps))
        return steps

    monkeypatch.setattr(core_image, "plan", wrapper)
    return recorded


def bitmaps_fields(c0: Buf) -> tuple[bool, bytes | None]:
    """(autoclear bit 0, data of the bitmaps extension or None)."""
    ac = struct.unpack_from(">Q", c0, 88)[0] & 1
    return bool(ac), next((d for _, t, d in parse_exts(c0) if t == EXT_BITMAPS), None)


def assert_steps_safe(recorded: Steps, etype: int, data: bytes) -> None:
    """At every step boundary, cluster 0 is valid for QEMU: the extension list parses and
    holds the unknown extension intact, the backing name is the old one, and a bitmaps
    extension that autoclear declares consistent is the old or the new one, never a mix."""
    for before, steps in recorded:
        cur = bytearray(before)
        end = bytearray(before)
        for _, writes in steps:
            for off, d in writes:
                if off < len(end):
                    end[off:off + len(d)] = d[:len(end) - off]
        old_bm, new_bm = bitmaps_fields(before)[1], bitmaps_fields(end)[1]
        name = backing_name(before)
        for step, writes in steps:
            for off, d in writes:
                if off < len(cur):
                    cur[off:off + len(d)] = d[:len(cur) - off]
            try:
                exts = parse_exts(cur)
            except AssertionError as e:
                raise AssertionError(f"after step {step} ({[(o, len(d)) for o, d in writes]}), "
                                     f"QEMU cannot parse the extension list: {e}") from None
            assert (etype, data) in [(t, d) for _, t, d in exts], f"after step {step}"
            if name is not None:
                assert backing_name(cur) == name, f"backing name after step {step}: {backing_name(cur)!r}"
            ac, bmext = bitmaps_fields(cur)
            if ac and bmext is not None:
                assert bmext in (old_bm, new_bm), f"bitmaps extension after step {step} is a mix"


def bitmap_set(path: Path) -> list[tuple[str, int, list[str]]]:
    return [(b["name"], b["granularity"], b["flags"]) for b in qemu.bitmaps(path)]


def dump(capsys: pytest.CaptureFixture[str], img: Path, name: str) -> list[tuple[int, int]]:
    capsys.readouterr()
    assert qj("bitmap", "--dump", "--output=json", img, name) == 0
    return [(e["start"], e["length"]) for e in json.loads(capsys.readouterr().out) if e["dirty"]]


def qemu_read(path: Path, *commands: str) -> None:
    """qemu-io read-only (-r): a writable open of an image with bitmaps makes QEMU rewrite
    the header (in_use on load, store at close), which moves unknown extensions last."""
    args = ["qemu-io", "-r", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    res = qemu.run(*args, str(path))
    assert "verification failed" not in res.stdout and "error" not in res.stdout.lower(), res.stdout


def payload(n: int) -> bytes:
    return bytes((i * 7 + 1) & 0xFF for i in range(n))


def prepare(tmp_path: Path, n: int, before: int | None, *opts: str) -> tuple[Path, bytes, list[int]]:
    """An image with a dirty bitmap 'src' (QEMU-made), then an unknown extension spliced in."""
    img = qemu.create(tmp_path / "disk.qcow2", "1G", *opts)
    qemu.qemu_img("bitmap", "--add", str(img), "src")
    qemu.qemu_io(img, "write -P 0x5a 1M 64k")
    data = payload(n)
    insert_extension(img, UNKNOWN, data, before)
    order = [t for _, t, _ in parse_exts(cluster0(img))]
    # QEMU accepts it before qjournal touches it.
    qemu.assert_clean(img)
    assert bitmap_set(img) == [("src", 65536, ["auto"])]
    qemu.qemu_img("info", str(img))
    return img, data, order


def bump_refcount_of_cluster0(img: Path) -> None:
    """Make a leak: refcount 2 for the header cluster (refcount_bits=16)."""
    c0 = cluster0(img)
    rt = struct.unpack_from(">Q", c0, 48)[0]
    with open(img, "r+b") as f:
        f.seek(rt)
        rb = struct.unpack(">Q", f.read(8))[0]
        f.seek(rb)
        assert struct.unpack(">H", f.read(2))[0] == 1
        f.seek(rb)
        f.write(struct.pack(">H", 2))


def assert_no_live_bitmaps_ext(img: Path) -> None:
    """No bitmaps extension, or one that autoclear bit 0 declares stale (QEMU ignores it,
    and it is the only crash-safe way to drop an extension that other extensions follow
    across a sector boundary)."""
    ac, ext = bitmaps_fields(cluster0(img))
    assert ext is None or not ac


def clear_autoclear_bitmaps(img: Path) -> None:
    with open(img, "r+b") as f:
        f.seek(88)
        ac = struct.unpack(">Q", f.read(8))[0]
        f.seek(88)
        f.write(struct.pack(">Q", ac & ~1))


# -- info -----------------------------------------------------------------------------
class TestInfoListsUnknown:
    @pytest.mark.parametrize("n,before", [(5, EXT_FEATURE_TABLE), (8, None), (300, None), (0, None)])
    def test_listed(self, tmp_path: Path, capsys: pytest.CaptureFixture[str], n: int, before: int | None) -> None:
        img = qemu.create(tmp_path / "disk.qcow2", "1G")
        insert_extension(img, UNKNOWN, payload(n), before)
        qemu.assert_clean(img)
        theirs = qemu.info(img)
        capsys.readouterr()
        assert qj("info", "--output=json", img) == 0
        ours = json.loads(capsys.readouterr().out)
        assert ours["qjournal-unknown-extensions"] == [{"type": "0x12345678", "length": n}]
        ours.pop("qjournal-unknown-extensions")
        ours.pop("actual-size"), theirs.pop("actual-size")
        assert ours == theirs
        assert qj("info", img) == 0
        out = capsys.readouterr().out
        assert f"unknown header extension: type 0x12345678, {n} bytes (kept as is)" in out.splitlines()

    def test_two_unknown_extensions(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        img = qemu.create(tmp_path / "disk.qcow2", "1G")
        insert_extension(img, UNKNOWN, payload(5), EXT_FEATURE_TABLE)
        insert_extension(img, 0xABCDEF01, payload(17))
        qemu.assert_clean(img)
        capsys.readouterr()
        assert qj("info", "--output=json", img) == 0
        assert json.loads(capsys.readouterr().out)["qjournal-unknown-extensions"] == [
            {"type": "0x12345678", "length": 5}, {"type": "0xabcdef01", "length": 17}]


# -- every write keeps it ----------------------------------------------------------------
VARIANTS = [
    (5, EXT_FEATURE_TABLE),
    (5, None),
    (8, EXT_FEATURE_TABLE),
    (8, None),
    (300, EXT_FEATURE_TABLE),
    (300, EXT_BITMAPS),
    (300, None),
    (600, EXT_BITMAPS),
    (0, None),
]


@pytest.mark.parametrize("n,before", VARIANTS,
                         ids=[f"{n}B-{'last' if b is None else hex(b)}" for n, b in VARIANTS])
def test_every_write_keeps_it(tmp_path: Path, capsys: pytest.CaptureFixture[str], header_steps: Steps, n: int,
                              before: int | None) -> None:
    img, data, order = prepare(tmp_path, n, before)

    def after(expected: list[tuple[str, int, list[str]]]) -> None:
        assert_kept(img, UNKNOWN, data, order)
        qemu.assert_clean(img)
        assert bitmap_set(img) == expected

    assert qj("bitmap", "--add", img, "b0") == 0
    after([("src", 65536, ["auto"]), ("b0", 65536, ["auto"])])
    assert qj("bitmap", "--add", "-g", "512", "--disable", img, "b1") == 0
    after([("src", 65536, ["auto"]), ("b0", 65536, ["auto"]), ("b1", 512, [])])
    assert qj("bitmap", "--enable", img, "b1") == 0
    after([("src", 65536, ["auto"]), ("b0", 65536, ["auto"]), ("b1", 512, ["auto"])])
    assert qj("bitmap", "--disable", img, "b0") == 0
    after([("src", 65536, ["auto"]), ("b0", 65536, []), ("b1", 512, ["auto"])])
    assert qj("bitmap", "--merge", "src", img, "b1") == 0
    after([("src", 65536, ["auto"]), ("b0", 65536, []), ("b1", 512, ["auto"])])
    assert dump(capsys, img, "b1") == [(MiB, 64 << 10)]
    assert qj("bitmap", "--clear", img, "src") == 0
    after([("src", 65536, ["auto"]), ("b0", 65536, []), ("b1", 512, ["auto"])])
    assert dump(capsys, img, "src") == []
    assert qj("bitmap", "--remove", img, "b1") == 0
    after([("src", 65536, ["auto"]), ("b0", 65536, [])])
    assert qj("bitmap", "--remove", img, "b0") == 0
    assert qj("bitmap", "--remove", img, "src") == 0
    after([])
    assert_no_live_bitmaps_ext(img)

    # check -r all with a leak to repair (refcounts only).
    bump_refcount_of_cluster0(img)
    assert qemu.check(img)[0] == 3
    assert qj("check", "-r", "all", img) == 0
    after([])

    # check -r all that must rewrite the header: bitmaps left by a program without
    # bitmap support (autoclear bit clear) are dropped and their clusters reclaimed.
    assert qj("bitmap", "--add", img, "again") == 0
    after([("again", 65536, ["auto"])])
    clear_autoclear_bitmaps(img)
    assert qj("check", "-r", "all", img) == 0
    after([])
    assert_no_live_bitmaps_ext(img)
    assert_steps_safe(header_steps, UNKNOWN, data)

    # QEMU still works on it afterwards, and keeps the extension too.
    qemu.qemu_img("bitmap", "--add", str(img), "theirs")
    qemu.qemu_io(img, "read -P 0x5a 1M 64k")
    qemu.assert_clean(img)
    assert any(t == UNKNOWN and d == data for _, t, d in parse_exts(cluster0(img)))


def test_in_use_repair_keeps_it(tmp_path: Path, header_steps: Steps) -> None:
    """check -r all also repairs bitmaps left in use (a header and directory rewrite)."""
    img = qemu.create(tmp_path / "disk.qcow2", "1G")
    qemu.qemu_img("bitmap", "--add", str(img), "b0")
    qemu.run("qemu-io", "-f", "qcow2", "-c", "write 0 64k", "-c", "abort", str(img), check=False)
    data = payload(300)
    insert_extension(img, UNKNOWN, data, EXT_BITMAPS)
    order = [t for _, t, _ in parse_exts(cluster0(img))]
    assert bitmap_set(img) == [("b0", 65536, ["in-use", "auto"])]
    assert qj("check", "-r", "all", img) == 0
    assert_kept(img, UNKNOWN, data, order)
    qemu.assert_clean(img)
    assert bitmap_set(img) == [("b0", 65536, ["auto"])]
    assert_steps_safe(header_steps, UNKNOWN, data)


@pytest.mark.parametrize("n", [5, 300, 600])
def test_remove_last_bitmap_in_qemu_layout(tmp_path: Path, header_steps: Steps, n: int) -> None:
    """QEMU writes unknown extensions after the bitmaps extension. Dropping the bitmaps
    extension moves them towards the header, across the first sector boundary."""
    img = qemu.create(tmp_path / "disk.qcow2", "1G")
    data = payload(n)
    insert_extension(img, UNKNOWN, data)
    qemu.qemu_img("bitmap", "--add", str(img), "b0")  # QEMU rewrites cluster 0: ..., bitmaps, unknown
    assert [t for _, t, _ in parse_exts(cluster0(img))] == [EXT_FEATURE_TABLE, EXT_BITMAPS, UNKNOWN]
    order = [t for _, t, _ in parse_exts(cluster0(img))]
    assert qj("bitmap", "--remove", img, "b0") == 0
    assert_kept(img, UNKNOWN, data, order)
    assert_no_live_bitmaps_ext(img)
    qemu.assert_clean(img)
    assert bitmap_set(img) == []
    assert_steps_safe(header_steps, UNKNOWN, data)


# -- the bitmaps extension across a sector boundary -------------------------------------
class TestBitmapsExtensionAcrossSectors:
    def check_split(self, img: Path) -> None:
        c0 = cluster0(img)
        off = [o for o, t, _ in parse_exts(c0) if t == EXT_BITMAPS][0]
        size_field, offset_field = off + 8 + 8, off + 8 + 16
        assert size_field // SECTOR != offset_field // SECTOR, (size_field, offset_field)

    def test_qemu_made_bitmaps_pushed_across(self, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             header_steps: Steps) -> None:
        """An unknown extension before QEMU's bitmaps extension pushes its directory
        offset field into the next sector; qjournal rewrites the directory there."""
        img = qemu.create(tmp_path / "disk.qcow2", "1G")
        qemu.qemu_img("bitmap", "--add", str(img), "src")
        qemu.qemu_io(img, "write -P 0x5a 1M 64k")
        n = split_length(cluster0(img), EXT_BITMAPS)
        data = payload(n)
        insert_extension(img, UNKNOWN, data, EXT_BITMAPS)
        self.check_split(img)
        order = [t for _, t, _ in parse_exts(cluster0(img))]
        qemu.assert_clean(img)
        assert bitmap_set(img) == [("src", 65536, ["auto"])]
        for args, expected in [
            (["--add", "b0"], [("src", 65536, ["auto"]), ("b0", 65536, ["auto"])]),
            (["--disable", "src"], [("src", 65536, []), ("b0", 65536, ["auto"])]),
            (["--merge", "src", "b0"], [("src", 65536, []), ("b0", 65536, ["auto"])]),
            (["--clear", "src"], [("src", 65536, []), ("b0", 65536, ["auto"])]),
            (["--remove", "src"], [("b0", 65536, ["auto"])]),
        ]:
            assert qj("bitmap", *args[:-1], img, args[-1]) == 0
            self.check_split(img)
            assert_kept(img, UNKNOWN, data, order)
            qemu.assert_clean(img)
            assert bitmap_set(img) == expected
        assert_steps_safe(header_steps, UNKNOWN, data)
        assert dump(capsys, img, "b0") == [(MiB, 64 << 10)]
        assert qemu.nbd_dirty_extents(img, "b0") == [(MiB, 64 << 10)]
        # QEMU writes through the image and stores the bitmap again.
        qemu.qemu_io(img, "write 8M 64k")
        assert qemu.nbd_dirty_extents(img, "b0") == [(MiB, 64 << 10), (8 * MiB, 64 << 10)]
        qemu.assert_clean(img)

    @pytest.mark.parametrize("before", [None, EXT_FEATURE_TABLE])
    def test_qjournal_adds_bitmaps_across(self, tmp_path: Path, header_steps: Steps, before: int | None) -> None:
        """qjournal appends the bitmaps extension after a long unknown extension, across the boundary."""
        img = qemu.create(tmp_path / "disk.qcow2", "1G")
        n = split_length(cluster0(img), before)
        data = payload(n)
        insert_extension(img, UNKNOWN, data, before)
        order = [t for _, t, _ in parse_exts(cluster0(img))]
        qemu.assert_clean(img)
        assert qj("bitmap", "--add", img, "b0") == 0
        self.check_split(img)
        assert_kept(img, UNKNOWN, data, order)
        qemu.assert_clean(img)
        assert bitmap_set(img) == [("b0", 65536, ["auto"])]
        for name in ("b1", "b2"):
            assert qj("bitmap", "--add", "-g", "4096", img, name) == 0
        assert qj("bitmap", "--remove", img, "b1") == 0
        assert_kept(img, UNKNOWN, data, order)
        qemu.assert_clean(img)
        assert bitmap_set(img) == [("b0", 65536, ["auto"]), ("b2", 4096, ["auto"])]
        assert_steps_safe(header_steps, UNKNOWN, data)
        qemu.qemu_io(img, "write 3M 4k")
        assert qemu.nbd_dirty_extents(img, "b2") == [(3 * MiB, 4096)]
        assert qemu.nbd_dirty_extents(img, "b0") == [(3 * MiB, 64 << 10)]

    def test_long_600_byte_extension(self, tmp_path: Path, header_steps: Steps) -> None:
        """600 bytes before QEMU's bitmaps extension: the extension moves to the third sector."""
        img = qemu.create(tmp_path / "disk.qcow2", "1G")
        qemu.qemu_img("bitmap", "--add", str(img), "src")
        data = payload(600)
        insert_extension(img, UNKNOWN, data, EXT_BITMAPS)
        order = [t for _, t, _ in parse_exts(cluster0(img))]
        qemu.assert_clean(img)
        assert qj("bitmap", "--add", img, "b0") == 0
        assert qj("bitmap", "--disable", img, "src") == 0
        assert_kept(img, UNKNOWN, data, order)
        qemu.assert_clean(img)
        assert bitmap_set(img) == [("src", 65536, []), ("b0", 65536, ["auto"])]
        assert_steps_safe(header_steps, UNKNOWN, data)


# -- with a backing file --------------------------------------------------------------
class TestBackingFile:
    @pytest.fixture
    def base(self, tmp_path: Path) -> Path:
        base = qemu.create(tmp_path / "base.qcow2", "64M")
        qemu.qemu_io(base, "write -P 0xab 0 2M")
        return base

    @pytest.mark.parametrize("n,before,absolute", [
        (5, None, False), (300, EXT_FEATURE_TABLE, False), (300, None, True), (0, EXT_BACKING_FORMAT, True),
    ])
    def test_backing_name_survives(self, tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str],
                                   header_steps: Steps, n: int, before: int | None, absolute: bool) -> None:
        backing = str(base) if absolute else base.name
        top = tmp_path / "top.qcow2"
        qemu.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", str(top))
        qemu.qemu_io(top, "write -P 0xcd 1M 64k")
        data = payload(n)
        insert_extension(top, UNKNOWN, data, before)
        order = [t for _, t, _ in parse_exts(cluster0(top))]
        qemu.assert_clean(top)
        assert qemu.info(top)["backing-filename"] == backing

        def after(expected: list[tuple[str, int, list[str]]]) -> None:
            assert_kept(top, UNKNOWN, data, order)
            assert backing_name(cluster0(top)) == backing.encode()
            qemu.assert_clean(top)
            info = qemu.info(top)
            assert info["backing-filename"] == backing
            assert info["backing-filename-format"] == "qcow2"
            assert bitmap_set(top) == expected
            qemu_read(top, "read -P 0xab 0 1M", "read -P 0xcd 1M 64k", "read -P 0xab 1088k 960k")

        assert qj("bitmap", "--add", top, "b0") == 0
        after([("b0", 65536, ["auto"])])
        assert qj("bitmap", "--add", "-g", "512", "--disable", top, "b1") == 0
        after([("b0", 65536, ["auto"]), ("b1", 512, [])])
        assert qj("bitmap", "--enable", top, "b1") == 0
        assert qj("bitmap", "--merge", "b0", top, "b1") == 0
        after([("b0", 65536, ["auto"]), ("b1", 512, ["auto"])])
        assert qj("bitmap", "--remove", top, "b0") == 0
        assert qj("bitmap", "--remove", top, "b1") == 0
        after([])
        assert qj("check", "-r", "all", top) == 0
        after([])
        capsys.readouterr()
        assert qj("info", "--output=json", top) == 0
        ours = json.loads(capsys.readouterr().out)
        assert ours["backing-filename"] == backing
        assert ours["qjournal-unknown-extensions"] == [{"type": "0x12345678", "length": n}]
        assert_steps_safe(header_steps, UNKNOWN, data)
        # QEMU writes guest data through the overlay afterwards.
        qemu.qemu_io(top, "write -P 0xef 1536k 4k", "read -P 0xab 0 1M", "read -P 0xef 1536k 4k")
        qemu.assert_clean(top)

    def test_backing_name_must_move_in_a_full_cluster(self, tmp_path: Path, header_steps: Steps,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
        """4 KiB clusters, and once the bitmaps extension is added, list and name fill
        cluster 0: the name can only go right after the new list, over its old place.
        Either qjournal finds a crash-safe sequence, or it refuses and changes nothing."""
        deep = tmp_path / ("d" * 60)
        deep.mkdir()
        far = qemu.create(deep / "base.qcow2", "64M")
        qemu.qemu_io(far, "write -P 0xab 0 2M")
        top = tmp_path / "top.qcow2"
        qemu.run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", str(far),
                 "-F", "qcow2", str(top))
        c0 = cluster0(top)
        name = backing_name(c0)
        assert name is not None and len(name) > 32
        n = (4096 - ext_end(c0) - 8 - 32 - len(name)) & ~7
        data = payload(n)
        insert_extension(top, UNKNOWN, data)
        order = [t for _, t, _ in parse_exts(cluster0(top))]
        qemu.assert_clean(top)
        before = top.read_bytes()
        code = qj("bitmap", "--add", top, "b0")
        if code != 0:
            assert "backing file name" in capsys.readouterr().err
            assert top.read_bytes() == before
            return
        c0 = cluster0(top)
        assert_kept(top, UNKNOWN, data, order)
        assert backing_name(c0) == name
        qemu.assert_clean(top)
        assert qemu.info(top)["backing-filename"] == str(far)
        assert bitmap_set(top) == [("b0", 65536, ["auto"])]
        qemu_read(top, "read -P 0xab 0 2M")
        assert_steps_safe(header_steps, UNKNOWN, data)

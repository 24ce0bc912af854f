"""Crash every bitmap operation after each write it makes, in the journal or the image.

For every prefix of the recorded writes (the journal and the image in their global
order), two readers look at the crashed files:
- qjournal, after recovery: exactly the old state or exactly the new one, and a second
  recovery changes nothing;
- a reader that ignores the journal (qemu-img check/info, and qjournal without its
  journal): no corruption; the old bitmaps, the new ones, or none (dropped through a
  clear autoclear bit); leaks allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

import qemu
import qjournal
from crashsim.recorder import IMAGE, JOURNAL, Recording, RecordingMedium, apply_entry
from qjournal import Image
from qjournal.storage.medium import MemoryMedium

MiB = 1 << 20


def semantic(img: Image) -> list[tuple]:
    out = []
    for name in img.bitmaps:
        b = img.bitmaps[name]
        bits = "in-use" if b.in_use else tuple(b.dirty_extents())
        out.append((name, b.granularity, b.entry.flags, bits))
    return out


def open_state(files: dict[str, bytes], journal: bool, writable: bool) -> Image:
    jm = MemoryMedium(files[JOURNAL] if journal else b"")
    return Image("crashed.qcow2", "r+" if writable else "r", medium=MemoryMedium(files[IMAGE]), journal_medium=jm)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    d = tmp_path_factory.mktemp("recover")
    img = qemu.create(d / "base.qcow2", "64M", "cluster_size=4096")
    qemu.qemu_img("bitmap", "--add", str(img), "stale")
    qemu.run("qemu-io", "-f", "qcow2", "-c", "write 30M 4k", "-c", "abort", str(img), check=False)
    qemu.qemu_img("bitmap", "--add", str(img), "b0")
    qemu.qemu_img("bitmap", "--add", "-g", "4096", str(img), "b1")
    qemu.qemu_io(img, "write 0 64k", "write 10M 1M", "write 63M 4k")
    qemu.qemu_img("bitmap", "--disable", str(img), "b1")
    qemu.qemu_img("bitmap", "--add", "-g", "512", str(img), "b2")
    qemu.qemu_io(img, "write 20M 8k")
    qemu.qemu_img("bitmap", "--add", str(img), "fresh")
    assert [b["flags"] for b in qemu.bitmaps(img)] == [["in-use", "auto"], ["auto"], [], ["auto"], ["auto"]]
    return img.read_bytes()


def remove_all(img: Image) -> None:
    with img.transaction():
        for name in list(img.bitmaps):
            img.bitmaps.remove(name)


def several(img: Image) -> None:
    with img.transaction():
        img.bitmaps.remove("fresh")
        img.bitmaps.add("new", 1 << 16)
        img.bitmaps.merge("new", "b1")


WORKLOADS: dict[str, Callable[[Image], object]] = {
    "add": lambda img: img.bitmaps.add("added", 4096),
    "add-disabled": lambda img: img.bitmaps.add("added", 1 << 20, disabled=True),
    "remove": lambda img: img.bitmaps.remove("fresh"),
    "remove-all": remove_all,
    "clear": lambda img: img.bitmaps.clear("b1"),
    "enable": lambda img: img.bitmaps.enable("b1"),
    "disable": lambda img: img.bitmaps.disable("fresh"),
    "merge": lambda img: img.bitmaps.merge("fresh", "b1"),
    "repair": lambda img: img.bitmaps.repair("stale"),
    "set-in-use": lambda img: img.bitmaps.set_in_use("fresh", True),
    "clear-in-use": lambda img: img.bitmaps.set_in_use("stale", False),
    "transaction": several,
}


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_crash_after_every_write(workload: str, base: bytes, tmp_path: Path) -> None:
    rec = Recording({IMAGE: base, JOURNAL: b""})
    with Image("rec.qcow2", "r+", medium=RecordingMedium(rec, IMAGE),
               journal_medium=RecordingMedium(rec, JOURNAL)) as img:
        old = semantic(open_state(rec.initial, False, False))
        WORKLOADS[workload](img)
    new = semantic(open_state(rec.state(len(rec.entries)), True, False))
    assert new != old, "the workload changed nothing"
    old_names = [(n, g, f) for n, g, f, _ in old]
    new_names = [(n, g, f) for n, g, f, _ in new]
    cuts = [0] + [i + 1 for i in rec.writes()]
    assert len(cuts) > 4
    seen: set[str] = set()
    for cut in cuts:
        files = rec.state(cut)
        # qjournal, after recovery: old or new, exactly.
        with open_state(files, True, True) as img:
            got = semantic(img)
            assert got in (old, new), f"cut {cut}: qjournal after recovery sees {got}"
            seen.add("old" if got == old else "new")
            after = bytes(img.medium.buf), bytes(img.journal.jmedium.buf) if img.journal.jmedium else b""  # type: ignore[attr-defined]
        with Image("again.qcow2", "r+", medium=MemoryMedium(after[0]), journal_medium=MemoryMedium(after[1])) as again:
            assert bytes(again.medium.buf) == after[0], f"cut {cut}: a second recovery changed the image"  # type: ignore[attr-defined]
        # A reader that ignores the journal.
        with open_state(files, False, False) as img:
            plain = semantic(img)
            assert plain in (old, new, []), f"cut {cut}: without the journal a reader sees {plain}"
            seen.add("plain-" + ("old" if plain == old else "new" if plain == new else "dropped"))
        path = tmp_path / "state.qcow2"
        path.write_bytes(files[IMAGE])
        code, out = qemu.check(path)
        assert code in (0, 3) and not out.get("corruptions"), f"cut {cut}: qemu-img check: {out}"
        names = [(b["name"], b["granularity"]) for b in qemu.bitmaps(path)]
        assert names in ([(n, g) for n, g, _ in old_names], [(n, g) for n, g, _ in new_names], []), \
            f"cut {cut}: qemu-img info sees {names}"
    # The cuts reach both sides of the commit, and the plain reader sees the switch.
    assert {"old", "new", "plain-old", "plain-new"} <= seen, seen



WRITES: dict[str, tuple[int, int]] = {
    "allocating": (3 * MiB + 100, 70 << 10),     # new clusters, COW fill, L2 update
    "in-place": (10 * MiB + 4096, 8192),           # allocated clusters: bits first, data in place
    "mixed": (10 * MiB + 1000 * 1024, 200 << 10),  # both, across an allocated/unallocated edge
}


@pytest.mark.parametrize("kind", sorted(WRITES))
def test_guest_write_crash(kind: str, base: bytes, tmp_path: Path) -> None:
    """A crash at any write of a guest write: no corruption, and whatever new data a
    reader sees, every enabled bitmap that claims to be consistent has its bits."""
    offset, length = WRITES[kind]
    data = bytes([0xA5]) * length
    rec = Recording({IMAGE: base, JOURNAL: b""})
    with Image("rec.qcow2", "r+", medium=RecordingMedium(rec, IMAGE),
               journal_medium=RecordingMedium(rec, JOURNAL)) as img:
        old_data = img.read(offset, length)
        img.write(offset, data)
    assert old_data != data
    cuts = [0] + [i + 1 for i in rec.writes()]
    seen = set()
    for cut in cuts:
        files = rec.state(cut)
        for journal in (True, False):
            with open_state(files, journal, journal) as img:
                got = img.read(offset, length)
                if journal:
                    # After recovery the mapping is old or new; in-place data may be torn,
                    # as on any disk, but never anything but old or new bytes.
                    assert all(g in (o, n) for g, o, n in zip(got, old_data, data)), f"cut {cut}"
                seen.add((journal, got == data, got == old_data))
                changed = [offset + i for i, (g, o) in enumerate(zip(got, old_data)) if g != o]
                for name in ("b0", "fresh") if changed else ():  # the enabled, consistent bitmaps
                    b = img.bitmaps[name]
                    dirty = list(b.dirty_extents())
                    for pos in changed[::512] + changed[-1:]:
                        assert any(s <= pos < s + n for s, n in dirty), \
                            f"cut {cut}: {name} misses the write at {pos:#x} but the data is there"
        path = tmp_path / "state.qcow2"
        path.write_bytes(files[IMAGE])
        code, out = qemu.check(path)
        assert code in (0, 3) and not out.get("corruptions"), f"cut {cut}: qemu-img check: {out}"
    assert (True, True, False) in seen and (True, False, True) in seen, seen


def _committed_unapplied(base: bytes, tmp_path: Path) -> Path:
    """An image whose journal holds a committed transaction that never reached the image."""
    rec = Recording({IMAGE: base, JOURNAL: b""})
    with Image("rec.qcow2", "r+", medium=RecordingMedium(rec, IMAGE),
               journal_medium=RecordingMedium(rec, JOURNAL)) as img:
        img.bitmaps.add("pending", 65536)
    commit = next(i for i, e in enumerate(rec.entries) if e.kind == "mark" and e.name == "commit")
    files = rec.state(commit + 1)
    path = tmp_path / "crashed.qcow2"
    path.write_bytes(files[IMAGE])
    Path(f"{path}.qjournal").write_bytes(files[JOURNAL])
    return path


class TestRecoverCommand:
    def test_journal_shows_and_recover_replays(self, base: bytes, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
        from qjournal.cli import main
        path = _committed_unapplied(base, tmp_path)
        assert "pending" not in [b["name"] for b in qemu.bitmaps(path)]
        assert main(["journal", str(path)]) == 0
        assert "committed" in capsys.readouterr().out
        # A read-only open shows the committed state and writes nothing.
        before = path.read_bytes()
        assert main(["info", str(path)]) == 0
        assert "pending" in capsys.readouterr().out
        assert path.read_bytes() == before
        assert main(["recover", str(path)]) == 0
        assert "1 transaction" in capsys.readouterr().out
        assert "pending" in [b["name"] for b in qemu.bitmaps(path)]
        qemu.assert_clean(path)
        assert main(["recover", str(path)]) == 0
        assert "nothing to recover" in capsys.readouterr().out

    def test_recover_refuses_an_image_changed_since(self, base: bytes, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
        from qjournal.cli import main
        path = _committed_unapplied(base, tmp_path)
        qemu.qemu_img("bitmap", "--add", str(path), "by-qemu")  # QEMU wrote the image after the crash
        image, journal = path.read_bytes(), Path(f"{path}.qjournal").read_bytes()
        assert main(["recover", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "offset" in err, err
        assert main(["bitmap", "--add", str(path), "x"]) == 1
        assert path.read_bytes() == image and Path(f"{path}.qjournal").read_bytes() == journal
        assert "by-qemu" in [b["name"] for b in qemu.bitmaps(path)]


    def test_read_only_open_shows_the_image_as_it_stands(self, base: bytes, tmp_path: Path) -> None:
        """A stale journal (QEMU changed the image after the crash) is never shown as the
        image's state: a read-only open warns and shows the file as it is on disk."""
        import warnings
        from qjournal.errors import StaleJournalWarning
        path = _committed_unapplied(base, tmp_path)
        with qjournal.open(path) as img:                 # the journal still matches: its state shows
            assert "pending" in img.bitmaps and img.stale_journal is None
        qemu.qemu_img("bitmap", "--add", str(path), "by-qemu")
        image, journal = path.read_bytes(), Path(f"{path}.qjournal").read_bytes()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with qjournal.open(path) as img:
                assert list(img.bitmaps) == [b["name"] for b in qemu.bitmaps(path)]
                assert "pending" not in img.bitmaps and img.stale_journal
        assert [w.category for w in caught] == [StaleJournalWarning]
        assert path.read_bytes() == image and Path(f"{path}.qjournal").read_bytes() == journal


def test_refcount_table_growth_crash(tmp_path: Path) -> None:
    """A guest write that outgrows the refcount table: the new table is switched in
    before anything points at the clusters only it counts."""
    img = qemu.create(tmp_path / "g.qcow2", "64M", "cluster_size=512", "refcount_bits=64")
    qemu.qemu_io(img, "write 0 1900k")
    rec = Recording({IMAGE: img.read_bytes(), JOURNAL: b""})
    with Image("rec.qcow2", "r+", medium=RecordingMedium(rec, IMAGE),
               journal_medium=RecordingMedium(rec, JOURNAL)) as q:
        old_table = q.header.refcount_table_offset
        q.write(2 * MiB, b"\x5a" * (256 << 10))
        assert q.header.refcount_table_offset != old_table, "the refcount table did not grow"
    steps = [e.name for e in rec.entries if e.kind == "mark"]
    assert steps.index("refcount-table-switched") < steps.index("l1-updated")
    state = {k: bytearray(v) for k, v in rec.initial.items()}
    marks = {i for i, e in enumerate(rec.entries) if e.kind == "mark"}
    for cut, entry in enumerate(rec.entries, 1):
        apply_entry(state, entry)
        if cut - 1 not in marks:  # a crash at every step boundary and after the commit
            continue
        files = {k: bytes(v) for k, v in state.items()}
        path = tmp_path / "state.qcow2"
        path.write_bytes(files[IMAGE])
        code, out = qemu.check(path)
        assert code in (0, 3) and not out.get("corruptions"), f"cut {cut}: qemu-img check: {out}"
        with open_state(files, True, True) as q:
            assert q.read(2 * MiB, 256 << 10) in (bytes(256 << 10), b"\x5a" * (256 << 10)), f"cut {cut}"

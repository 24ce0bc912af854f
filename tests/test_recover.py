"""Crash every bitmap operation and guest write after each write it makes, in the journal or the image.

The crash states, the allowed outcomes and the judge are crashsim's (``crashsim.harness``):
every in-order prefix of the recorded writes (the journal and the image in their global
order) and the state right after each barrier, each looked at by two readers:
- qjournal, after recovery: exactly the old state or exactly the new one (bitmaps, disk
  size and guest data), and a second recovery changes nothing;
- a reader that ignores the journal (qemu-img check/info, and qjournal without its
  journal): no corruption; the old bitmaps, the new ones, or none (dropped through a
  clear autoclear bit); leaks allowed; guest sectors each old or new, and every enabled
  bitmap that claims to be consistent marks every sector whose data changed.
"""
from __future__ import annotations

import json

from pathlib import Path

import attrs
import pytest

import qemu
import qjournal
from crashsim import harness
from crashsim.recorder import IMAGE, JOURNAL, Recording, RecordingMedium
from crashsim.workloads import IMG, STANDARD, WORKLOADS, Base, Workload, qemu_img_cmd, qemu_io_cmd
from qjournal import Image

MiB = 1 << 20

# crashsim's standard base with a 1 MiB write at 10M (one whole L2 table's worth of 4 KiB clusters).
BASE = attrs.evolve(STANDARD, name="test-recover", commands=tuple(
    qemu_io_cmd("write 0 64k", "write 10M 1M", "write 63M 4k") if c == qemu_io_cmd("write 0 64k", "write 10M 64k",
                                                                                    "write 63M 4k") else c
    for c in STANDARD.commands))
assert BASE.commands != STANDARD.commands


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    data = BASE.build()
    path = tmp_path_factory.mktemp("recover") / "base.qcow2"
    path.write_bytes(data)
    assert [b["flags"] for b in qemu.bitmaps(path)] == [["in-use", "auto"], ["auto"], [], ["auto"], ["auto"]]
    return data


# crashsim's built-in bitmap workloads (each operation of img.bitmaps), on this base.
BITMAP_OPS = ("add", "add-disabled", "remove", "remove-all", "clear", "enable", "disable", "merge", "repair",
              "set-in-use", "clear-in-use", "transaction")


@pytest.mark.parametrize("name", BITMAP_OPS)
def test_crash_after_every_write(name: str, base: bytes) -> None:
    w = harness.check(attrs.evolve(WORKLOADS[name], base=BASE))
    # The states reach both sides of the commit, and the plain reader sees the switch.
    harness.assert_passes(w, qjournal=("old", "new"), plain=("old", "new"))
    assert len(w.states) > 4


WRITES: dict[str, tuple[int, int, bool]] = {         # guest offset, length, in place (the whole call is one operation)
    "allocating": (3 * MiB + 100, 70 << 10, False),   # new clusters, COW fill, L2 update
    "in-place": (10 * MiB + 4096, 8192, True),          # allocated clusters: bits first, data in place
    "mixed": (10 * MiB + 1000 * 1024, 200 << 10, True),  # both, across an allocated/unallocated edge
}


@pytest.mark.parametrize("kind", sorted(WRITES))
def test_guest_write_crash(kind: str, base: bytes) -> None:
    """A crash at any write of a guest write: no corruption; after recovery every sector old
    or new; whatever new data a reader sees, every enabled bitmap that claims to be
    consistent has its bits."""
    offset, length, in_place = WRITES[kind]
    w = harness.check(Workload(f"guest-write-{kind}", f"guest write of {length} bytes at {offset:#x}",
                               lambda img: img.write(offset, bytes([0xA5]) * length), base=BASE,
                               whole=in_place, relaxed=True))
    harness.assert_passes(w, qjournal=("old", "new"))


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


    def test_stale_journal_through_the_command_line(self, base: bytes, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
        """Read-only commands warn in one line and show the image as it stands; recover
        refuses; recover --discard drops the journal and keeps the image; neither file
        changes until then."""
        from qjournal.cli import main
        path = _committed_unapplied(base, tmp_path)
        qemu.qemu_img("bitmap", "--add", str(path), "by-qemu")
        image, journal = path.read_bytes(), Path(f"{path}.qjournal").read_bytes()
        capsys.readouterr()
        assert main(["info", "--output=json", str(path)]) == 0
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and err.startswith("qjournal: warning: ") and "stale" in err, err
        assert [b["name"] for b in json.loads(out)["format-specific"]["data"]["bitmaps"]] == \
            [b["name"] for b in qemu.bitmaps(path)]
        assert main(["recover", "--discard", str(tmp_path / "missing.qcow2")]) == 1
        assert main(["recover", str(path)]) == 1
        assert path.read_bytes() == image and Path(f"{path}.qjournal").read_bytes() == journal
        capsys.readouterr()
        assert main(["recover", "--discard", str(path)]) == 0
        assert "removed" in capsys.readouterr().out
        assert path.read_bytes() == image and not Path(f"{path}.qjournal").exists()
        assert main(["bitmap", "--add", str(path), "after"]) == 0
        qemu.assert_clean(path)

    def test_discard_refuses_a_journal_that_matches(self, base: bytes, tmp_path: Path) -> None:
        from qjournal.cli import main
        path = _committed_unapplied(base, tmp_path)
        journal = Path(f"{path}.qjournal").read_bytes()
        assert main(["recover", "--discard", str(path)]) == 1
        assert Path(f"{path}.qjournal").read_bytes() == journal

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


REFTABLE_BASE = Base("test-recover-small-reftable", (
    qemu_img_cmd("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", IMG, "64M"),
    qemu_io_cmd("write 0 1900k"),
))


def _outgrow_the_refcount_table(img: Image) -> None:
    old_table = img.header.refcount_table_offset
    img.write(2 * MiB, b"\x5a" * (256 << 10))
    assert img.header.refcount_table_offset != old_table, "the refcount table did not grow"


def test_refcount_table_growth_crash() -> None:
    """A guest write that outgrows the refcount table: the new table is switched in
    before anything points at the clusters only it counts."""
    w = harness.check(Workload("outgrow-reftable", "guest write that outgrows the refcount table",
                               _outgrow_the_refcount_table, base=REFTABLE_BASE, relaxed=True))
    harness.assert_passes(w, qjournal=("old", "new"))
    steps = [e.name for e in w.entries if e.kind == "mark"]
    assert steps.index("refcount-table-switched") < steps.index("l1-updated")

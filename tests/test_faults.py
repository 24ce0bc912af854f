"""A full disk is an error, never a killed process or a damaged image.

Oracle: qemu-img check and qemu-io on the image afterwards. The disk is made full for
one process by RLIMIT_FSIZE (with SIGXFSZ ignored, a write past the limit fails with
EFBIG, as one on a full file system fails with ENOSPC).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

import damage
import qemu
from qjournal.api import Image
from qjournal.core.ordering import Phase
from qjournal.errors import QcowError
from qjournal.storage.faults import EVENTS, JOURNAL_SYNC, STEP_EVENTS, Fault, Injector, canonical
from qjournal.storage.medium import WRITEBACK_MIN, FileMedium, MediumError, MmapMedium, System

CLI = "import sys; from qjournal.cli import main; sys.exit(main(sys.argv[1:]))"
LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from qjournal.cli import main
sys.exit(main(sys.argv[1:]))
"""


def limited(limit: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", LIMITED.format(limit=limit), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [
    ["write", "{img}", "0", "-P", "0x66", "8M"],         # guest data into new clusters
    ["bitmap", "--add", "-g", "512", "{img}", "fine"],    # new bitmap tables and directory
    ["resize", "{img}", "+1G"],                          # a new L1 table
])
def test_file_size_limit_is_an_error_and_the_image_keeps_its_state(tmp_path: Path, args: list[str]) -> None:
    img = qemu.create(tmp_path / "a.qcow2", "64M", "cluster_size=4096")
    qemu.qemu_io(img, "write -P 0x11 0 1M")
    qemu.qemu_img("bitmap", "--add", str(img), "b0")
    before = (tmp_path / "a.raw")
    qemu.qemu_img("convert", "-O", "raw", str(img), str(before))
    size = img.stat().st_size
    res = limited(size + 8192, *[a.format(img=img) for a in args])
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("qjournal: "), res.stderr
    assert "Traceback" not in res.stderr
    code, out = qemu.check(img)
    assert code in (0, 3) and not out.get("corruptions"), out     # clean, or leaks only
    after = tmp_path / "b.raw"
    qemu.qemu_img("convert", "-U", "-O", "raw", str(img), str(after))
    assert after.read_bytes() == before.read_bytes()
    assert [b["name"] for b in qemu.bitmaps(img)] == ["b0"]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of the test's own (CI runs as root, which may mount one)."""
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=True)


def test_full_file_system_is_an_error_not_sigbus(small_fs: Path) -> None:
    """An in-place write into a page the file system has no block for (a hole in a data
    cluster) on a full file system: pwrite fails with ENOSPC; a store into the map would
    have killed the process with SIGBUS."""
    img = qemu.create(small_fs / "a.qcow2", "16M", "cluster_size=65536")
    qemu.qemu_io(img, "write -P 0x11 0 1M")
    host = int(json.loads(qemu.qemu_img("map", "--output=json", str(img)).stdout)[0]["offset"])
    # The second 4 KiB of guest cluster 0 becomes a hole (it reads as zeros).
    fallocate = subprocess.run(["fallocate", "--punch-hole", "--keep-size", "-o", str(host + 4096), "-l", "4096",
                                str(img)], capture_output=True, text=True)
    assert fallocate.returncode == 0, fallocate.stderr
    filler = small_fs / "filler"
    with open(filler, "wb", buffering=0) as f:     # fill the file system
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\xff" * 4096)
    image = img.read_bytes()
    res = subprocess.run([sys.executable, "-c", CLI, "write", str(img), "4096", "-P", "0x22", "512"],
                         capture_output=True, text=True, timeout=60)
    if res.returncode == 0:
        qemu.qemu_io(img, "read -P 0x22 4096 512", read_only=True)    # the journal had room after all
    else:
        assert res.returncode == 1 and res.stderr.startswith("qjournal: ") and res.stderr.count("\n") == 1, \
            (res.returncode, res.stderr)
        assert img.read_bytes() == image
    filler.unlink()
    code, out = qemu.check(img)
    assert code == 0, out
    qemu.qemu_io(img, "read -P 0x11 64k 960k", read_only=True)


# -- faults injected at every named event ------------------------------------------------
#
# Oracle: qjournal's own reads after a recovery (the state must be exactly the old one or
# the new one) and qemu-img check (clean, or leaks only). Every operation runs once
# without faults, which lists its writes, flushes and resizes by event
# (qjournal.storage.faults); then once per (event, nth) with that operation failing, EIO
# on a disk that stays dead (every later operation fails too, the close included) and
# ENOSPC once.

Fingerprint = tuple[int, str, tuple[tuple[str, int, bool, str], ...]]
SPAN = 8 << 20    # every operation below changes guest bytes below this offset only
PICK = 4   # events with more operations than this are failed at the first two, one in the middle and the last


def fingerprint(path: Path) -> Fingerprint:
    """The state a user sees: virtual size, guest bytes (below SPAN), bitmaps (name, granularity, enabled, bits)."""
    with Image(path, "r", take_locks=False) as img:
        data = hashlib.sha256(img.read(0, min(img.size, SPAN))).hexdigest()
        bitmaps = tuple(sorted((name, img.bitmaps[name].granularity, img.bitmaps[name].enabled,
                                hashlib.sha256(img.bitmaps[name].bits().tobytes()).hexdigest())
                               for name in img.bitmaps))
        return img.size, data, bitmaps


def faulted_run(base: Path, work: Path, op: Callable[[Image], object],
                faults: list[Fault]) -> tuple[Injector, BaseException | None]:
    """Run ``op`` on a copy of ``base`` at ``work`` through fault-injecting media; close it."""
    shutil.copyfile(base, work)
    journal = Path(str(work) + ".qjournal")
    journal.unlink(missing_ok=True)
    inj = Injector(faults)
    im = inj.medium(MmapMedium(work, True))
    jm = inj.medium(FileMedium(journal, True, create=True), flush_event=JOURNAL_SYNC)
    error: BaseException | None = None
    try:
        img = Image(work, "r+", medium=im, journal_medium=jm)
        try:
            op(img)
        finally:
            img.close()
    except QcowError as e:
        error = e
    finally:
        im.close()
        jm.close()
    return inj, error


def picks(count: int) -> list[int]:
    return list(range(1, count + 1)) if count <= PICK else sorted({1, 2, (count + 1) // 2, count})


def make_bitmaps_base(d: Path) -> Path:
    """b1 (disabled) dirty over 0-256k, b0 (enabled) dirty over 1M-1M+64k and 3M-3M+4k (the
    second L2 table's range, which a shrink to 1M drops); 4 KiB clusters."""
    p = qemu.create(d / "bitmaps.qcow2", "4M", "cluster_size=4096")
    qemu.qemu_img("bitmap", "--add", str(p), "b1")
    qemu.qemu_io(p, "write -P 0x11 0 256k")
    qemu.qemu_img("bitmap", "--disable", str(p), "b1")
    qemu.qemu_img("bitmap", "--add", "-g", "4096", str(p), "b0")
    qemu.qemu_io(p, "write -P 0x22 1M 64k", "write -P 0x33 3M 4k")
    return p


def make_refcount_base(d: Path, used: str = "64k") -> Path:
    """512-byte clusters and 64-bit refcounts: a refcount block covers 32 KiB of file and the
    one-cluster refcount table 2 MiB, so a 64 KiB write needs new refcount blocks, and one
    that takes the file past 2 MiB a larger table too."""
    p = qemu.create(d / "refcounts.qcow2", "4M", "cluster_size=512", "refcount_bits=64")
    qemu.qemu_io(p, f"write -P 0x11 0 {used}")
    return p


def make_full_reftable_base(d: Path) -> Path:
    """As make_refcount_base, the file a little short of the 2 MiB its refcount table covers."""
    p = make_refcount_base(d, "1900k")
    assert 1900 << 10 < p.stat().st_size < 2 << 20
    return p


def make_leaky_base(d: Path) -> Path:
    """The bitmaps image with one cluster past its end counted but referenced by nothing."""
    p = d / "leaky.qcow2"
    shutil.copyfile(make_bitmaps_base(d), p)
    cluster = -(-p.stat().st_size // damage.CS)
    with open(p, "r+b") as f:
        f.truncate((cluster + 1) * damage.CS)
    damage.set_refcount(p, cluster, 1)
    code, out = qemu.check(p)
    assert code == 3 and out.get("leaks") == 1, out
    return p


OPERATIONS: dict[str, tuple[str, Callable[[Image], object], bool]] = {
    # name: (base image, operation, in place: a single overwrite of allocated clusters outside an
    # explicit transaction, whose data goes in place after the bitmap bits, as QEMU writes it)
    "bitmap add": ("bitmaps", lambda img: img.bitmaps.add("new", granularity=4096), False),
    "bitmap remove": ("bitmaps", lambda img: img.bitmaps.remove("b0"), False),
    "bitmap clear": ("bitmaps", lambda img: img.bitmaps.clear("b0"), False),
    "bitmap merge": ("bitmaps", lambda img: img.bitmaps.merge("b0", "b1"), False),
    "write into new clusters": ("bitmaps", lambda img: img.write(2 << 20, b"\x33" * 8192), False),
    "write into allocated clusters": ("bitmaps", lambda img: img.write(4096, b"\x44" * 4096), True),
    "zero": ("bitmaps", lambda img: img.write_zeroes(0, 64 << 10), False),
    "resize grow": ("bitmaps", lambda img: img.resize(3 << 30), False),
    "resize shrink": ("bitmaps", lambda img: img.resize(1 << 20, shrink=True), False),
    "check -r all, leaks": ("leaky", lambda img: img.check("all"), False),
    "bitmap disable": ("bitmaps", lambda img: img.bitmaps.disable("b0"), False),
    "write needing refcount blocks": ("refcounts", lambda img: img.write(1 << 20, b"\x66" * (64 << 10)), False),
    "write growing the refcount table": ("full reftable", lambda img: img.write(2 << 20, b"\x55" * (256 << 10)), False),
}
BASES = {"bitmaps": make_bitmaps_base, "refcounts": make_refcount_base, "full reftable": make_full_reftable_base,
         "leaky": make_leaky_base}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, make in BASES.items():
        d = tmp_path_factory.mktemp(name)
        out[name] = make(d)
    return out


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_a_fault_at_any_event_leaves_the_old_state_or_the_new_one(bases: dict[str, Path], tmp_path: Path,
                                                                  name: str) -> None:
    """Each write, flush and resize of the operation fails in turn (see the section comment):
    a one-line QcowError, then after recovery the old state (the new one allowed once the
    journal sync, the commit point, was reached) and qemu-img check clean or leaks only."""
    base_name, op, in_place = OPERATIONS[name]
    base, work = bases[base_name], tmp_path / "work.qcow2"
    old = fingerprint(base)
    dry, error = faulted_run(base, work, op, [])
    assert error is None, error
    new = fingerprint(work)
    if name.startswith("check"):
        assert qemu.check(work)[0] == 0, "the repair left leaks"    # the guest view stays; the leak goes
    else:
        assert new != old, "the operation changed nothing: it tests nothing"
    commit = next((i for i, o in enumerate(dry.trace) if o.event == JOURNAL_SYNC), len(dry.trace))
    ops_of: dict[str, list[int]] = {}  # event -> where each of its operations is in the trace
    for i, o in enumerate(dry.trace):
        ops_of.setdefault(o.event, []).append(i)
    checked: dict[str, tuple[int, dict[str, object]]] = {}
    failures = []
    runs = 0
    for event, where in sorted(ops_of.items()):
        for nth in picks(len(where)):
            for fault in (Fault(event, nth, errno.EIO, sticky=True), Fault(event, nth, errno.ENOSPC)):
                runs += 1
                inj, error = faulted_run(base, work, op, [fault])
                what = f"{name}: {fault}"
                assert inj.fired == [fault], f"{what}: the fault did not fire ({inj.counts()})"
                assert error is not None, f"{what}: the operation completed without reporting the failure"
                assert "\n" not in str(error) and str(error), f"{what}: {error!r}"
                try:
                    Image(work, "r+", take_locks=False).close()     # recovery
                    state = fingerprint(work)
                except QcowError as e:
                    failures.append(f"{what}: after recovery the image does not open: {e} ({error})")
                    continue
                allowed = {"old": old, "new": new}
                if in_place:
                    allowed["new bits, old data"] = (old[0], old[1], new[2])
                if where[nth - 1] < commit:
                    allowed = {"old": old}      # before the commit point: nothing may change
                if state not in allowed.values():
                    failures.append(f"{what}: after recovery neither {' nor '.join(allowed)} ({error})")
                digest = hashlib.sha256(work.read_bytes()).hexdigest()
                if digest not in checked:
                    checked[digest] = qemu.check(work)
                code, out = checked[digest]
                if code not in (0, 3) or out.get("corruptions"):
                    failures.append(f"{what}: qemu-img check exit {code}: {out} ({error})")
    assert not failures, "\n".join(failures)
    assert runs >= 2 * len(ops_of)


def test_the_operations_reach_every_event(bases: dict[str, Path], tmp_path: Path) -> None:
    """Together, the operations above are failed at every event qjournal writes at."""
    seen: set[str] = set()
    for base_name, op, _ in OPERATIONS.values():
        inj, error = faulted_run(bases[base_name], tmp_path / "work.qcow2", op, [])
        assert error is None, error
        seen.update(o.event for o in inj.trace)
    assert seen == EVENTS, sorted(EVENTS - seen)


def test_every_step_is_an_event_and_qemu_names_resolve() -> None:
    assert {p.value for p in Phase} == set(STEP_EVENTS)
    assert set(STEP_EVENTS.values()) <= EVENTS
    assert canonical("l2_alloc_write") == "cluster_alloc" and canonical("refblock_alloc") == "cluster_alloc"
    with pytest.raises(ValueError, match="l2_load"):
        Fault("l2_load")       # a read: nothing to fail


def test_a_write_the_system_refuses_is_a_one_line_qcow_error() -> None:
    """/dev/full refuses every write with ENOSPC, as a full file system does."""
    m = FileMedium("/dev/full", True)
    try:
        with pytest.raises(MediumError) as caught:
            m.write(4096, b"x" * 512)
    finally:
        m.close()
    e = caught.value
    assert isinstance(e, QcowError) and isinstance(e, OSError) and e.errno == errno.ENOSPC
    assert str(e) == "/dev/full: write of 0x200 bytes at offset 0x1000 failed: No space left on device"


@pytest.mark.parametrize("kind", [MmapMedium, FileMedium])
def test_a_large_write_starts_its_writeback_and_is_still_only_durable_after_the_flush(tmp_path: Path,
                                                                                     kind: type) -> None:
    """start_writeback is a hint given for writes of WRITEBACK_MIN bytes or more; the
    barrier stays the flush's (the recording system logs no barrier for the hint)."""
    calls: list[tuple[str, int, int]] = []

    class Spy(System):
        def start_writeback(self, fd: int, off: int, n: int) -> None:
            calls.append(("writeback", off, n))
            super().start_writeback(fd, off, n)

        def fsync(self, fd: int) -> None:
            calls.append(("fsync", 0, 0))
            super().fsync(fd)

    path = tmp_path / "f"
    path.write_bytes(bytes(4096))
    m = kind(path, True, system=Spy())
    try:
        m.write(0, b"a" * 512)
        m.write(4096, b"b" * WRITEBACK_MIN)
        m.flush()
    finally:
        m.close()
    assert calls == [("writeback", 4096, WRITEBACK_MIN), ("fsync", 0, 0)]
    assert path.read_bytes() == b"a" * 512 + bytes(3584) + b"b" * WRITEBACK_MIN

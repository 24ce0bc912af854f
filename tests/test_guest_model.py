"""A hypothesis state machine (derandomized under CI, see profiles.py): guest writes, zeroes and discards in transactions, against a bytearray.

Oracle: the model (a bytearray of the disk), read back through qjournal inside each
transaction and after it; the allocator's and the guest map's ``_check()`` after every
operation (sortedcontainers' habit); ``qemu-img check`` every few steps, and at the end
``qemu-img check`` and ``qemu-img compare`` against a raw file of the model.
With an enabled bitmap, ``qemu-nbd -B`` must show every written byte as dirty (extra
dirty bits are allowed). The second half corrupts the staged state by hand and expects
each ``_check()`` to fail.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

import qemu
import qjournal
from profiles import examples
from qjournal.format.tables import L2E_OFFSET_MASK, OFLAG_COPIED

KiB, MiB = 1 << 10, 1 << 20


def check_staged(tx: Any) -> None:
    """Assert the invariants of the open transaction ``tx`` (what ``img.transaction()`` yields).

    The one place in the tests that knows how to reach the staged allocator and guest
    map (``Transaction.alloc`` and ``Transaction.guest``).
    """
    tx.alloc._check()
    if tx.guest is not None:
        tx.guest._check()


# name -> (disk size, qemu-img create options, backing pattern or None, an enabled bitmap)
CONFIGS: dict[str, tuple[int, tuple[str, ...], int | None, bool]] = {
    "plain": (8 * MiB, ("cluster_size=4096",), None, False),
    "v2": (8 * MiB, ("compat=0.10", "cluster_size=4096"), None, False),
    "refcount-1-bit": (8 * MiB, ("cluster_size=4096", "refcount_bits=1"), None, False),
    "extended-l2": (40 * MiB, ("cluster_size=16384", "extended_l2=on"), None, False),
    "backing": (8 * MiB, ("cluster_size=4096",), 0x3C, False),
    # In-place data (outside an atomic transaction) waits for the commit that sets the
    # bitmap's bits first.
    "bitmap": (8 * MiB, ("cluster_size=4096",), None, True),
}
OPS = st.tuples(st.sampled_from(["write", "zero", "discard"]),
                st.one_of(st.integers(0, 1 << 26), st.integers(0, 1 << 14).map(lambda n: n * 512)),
                st.one_of(st.sampled_from([1, 511, 512, 4096, 16384, 70000, 1 * MiB, 5 * MiB]),
                          st.integers(1, 300000)),
                st.integers(1, 255))


class GuestMachine(RuleBasedStateMachine):
    """The machine over one image of ``CONFIG`` (a key of CONFIGS; see test_guest_model)."""

    CONFIG = "plain"

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="qj-guest-model-"))
        self.path = self.dir / "g.qcow2"
        self.snapshots = 0
        self.steps = 0
        self.written: list[tuple[int, int]] = []  # guest ranges written since the bitmap was added
        size, opts, backing, bitmap = CONFIGS[self.CONFIG]
        self.bitmap = bitmap
        self.size = size
        self.refcount_bits = 1 if "refcount_bits=1" in opts else 16
        args = ["create", "-q", "-f", "qcow2", "-o", ",".join(opts)]
        if backing is not None:
            base = qemu.create(self.dir / "base.qcow2", str(size), "cluster_size=65536")
            qemu.qemu_io(base, f"write -P {backing} 0 {size // 2}")
            args += ["-b", "base.qcow2", "-F", "qcow2"]
        qemu.qemu_img(*args, str(self.path), str(size))
        # Something allocated before we start: plain data, and compressed clusters.
        cs = int(next(o for o in opts if o.startswith("cluster_size=")).split("=")[1])
        qemu.qemu_io(self.path, f"write -P 0x11 {cs} {4 * cs}", f"write -c -P 0x22 {8 * cs} {2 * cs}")
        if bitmap:
            qemu.qemu_img("bitmap", "--add", str(self.path), "b0")
        self.model = bytearray(size)
        if backing is not None:
            self.model[:size // 2] = bytes([backing]) * (size // 2)
        self.model[cs:5 * cs] = b"\x11" * 4 * cs
        self.model[8 * cs:10 * cs] = b"\x22" * 2 * cs

    def _apply(self, img: qjournal.Image, op: tuple[str, int, int, int]) -> tuple[int, int]:
        kind, off, n, byte = op
        off %= self.size
        n = min(n, self.size - off)
        if kind == "write":
            img.write(off, bytes([byte]) * n)
            self.model[off:off + n] = bytes([byte]) * n
            self.written.append((off, n))
        else:
            (img.write_zeroes if kind == "zero" else img.discard)(off, n)
            self.model[off:off + n] = bytes(n)
        return off, n

    def _same(self, img: qjournal.Image, off: int, n: int) -> None:
        lo, hi = max(0, off - 4 * KiB), min(self.size, off + n + 4 * KiB)
        got = img.read(lo, hi - lo)
        if got != self.model[lo:hi]:
            bad = next(i for i in range(hi - lo) if got[i] != self.model[lo + i])
            raise AssertionError(f"guest byte {lo + bad:#x} reads {got[bad]:#x}, the model has {self.model[lo + bad]:#x}")

    @rule(ops=st.lists(OPS, min_size=1, max_size=4), atomic=st.booleans())
    def transaction(self, ops: list[tuple[str, int, int, int]], atomic: bool) -> None:
        """``atomic``: a user's transaction (overwrites copied into new clusters); else one
        with the in-place semantics of a single write or a GuestDisk batch."""
        with qjournal.open(self.path, "r+") as img:
            with img.transaction("model step") as tx:
                tx.atomic_data = atomic
                for op in ops:
                    off, n = self._apply(img, op)
                    check_staged(tx)
                    self._same(img, off, n)

    @rule(ops=st.lists(OPS, min_size=1, max_size=4))
    def abort(self, ops: list[tuple[str, int, int, int]]) -> None:
        """A user's transaction that raises: the block saw its writes, the image keeps none of
        them (the invariant reads the whole disk against the model) and keeps its size."""
        model, written, size = bytearray(self.model), list(self.written), self.path.stat().st_size
        with qjournal.open(self.path, "r+") as img:
            try:
                with img.transaction("model step, aborted") as tx:
                    for op in ops:
                        off, n = self._apply(img, op)
                        check_staged(tx)
                        self._same(img, off, n)
                    raise _Abort
            except _Abort:
                pass
        self.model, self.written = model, written
        assert self.path.stat().st_size == size, "an aborted transaction changed the file's size"

    @precondition(lambda self: self.refcount_bits > 1 and self.snapshots < 2)
    @rule()
    def snapshot(self) -> None:
        """An internal snapshot shares every table and cluster: writes must copy, COPIED must clear."""
        qemu.qemu_img("snapshot", "-c", f"s{self.snapshots}", str(self.path))
        self.snapshots += 1

    @invariant()
    def agrees_with_model(self) -> None:
        with qjournal.open(self.path) as img:
            self._same(img, 0, self.size)
        self.steps += 1
        if self.steps % 4 == 0:
            qemu.assert_clean(self.path)

    def teardown(self) -> None:
        try:
            qemu.assert_clean(self.path)
            raw = self.dir / "model.raw"
            raw.write_bytes(bytes(self.model))
            res = qemu.qemu_img("compare", "-f", "qcow2", "-F", "raw", str(self.path), str(raw), check=False)
            assert res.returncode == 0, res.stdout + res.stderr
            if self.bitmap:
                dirty = qemu.nbd_dirty_extents(self.path, "b0")
                for off, n in self.written:
                    covered = sum(max(0, min(off + n, s + k) - max(off, s)) for s, k in dirty)
                    assert covered == n, f"bitmap b0 misses part of the write {off:#x}+{n:#x}: dirty {dirty}"
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_guest_model(config: str) -> None:
    machine = type(f"GuestMachine[{config}]", (GuestMachine,), {"CONFIG": config})
    run_state_machine_as_test(machine, settings=settings(max_examples=examples(6), stateful_step_count=8))


# -- the checks catch a broken invariant ------------------------------------------------
Corruption = Callable[[Any], None]


def _image(tmp_path: Path) -> Path:
    img = qemu.create(tmp_path / "c.qcow2", "8M", "cluster_size=4096")
    qemu.qemu_io(img, "write -P 0x11 0 64k", "discard 32k 32k")  # the discard leaves free clusters
    return img


@pytest.fixture
def staged(tmp_path: Path) -> Iterator[Any]:
    """An open transaction: new clusters in an existing table, an overwrite in place, a new table."""
    with qjournal.open(_image(tmp_path), "r+") as img:
        try:
            with img.transaction("corrupted by hand") as tx:
                img.write(1 * MiB, b"\x22" * 8192)
                img.write(4096, b"\x33" * 100)
                img.write(3 * MiB, b"\x44" * 4096)
                check_staged(tx)  # sound before the corruption
                yield tx
                raise _Abort
        except _Abort:
            pass


class _Abort(Exception):
    """Leaves the transaction uncommitted: the state was corrupted on purpose."""


def _taken(tx: Any) -> int:
    return min(tx.alloc.taken)


def _forget_taken(tx: Any) -> None:
    tx.alloc.taken.discard(_taken(tx))


def _double_count(tx: Any) -> None:
    tx.alloc.deltas[_taken(tx)] = 2


def _free_again(tx: Any) -> None:
    tx.alloc.reserve([])  # the free index exists
    tx.alloc._free.add(_taken(tx))


def _lose_free(tx: Any) -> None:
    tx.alloc.reserve([])
    tx.alloc._free.remove(tx.alloc._free[0])


def _reftable_copy(tx: Any) -> None:
    tx.alloc.reftable[0] += np.uint64(4096)


def _cached_block(tx: Any) -> None:
    tx.alloc.counts(0, 0, 1)
    tx.alloc._raw[0] = bytes(len(tx.alloc._raw[0]))


def _gain_unallocated(tx: Any) -> None:
    tx.alloc.deltas[100] = 1


ALLOCATOR_CORRUPTIONS: dict[str, Corruption] = {
    "handed-out cluster forgotten": _forget_taken, "counted twice": _double_count,
    "handed-out cluster back in the free index": _free_again, "free cluster missing from the index": _lose_free,
    "refcount table copy": _reftable_copy, "cached refcount block": _cached_block,
    "reference to a cluster never handed out": _gain_unallocated,
}


@pytest.mark.parametrize("corrupt", sorted(ALLOCATOR_CORRUPTIONS))
def test_allocator_check_fails_on_a_broken_invariant(staged: Any, corrupt: str) -> None:
    ALLOCATOR_CORRUPTIONS[corrupt](staged)
    with pytest.raises(AssertionError, match="allocator: "):
        staged.alloc._check()


def _table(tx: Any, new: bool) -> Any:
    return next(t for _, t in sorted(tx.guest.tables.items()) if t.new == new)


def _copied_flag(tx: Any) -> None:
    t = _table(tx, False)
    t.words[0] ^= np.uint64(OFLAG_COPIED)
    t.changed.add(0)


def _unmarked_change(tx: Any) -> None:
    t = _table(tx, False)
    t.words[tx.guest.ew * 5] = t.words[0]


def _orig_words(tx: Any) -> None:
    _table(tx, False).orig[3] = np.uint64(12345 << 9)


def _table_moved(tx: Any) -> None:
    _table(tx, False).offset += 4096


def _l1_unmarked(tx: Any) -> None:
    tx.guest.l1_changed.clear()


def _fresh_unmapped(tx: Any) -> None:
    tx.guest.fresh.add(max(tx.alloc.taken) + 1)
    tx.alloc.taken.add(max(tx.alloc.taken) + 1)


def _fresh_twice(tx: Any) -> None:
    t = _table(tx, False)
    i = 1 * MiB // 4096  # the first of the two new clusters the fixture wrote at 1 MiB
    assert t.words[i] & np.uint64(L2E_OFFSET_MASK) and i in t.changed
    t.words[i + 1] = t.words[i]


def _deferred_elsewhere(tx: Any) -> None:
    tx.guest.deferred.append((7 * 4096, 2 * MiB, b"x"))
    tx.guest.deferred_bytes += 1
    tx.guest._deferred_at.add(2 * MiB // 4096)


GUESTMAP_CORRUPTIONS: dict[str, Corruption] = {
    "COPIED flipped": _copied_flag, "change not marked": _unmarked_change, "on-disk words edited": _orig_words,
    "table moved": _table_moved, "L1 change not marked": _l1_unmarked, "fresh cluster unmapped": _fresh_unmapped,
    "fresh cluster mapped twice": _fresh_twice, "waiting data for an unmapped cluster": _deferred_elsewhere,
}


@pytest.mark.parametrize("corrupt", sorted(GUESTMAP_CORRUPTIONS))
def test_guest_map_check_fails_on_a_broken_invariant(staged: Any, corrupt: str) -> None:
    GUESTMAP_CORRUPTIONS[corrupt](staged)
    with pytest.raises(AssertionError, match="guest map: "):
        staged.guest._check()

"""The write-ahead journal: commit, crash, recover.

The oracle is a model: the old image with the transaction's writes applied in call
order, step by step (``apply_model``). Every crash state must recover to exactly the
old state (journal cut before the commit point) or exactly the new one (after it).
Crash states are built from what a recording medium saw: a prefix of the image
writes, the steps before a barrier durable, and any subset of the in-flight step's
sectors or pages.
"""
from __future__ import annotations

import itertools
import os
import random
import struct
from typing import Iterable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import qemu
from qjournal.cli import main
from qjournal.journal.crc32c import crc32c
from qjournal.errors import JournalError, QcowError
from qjournal.journal import Journal, PendingTransaction, Step, Transaction
from qjournal.journal.records import (BEGIN, CHECKPOINT, COMMIT, STEP, WRITE, FileHeader, pack_record,
                                      pack_write)
from qjournal.storage.medium import FileMedium, MemoryMedium, MmapMedium, Range

HYPO = settings(deadline=None, derandomize=bool(os.environ.get("CI")),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

Spec = list[tuple[str, list[tuple[int, bytes]]]]


class Crash(Exception):
    """The simulated power cut."""


class Recorder(MemoryMedium):
    """A MemoryMedium that logs writes, barriers and marks, snapshots itself at each
    barrier, and crashes (raises Crash) at a chosen write."""

    def __init__(self, data: bytes = b"", crash_at: int | None = None) -> None:
        super().__init__(data)
        self.ops: list[tuple] = []
        self.snapshots: list[bytes] = []
        self.crash_at = crash_at
        self.nwrites = 0

    def write(self, off: int, data: bytes) -> None:
        if self.crash_at is not None and self.nwrites >= self.crash_at:
            raise Crash()
        self.nwrites += 1
        self.ops.append(("write", off, bytes(data)))
        super().write(off, data)

    def flush(self, ranges: Iterable[Range] | None = None) -> None:
        self.ops.append(("flush", None if ranges is None else list(ranges)))
        self.snapshots.append(bytes(self.buf))

    def mark(self, name: str) -> None:
        self.ops.append(("mark", name))

    @property
    def marks(self) -> list[str]:
        return [op[1] for op in self.ops if op[0] == "mark"]

    def steps(self) -> list[list[tuple[int, bytes]]]:
        """The image writes grouped by barrier."""
        out: list[list[tuple[int, bytes]]] = [[]]
        for op in self.ops:
            if op[0] == "write":
                out[-1].append((op[1], op[2]))
            elif op[0] == "flush":
                out.append([])
        return out[:-1]


def make_tx(spec: Spec, description: str = "test") -> Transaction:
    tx = Transaction(description)
    for name, writes in spec:
        tx.step(name)
        for off, data in writes:
            tx.write(off, data)
    return tx


def apply_model(image: bytes, spec: Spec) -> bytes:
    buf = bytearray(image)
    for _, writes in spec:
        for off, data in writes:
            buf[off:off + len(data)] = data
    return bytes(buf)


def patch(image: bytes, writes: Iterable[tuple[int, bytes]]) -> bytes:
    buf = bytearray(image)
    for off, data in writes:
        buf[off:off + len(data)] = data
    return bytes(buf)


def units(writes: list[tuple[int, bytes]], grain: int) -> list[tuple[int, bytes]]:
    """The writes cut at absolute ``grain`` boundaries: what may reach the disk alone."""
    out = []
    for off, data in writes:
        pos = off
        while pos < off + len(data):
            end = min(pos - pos % grain + grain, off + len(data))
            out.append((pos, data[pos - off:end - off]))
            pos = end
    return out


def record_bounds(journal: bytes) -> list[tuple[int, int, int]]:
    """(offset, end, type) of each record of the newest generation, up to its COMMIT."""
    out, off = [], 48
    while off + 40 <= len(journal):
        rtype, plen = struct.unpack_from(">II", journal, off)
        end = off + 40 + plen + (-plen % 8)
        out.append((off, end, rtype))
        off = end
        if rtype == COMMIT:
            break
    return out


class Committed:
    """One commit, recorded: the old and new image, the journal at the commit point
    (before the checkpoint record) and the image writes grouped by step."""

    def __init__(self, image: bytes, spec: Spec, journal: bytes = b"") -> None:
        self.old = image
        self.new = apply_model(image, spec)
        self.spec = spec
        self.old_journal = journal
        img, jm = Recorder(image), Recorder(journal)
        j = Journal(img, jm)
        j.commit(make_tx(spec))
        assert bytes(img.buf) == self.new
        self.journal = jm.snapshots[0]
        self.final_journal = bytes(jm.buf)
        self.steps = img.steps()
        self.marks = img.marks
        self.bounds = record_bounds(self.journal)
        self.commit_end = self.bounds[-1][1]
        assert self.bounds[-1][2] == COMMIT

    def expected(self, journal: bytes) -> tuple[int, bytes]:
        """What recovery must give on the old image with ``journal`` (a crash while the
        commit wrote it): the new state iff every byte up to the COMMIT's end is in.
        (A cut that leaves an old byte equal to the new one counts as past it.)"""
        if journal[:self.commit_end] == self.journal[:self.commit_end]:
            return 1, self.new
        return 0, self.old

    def image_after(self, k: int, partial: Iterable[tuple[int, bytes]] = ()) -> bytes:
        """The image with the first ``k`` steps durable and ``partial`` of the next."""
        return patch(self.old, [w for s in self.steps[:k] for w in s] + list(partial))


def recover(image: bytes, journal: bytes) -> tuple[int, bytes, bytes]:
    img, jm = MemoryMedium(image), MemoryMedium(journal)
    n = Journal(img, jm).recover()
    return n, bytes(img.buf), bytes(jm.buf)


def rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


IMAGE = rand(1, 3 * 4096 + 700)          # the end is not 512-aligned
# The shape of a bitmap directory update in place: a header sector written in the
# first and last steps, partial overlaps across steps, a write up to the image end.
SPEC: Spec = [
    ("autoclear-cleared", [(88, bytes(8))]),
    ("directory-written", [(80, rand(2, 30)), (4096 + 10, rand(3, 3000)), (9000, rand(4, 100)),
                           (len(IMAGE) - 50, rand(5, 50))]),
    ("autoclear-set", [(88, b"\x01" * 8), (600, b"zz")]),
]


@pytest.fixture(scope="module")
def committed() -> Committed:
    return Committed(IMAGE, SPEC)


class TestTransaction:
    def test_steps_and_merge(self) -> None:
        tx = Transaction("d")
        assert tx.empty
        tx.step("one")
        assert tx.empty
        tx.write(10, b"abc")
        tx.write(13, b"de")          # adjacent: merged
        tx.write(11, b"X")           # overlapping, later wins
        tx.write(100, b"far")
        tx.step("two")
        tx.write(10, b"again")       # another step: kept apart
        assert not tx.empty
        assert tx.steps == [Step("one", [(10, b"aXcde"), (100, b"far")]), Step("two", [(10, b"again")])]

    def test_later_write_wins_over_earlier_covering_one(self) -> None:
        tx = Transaction()
        tx.step("s")
        tx.write(5, b"x")
        tx.write(0, b"0123456789")
        assert tx.steps[0].writes == [(0, b"0123456789")]

    def test_write_needs_a_step(self) -> None:
        with pytest.raises(ValueError, match="tx.step"):
            Transaction().write(0, b"x")

    def test_data_is_copied(self) -> None:
        buf = bytearray(b"abc")
        tx = Transaction()
        tx.step("s")
        tx.write(0, buf)
        buf[0] = ord("z")
        assert tx.steps[0].writes == [(0, b"abc")]


class TestCommit:
    def test_commit_applies_and_checkpoints(self, committed: Committed) -> None:
        img, jm = MemoryMedium(committed.old), MemoryMedium(committed.final_journal)
        j = Journal(img, jm)
        assert j.pending() == []
        [d] = j.describe()
        assert d["state"] == "checkpointed" and d["description"] == "test" and d["generation"] == 1
        assert [s["name"] for s in d["steps"]] == [name for name, _ in SPEC]
        assert committed.new == apply_model(IMAGE, SPEC)

    def test_marks_and_barriers(self, committed: Committed) -> None:
        assert committed.marks == ["commit"] + [name for name, _ in SPEC]
        assert len(committed.steps) == len(SPEC)
        # Every write covers whole 512-byte pieces, up to the image end.
        for step in committed.steps:
            for off, data in step:
                assert off % 512 == 0
                assert (off + len(data)) % 512 == 0 or off + len(data) == len(IMAGE)

    def test_one_journal_sync_per_commit(self) -> None:
        img, jm = Recorder(IMAGE), Recorder()
        j = Journal(img, jm)
        j.commit(make_tx(SPEC))
        assert len(jm.snapshots) == 1                          # the commit point
        assert len([op for op in img.ops if op[0] == "flush"]) == len(SPEC)
        j.close()                                              # syncs the checkpoint
        assert len(jm.snapshots) == 2

    def test_empty_transaction_writes_nothing(self) -> None:
        img, jm = Recorder(IMAGE), Recorder()
        tx = Transaction()
        tx.step("nothing")
        Journal(img, jm).commit(tx)
        assert img.ops == [] and jm.ops == []

    def test_write_beyond_image_refused(self) -> None:
        img, jm = Recorder(IMAGE), Recorder()
        with pytest.raises(JournalError, match="beyond the image end"):
            Journal(img, jm).commit(make_tx([("s", [(len(IMAGE) - 1, b"ab")])]))
        assert img.ops == [] and jm.ops == []

    def test_commit_refused_while_pending(self, committed: Committed) -> None:
        img, jm = MemoryMedium(committed.old), MemoryMedium(committed.journal)
        j = Journal(img, jm)
        with pytest.raises(JournalError, match="recover"):
            j.commit(make_tx([("s", [(0, b"x")])]))
        assert j.recover() == 1
        j.commit(make_tx([("s", [(0, b"x")])]))
        assert bytes(img.buf) == patch(committed.new, [(0, b"x")])

    def test_no_journal_file(self) -> None:
        j = Journal(MemoryMedium(IMAGE), None)
        assert j.pending() == [] and j.describe() == [] and j.recover() == 0
        with pytest.raises(JournalError, match="read-only"):
            j.commit(make_tx(SPEC))

    def test_on_create(self) -> None:
        made: list[MemoryMedium] = []

        def create() -> MemoryMedium:
            made.append(MemoryMedium())
            return made[-1]

        img = MemoryMedium(IMAGE)
        j = Journal(img, None, on_create=create)
        assert made == []
        j.commit(make_tx(SPEC))
        assert len(made) == 1 and bytes(img.buf) == apply_model(IMAGE, SPEC)
        assert Journal(MemoryMedium(), made[0]).describe()[0]["state"] == "checkpointed"

    def test_before_checksums(self, committed: Committed) -> None:
        [t] = Journal(MemoryMedium(committed.old), MemoryMedium(committed.journal)).pending()
        assert isinstance(t, PendingTransaction) and t.description == "test"
        state = committed.old
        for step, crcs in zip(t.steps, t.checksums):
            for (off, data), before in zip(step.writes, crcs):
                assert before == tuple(crc32c(state[p:min(p + 512, off + len(data))])
                                       for p in range(off, off + len(data), 512))
            state = patch(state, step.writes)
        assert state == committed.new


class TestCrashBeforeCommitPoint:
    """A cut journal, the image untouched: recovery must leave exactly the old state."""

    @staticmethod
    def cuts(c: Committed) -> list[int]:
        out = set(range(0, 49, 8))
        for start, end, _ in c.bounds:
            out.update({start, start + 1, start + 20, start + 39, start + 40, (start + end) // 2, end - 1, end})
        return sorted(out)

    def test_cut_at_every_record(self, committed: Committed) -> None:
        for cut in self.cuts(committed):
            for tail in (b"", bytes(4096), rand(cut, 4096)):
                journal = committed.journal[:cut] + tail
                n, image, after = recover(committed.old, journal)
                assert (n, image) == committed.expected(journal), cut
                if n == 0:
                    assert after == journal

    def test_cut_over_an_older_generation(self) -> None:
        first = Committed(IMAGE, [("big", [(0, rand(7, 9000))])])
        second = Committed(first.new, SPEC, first.final_journal)
        assert second.commit_end < len(first.final_journal)      # old records lie beyond
        for cut in self.cuts(second):
            journal = second.journal[:cut] + first.final_journal[cut:]
            assert recover(second.old, journal)[:2] == second.expected(journal), cut

    def test_any_sectors_over_an_older_generation(self) -> None:
        # The journal write in flight, its 512-byte sectors reaching the disk in any
        # subset: the older generation (already applied) may come back to life in
        # part, and replaying it must change nothing.
        # A step name of 139 bytes puts the COMMIT's end, and the CHECKPOINT, at 1536:
        # the checkpoint alone can be overwritten while the old COMMIT survives.
        first = Committed(IMAGE, [("one", [(100, b"abc")]), ("two" + "-" * 136, [(90, b"x")])])
        assert first.commit_end == 1536
        second = Committed(first.new, SPEC, first.final_journal)
        sectors = units([(0, second.journal[:second.commit_end])], 512)
        rng = random.Random(6)
        seen = set()
        for _ in range(300):
            journal = patch(first.final_journal, [s for s in sectors if rng.random() < 0.7])
            n, image, _ = recover(second.old, journal)
            assert image == second.expected(journal)[1]
            seen.add((n, image == second.new))
        assert {(0, False), (1, False), (1, True)} <= seen     # (1, False): the old one replayed

    def test_new_records_under_the_old_header(self) -> None:
        first = Committed(IMAGE, [("big", [(0, rand(8, 9000))])])
        second = Committed(first.new, SPEC, first.final_journal)
        journal = first.final_journal[:48] + second.journal[48:]
        assert recover(second.old, journal)[:2] == (0, second.old)


class TestCrashAfterCommitPoint:
    """The journal committed, the image after any part of the apply: recovery must
    give exactly the new state."""

    def test_after_each_step(self, committed: Committed) -> None:
        for k in range(len(committed.steps) + 1):
            n, image, journal = recover(committed.image_after(k), committed.journal)
            assert (n, image) == (1, committed.new), k
            assert recover(image, journal) == (0, image, journal)          # twice: nothing

    @pytest.mark.parametrize("grain", [512, 4096])
    def test_step_partly_applied(self, committed: Committed, grain: int) -> None:
        rng = random.Random(grain)
        for k, step in enumerate(committed.steps):
            pieces = units(step, grain)
            if len(pieces) <= 10:
                subsets: Iterable[tuple] = itertools.chain.from_iterable(
                    itertools.combinations(pieces, r) for r in range(len(pieces) + 1))
            else:
                subsets = [tuple(p for p in pieces if rng.random() < 0.5) for _ in range(60)]
            for subset in subsets:
                n, image, _ = recover(committed.image_after(k, subset), committed.journal)
                assert (n, image) == (1, committed.new), (k, subset)

    def test_checkpoint_lost(self, committed: Committed) -> None:
        assert recover(committed.new, committed.journal)[:2] == (1, committed.new)


class TestCrashDuringRecovery:
    def test_second_crash(self, committed: Committed) -> None:
        rng = random.Random(3)
        for k in range(len(committed.steps) + 1):
            start = committed.image_after(k)
            for crash_at in itertools.count():
                img, jm = Recorder(start, crash_at=crash_at), MemoryMedium(committed.journal)
                try:
                    Journal(img, jm).recover()
                except Crash:
                    pass
                else:
                    break
                # The write in flight when the power went: any of its sectors.
                torn = [u for u in units([img.ops[-1][1:]] if img.ops and img.ops[-1][0] == "write" else [], 512)
                        if rng.random() < 0.5]
                mid = patch(bytes(img.buf), torn)
                n, image, journal = recover(mid, bytes(jm.buf))
                assert (n, image) == (1, committed.new), (k, crash_at)
                assert recover(image, journal) == (0, image, journal)

    def test_resumes_where_the_crash_stopped(self, committed: Committed) -> None:
        """Recovery never writes a step that already took effect: after a crash during
        step k, it starts at step k, so a reader that ignores the journal (and a second
        crash) only ever sees states the commit passed through, never an earlier one
        again (SPEC clears autoclear in step 0 and sets it in step 2: replaying step 0
        after step 2 took effect would drop the bitmaps for QEMU once more)."""
        for k in range(len(committed.steps) + 1):
            for partial in ([], committed.steps[k][:1] if k < len(committed.steps) else []):
                img = Recorder(committed.image_after(k, partial))
                assert Journal(img, MemoryMedium(committed.journal)).recover() == 1
                assert bytes(img.buf) == committed.new
                steps = [op[1] for op in img.ops if op[0] == "mark"]
                done = k + (k < len(committed.steps) and partial == committed.steps[k])   # the step landed whole
                assert steps == [name for name, _ in SPEC][done:], (k, partial)

    def test_recover_twice_same_journal(self, committed: Committed) -> None:
        img, jm = MemoryMedium(committed.old), MemoryMedium(committed.journal)
        j = Journal(img, jm)
        assert j.recover() == 1
        snapshot = (bytes(img.buf), bytes(jm.buf))
        assert j.recover() == 0
        assert Journal(img, jm).recover() == 0
        assert (bytes(img.buf), bytes(jm.buf)) == snapshot
        assert snapshot[0] == committed.new


class TestBinding:
    """A target changed after the crash: refuse, and write nothing to either file."""

    @staticmethod
    def refused(image: bytes, journal: bytes, match: str) -> None:
        img, jm = Recorder(image), Recorder(journal)
        j = Journal(img, jm)
        with pytest.raises(JournalError, match=match) as e:
            j.check_binding()
        assert "\n" not in str(e.value)
        with pytest.raises(JournalError, match=match):
            j.recover()
        assert img.ops == [] and jm.ops == []
        assert bytes(img.buf) == image and bytes(jm.buf) == journal

    @pytest.mark.parametrize("where", [4096 + 20, 200, 90, len(IMAGE) - 3, 9000 + 99])
    def test_foreign_change(self, committed: Committed, where: int) -> None:
        for k in range(len(committed.steps) + 1):
            image = bytearray(committed.image_after(k))
            image[where] = 0xFF ^ committed.old[where] if image[where] == committed.new[where] else image[where] ^ 1
            if image[where] in (committed.old[where], committed.new[where]):
                image[where] ^= 0x55
            self.refused(bytes(image), committed.journal, "neither")

    def test_change_outside_targets_is_fine(self, committed: Committed) -> None:
        image = bytearray(committed.image_after(1))
        image[3000] ^= 1                       # no write touches the block of byte 3000
        n, out, _ = recover(bytes(image), committed.journal)
        assert n == 1 and out == patch(committed.new, [(3000, bytes([image[3000]]))])

    def test_image_shrank(self, committed: Committed) -> None:
        self.refused(committed.old[:4096], committed.journal, "beyond the image end")

    def test_message_names_transaction_write_offset(self, committed: Committed) -> None:
        image = bytearray(committed.old)
        image[4096 + 20] ^= 1
        with pytest.raises(JournalError) as e:
            Journal(MemoryMedium(bytes(image)), MemoryMedium(committed.journal)).recover()
        msg = str(e.value)
        assert "transaction 1" in msg and "'directory-written'" in msg and "0x1000" in msg
        assert isinstance(e.value, QcowError)


class TestTornTail:
    def test_garbage_after_last_record(self, committed: Committed) -> None:
        for garbage in (rand(9, 1000), bytes(1000), b"\xff" * 7):
            j = Journal(MemoryMedium(committed.new), MemoryMedium(committed.final_journal + garbage))
            assert j.pending() == [] and j.describe()[0]["state"] == "checkpointed"
            n, image, _ = recover(committed.old, committed.journal + garbage)
            assert (n, image) == (1, committed.new)

    def test_flipped_bit_in_commit(self, committed: Committed) -> None:
        start, end, _ = committed.bounds[-1]
        for pos in (start, start + 30, start + 36, start + 45, end - 1):
            journal = bytearray(committed.journal)
            journal[pos] ^= 0x10
            j = Journal(MemoryMedium(committed.old), MemoryMedium(bytes(journal)))
            assert j.pending() == [] and j.describe()[0]["state"] == "incomplete"
            assert recover(committed.old, bytes(journal)) == (0, committed.old, bytes(journal))

    def test_flipped_bit_in_checkpoint(self, committed: Committed) -> None:
        journal = bytearray(committed.final_journal)
        journal[committed.commit_end + 12] ^= 1
        n, image, after = recover(committed.new, bytes(journal))
        assert (n, image) == (1, committed.new)
        assert Journal(MemoryMedium(image), MemoryMedium(after)).describe()[0]["state"] == "checkpointed"

    def test_flipped_bit_in_a_write(self, committed: Committed) -> None:
        start, end, rtype = committed.bounds[4]
        assert rtype == WRITE
        journal = bytearray(committed.journal)
        journal[(start + end) // 2] ^= 0x80
        assert recover(committed.old, bytes(journal))[:2] == (0, committed.old)


    def test_incomplete_after_pending(self) -> None:
        data = rand(13, 1024)
        before = np.array([crc32c(IMAGE[512:1024]), crc32c(IMAGE[1024:1536])], dtype=np.uint32)
        journal = TestHostileJournal.chain([
            (BEGIN, 10, b"done"), (STEP, 10, b"s"), (WRITE, 10, pack_write(512, data, before)),
            (COMMIT, 10, struct.pack(">IIQ", 1, 1, 1024)), (BEGIN, 14, b"cut"), (STEP, 14, b"s")])
        img, jm = MemoryMedium(IMAGE), MemoryMedium(journal)
        j = Journal(img, jm)
        assert [d["state"] for d in j.describe()] == ["committed", "incomplete"]
        assert j.recover() == 1
        assert bytes(img.buf) == patch(IMAGE, [(512, data)])
        # The checkpoint went over the incomplete transaction's BEGIN.
        for jj in (j, Journal(img, jm)):
            assert [(d["txid"], d["state"]) for d in jj.describe()] == [(10, "checkpointed")]


class TestGenerations:
    def test_many_transactions(self) -> None:
        rng = random.Random(5)
        img, jm = MemoryMedium(IMAGE), MemoryMedium()
        model = IMAGE
        txids = []
        for i in range(40):
            spec: Spec = [(f"s{k}", [(off, rng.randbytes(rng.randint(1, 3000 if i % 7 else 12000 - off)))
                                     for off in sorted(rng.sample(range(0, 12000), rng.randint(1, 3)))])
                          for k in range(rng.randint(1, 3))]
            spec = [(name, [(o, d[:len(IMAGE) - o]) for o, d in ws]) for name, ws in spec]
            before_journal = bytes(jm.buf)
            c = Committed(model, spec, before_journal) if i % 5 == 0 else None
            j = Journal(img, jm)
            j.commit(make_tx(spec))
            j.close()
            model = apply_model(model, spec)
            assert bytes(img.buf) == model
            [d] = Journal(MemoryMedium(model), MemoryMedium(bytes(jm.buf))).describe()
            assert d["generation"] == i + 1 and d["state"] == "checkpointed"
            txids.append(d["txid"])
            if c is not None:      # a crash in this generation, over the older one's bytes
                for cut in (48, c.commit_end - 1, c.commit_end):
                    journal = c.journal[:cut] + before_journal[cut:]
                    assert recover(c.old, journal)[:2] == c.expected(journal)
        assert txids == sorted(set(txids))


class TestHostileJournal:
    @given(st.binary(max_size=600))
    @HYPO
    def test_random_bytes(self, data: bytes) -> None:
        self.survives(IMAGE, data)

    @given(st.data())
    @HYPO
    def test_mutations(self, data: st.DataObject) -> None:
        c = _committed_small()
        journal = bytearray(c.journal)
        for _ in range(data.draw(st.integers(1, 3))):
            pos = data.draw(st.integers(0, len(journal) - 1))
            journal[pos] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(journal)))
        n, image = self.survives(c.old, bytes(journal[:cut]))
        assert image in (c.old, c.new)

    @staticmethod
    def survives(image: bytes, journal: bytes) -> tuple[int, bytes]:
        img = MemoryMedium(image)
        try:
            j = Journal(img, MemoryMedium(journal))
            j.describe()
            j.overlay()
            n = j.recover()
        except JournalError:
            return 0, bytes(img.buf)
        return n, bytes(img.buf)

    def test_unknown_version(self) -> None:
        h = bytearray(FileHeader(1, 7, 1).pack())
        h[8:12] = (2).to_bytes(4, "big")
        h[44:48] = crc32c(bytes(h[:44])).to_bytes(4, "big")
        with pytest.raises(JournalError, match="version 2"):
            Journal(MemoryMedium(IMAGE), MemoryMedium(bytes(h)))

    @staticmethod
    def chain(records: list[tuple[int, int, bytes]], salt: int = 99) -> bytes:
        h = FileHeader(3, salt, 10)
        out, crc, seq = [h.pack()], h.checksum, 10
        for rtype, txid, payload in records:
            rec, crc = pack_record(rtype, seq, salt, txid, payload, crc)
            out.append(rec)
            seq += 1
        return b"".join(out)

    def test_write_outside_a_transaction_ends_the_log(self) -> None:
        journal = self.chain([(WRITE, 10, pack_write(0, b"x" * 512, np.zeros(1, np.uint32)))])
        assert Journal(MemoryMedium(IMAGE), MemoryMedium(journal)).describe() == []

    def test_valid_chain_beyond_the_image(self) -> None:
        data = b"y" * 512
        journal = self.chain([(BEGIN, 10, b"far"), (STEP, 10, b"s"),
                              (WRITE, 10, pack_write(1 << 40, data, np.zeros(1, np.uint32))),
                              (COMMIT, 10, struct.pack(">IIQ", 1, 1, 512))])
        j = Journal(MemoryMedium(IMAGE), MemoryMedium(journal))
        assert [t.txid for t in j.pending()] == [10]
        TestBinding.refused(IMAGE, journal, "beyond the image end")

    def test_checkpoint_of_unknown_transaction_ends_the_log(self) -> None:
        journal = self.chain([(CHECKPOINT, 3, b""), (BEGIN, 11, b"x")])
        assert Journal(MemoryMedium(IMAGE), MemoryMedium(journal)).describe() == []

    def test_huge_length_bounded(self) -> None:
        journal = bytearray(self.chain([(BEGIN, 10, b"desc")]))
        journal[48 + 4:48 + 8] = (0xFFFFFFFF).to_bytes(4, "big")
        assert Journal(MemoryMedium(IMAGE), MemoryMedium(bytes(journal))).describe() == []


_SMALL: list[Committed] = []


def _committed_small() -> Committed:
    if not _SMALL:
        _SMALL.append(Committed(IMAGE[:4000], [("a", [(10, b"abc")]), ("b", [(600, rand(11, 900))]),
                                               ("c", [(12, b"Z")])]))
    return _SMALL[0]


class TestProperty:
    @given(st.data())
    @HYPO
    def test_random_transaction_and_crash(self, data: st.DataObject) -> None:
        seed = data.draw(st.integers(0, 2**32))
        rng = random.Random(seed)
        size = data.draw(st.integers(1, 9000))
        image = rng.randbytes(size)
        spec: Spec = []
        for k in range(data.draw(st.integers(1, 4))):
            writes = []
            for _ in range(data.draw(st.integers(0, 4))):
                off = data.draw(st.integers(0, size - 1))
                length = data.draw(st.integers(1, min(2000, size - off)))
                writes.append((off, rng.randbytes(length)))
            spec.append((f"step{k}", writes))
        if make_tx(spec).empty:
            return
        c = Committed(image, spec, rng.randbytes(data.draw(st.integers(0, 3000))))
        if data.draw(st.booleans()):
            # Before the commit point: a prefix of the journal write on the old bytes.
            cut = data.draw(st.integers(0, c.commit_end - 1))
            journal = c.journal[:cut] + c.old_journal[cut:]
            start, expected = c.old, c.expected(journal)[1]
        else:
            k = data.draw(st.integers(0, len(c.steps)))
            inflight = units(c.steps[k], 512) if k < len(c.steps) else []
            partial = [u for u in inflight if rng.random() < 0.5]
            journal, start, expected = c.journal, c.image_after(k, partial), c.new
            crash_at = data.draw(st.none() | st.integers(0, 12))
            if crash_at is not None:   # a second crash, during recovery
                img = Recorder(start, crash_at=crash_at)
                try:
                    Journal(img, MemoryMedium(journal)).recover()
                except Crash:
                    start = bytes(img.buf)
        n, out, after = recover(start, journal)
        assert out == expected
        assert recover(out, after) == (0, out, after)


class TestFiles:
    def test_lazy_creation_commit_and_reopen(self, tmp_path: os.PathLike[str]) -> None:
        path = os.path.join(tmp_path, "disk.img")
        with open(path, "wb") as f:
            f.write(IMAGE)
        img = MmapMedium(path, True)
        j = Journal.open_for(path, img, True)
        assert not os.path.exists(path + ".qjournal")
        assert j.recover() == 0 and j.pending() == []
        j.commit(make_tx(SPEC))
        assert os.path.exists(path + ".qjournal")
        j.close()
        img.close()
        with open(path, "rb") as f:
            assert f.read() == apply_model(IMAGE, SPEC)
        img = MmapMedium(path, False)
        j = Journal.open_for(path, img, False)
        assert j.pending() == [] and j.describe()[0]["state"] == "checkpointed"
        j.close()
        img.close()

    def test_read_only_without_journal(self, tmp_path: os.PathLike[str]) -> None:
        path = os.path.join(tmp_path, "disk.img")
        with open(path, "wb") as f:
            f.write(IMAGE)
        img = MmapMedium(path, False)
        j = Journal.open_for(path, img, False)
        assert j.pending() == [] and j.overlay() == [] and j.describe() == []
        with pytest.raises(JournalError):
            j.commit(make_tx(SPEC))
        j.close()
        img.close()
        assert not os.path.exists(path + ".qjournal")

    def test_recover_files_after_crash(self, tmp_path: os.PathLike[str], committed: Committed) -> None:
        path = os.path.join(tmp_path, "disk.img")
        with open(path, "wb") as f:
            f.write(committed.image_after(1))
        with open(path + ".qjournal", "wb") as f:
            f.write(committed.journal)
        # Read-only: the committed state through the overlay, nothing written.
        img = MmapMedium(path, False)
        j = Journal.open_for(path, img, False)
        view = patch(committed.image_after(1), j.overlay())
        assert view == committed.new
        j.close()
        img.close()
        with open(path, "rb") as f:
            assert f.read() == committed.image_after(1)
        # Writable: recovery.
        img = MmapMedium(path, True)
        j = Journal.open_for(path, img, True)
        assert j.recover() == 1
        j.close()
        img.close()
        with open(path, "rb") as f:
            assert f.read() == committed.new
        jm = FileMedium(path + ".qjournal", False)
        assert Journal(MemoryMedium(committed.new), jm).describe()[0]["state"] == "checkpointed"
        jm.close()


class TestCompaction:
    """A long log, every transaction checkpointed, is cut back to a bare header of a new
    generation at close (every open reads the whole log); a short one stays, so that
    ``qjournal journal`` shows the last transaction. crashsim's ``journal-compact``
    workload crash-tests the cut."""

    def test_long_log_cut_back_at_close(self, tmp_path: os.PathLike[str]) -> None:
        path = os.path.join(tmp_path, "disk.qcow2")
        # 512-byte clusters, 64 MiB mapped: 2,048 L2 tables and 512 refcount blocks, each a
        # record of the snapshot's transaction (about 1.5 MB of log).
        qemu.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,preallocation=metadata", path, "64M")
        assert main(["snapshot", "-c", "s1", path]) == 0
        journal = path + ".qjournal"
        assert os.path.getsize(journal) == 48
        jm = FileMedium(journal, False)
        assert Journal(MemoryMedium(b""), jm).describe() == []
        jm.close()
        qemu.assert_clean(path)
        assert [s["name"] for s in qemu.info(path)["snapshots"]] == ["s1"]
        # The next generation starts after the old one's transaction ids.
        assert main(["snapshot", "-c", "s2", path]) == 0
        jm = FileMedium(journal, False)
        (tx,) = Journal(MemoryMedium(b""), jm).describe()
        jm.close()
        assert tx["state"] == "checkpointed" and tx["txid"] > 1
        qemu.assert_clean(path)

    def test_short_log_stays(self, tmp_path: os.PathLike[str]) -> None:
        path = os.path.join(tmp_path, "disk.qcow2")
        qemu.qemu_img("create", "-q", "-f", "qcow2", path, "64M")
        assert main(["snapshot", "-c", "s1", path]) == 0
        jm = FileMedium(path + ".qjournal", False)
        (tx,) = Journal(MemoryMedium(b""), jm).describe()
        jm.close()
        assert tx["state"] == "checkpointed"

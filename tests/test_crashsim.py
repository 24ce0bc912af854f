"""crashsim end to end: recording, checking, the negative controls, the command, executors.

Oracles: the recorder's own log (a change that bypassed it), DESIGN.md's table of
allowed outcomes (through the workloads qjournal must pass and the controls that must
fail), qemu-img check and info (the independent view of a reader that ignores the
journal), and the bytes of replayed states (their content hash in the report).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import attrs
import pytest

import qemu
from crashsim import harness
from crashsim.checks import (Expect, Semantic, bad_sectors, bits_between, changed_by_another, missed_writes, pending,
                             recover, recovery_ignores_change, recovery_leftovers)
from crashsim.cli import main
from crashsim.model import STRATEGIES, Options, RunResult, WorkloadResult
from crashsim.recorder import IMAGE, JOURNAL, Recording, RecordingMedium
from crashsim.runner import InlineExecutor, decode_path, digest, record, run, seeded_salts
from crashsim.workloads import IMG, STANDARD, WORKLOADS, Base, Workload, find, qemu_img_cmd, workload
from qjournal import Image
from qjournal.errors import JournalError
from qjournal.format.header import read_field
from qjournal.journal import Journal, Transaction
from qjournal.storage.medium import MemoryMedium

ROOT = Path(__file__).resolve().parent.parent
REAL = [w for w in WORKLOADS.values() if not w.expect_failure]
FIRST_CRASH = ("prefix", "barrier", "subset", "versions", "torn")


def run_one(name: str, *strategies: str, oracle: str = "none", **kw: object) -> WorkloadResult:
    opts = Options(strategies=strategies or STRATEGIES, oracle=oracle, **kw)  # type: ignore[arg-type]
    (w,) = run([find(name)], opts, executor=InlineExecutor()).workloads
    assert not w.error, w.error
    return w


@workload(base="long-names")
def user_disable_first(img: Image) -> None:
    """A user workload: disable the first bitmap."""
    img.bitmaps.disable(next(iter(img.bitmaps)))


class TestRecorder:
    def test_a_write_that_bypasses_the_medium_is_caught_at_the_next_barrier(self) -> None:
        rec = Recording({IMAGE: STANDARD.build(), JOURNAL: b""})
        with Image("r.qcow2", "r+", medium=RecordingMedium(rec, IMAGE),
                   journal_medium=RecordingMedium(rec, JOURNAL)) as img:
            img.medium.buf[0x800] ^= 0xFF       # type: ignore[attr-defined]  # unused bytes of cluster 0
            with pytest.raises(AssertionError, match=r"image: byte 0x800 changed without a write through the "
                                                     r"medium \(caught at the barrier from qjournal\.[a-z_.]+:\d+ "):
                img.bitmaps.add("x", 65536)
            img.medium.buf[0x800] ^= 0xFF       # type: ignore[attr-defined]

    def test_entries_carry_data_ranges_marks_and_call_sites(self) -> None:
        r = record(WORKLOADS["set-in-use"], 0)
        kinds = {e.kind for e in r.rec.entries}
        assert kinds == {"write", "barrier", "resize", "mark"}
        names = [e.name for e in r.rec.entries if e.kind == "mark"]
        assert names == ["tx-begin", "commit", "autoclear-cleared", "directory-written", "autoclear-set", "tx-end",
                         "returned"]
        sites = {e.site.split(":")[0] for e in r.rec.entries if e.kind == "write"}
        assert sites == {"qjournal.journal.journal"}
        steps = [e for e in r.rec.entries if e.kind == "barrier" and e.file == IMAGE and e.ranges]
        assert all(n > 0 for b in steps for _, n in b.ranges)
        control = record(WORKLOADS["control-seed-wrong-order"], 0)
        assert {e.site.split(" ")[-1] for e in control.rec.entries if e.kind == "write"} == {"_apply"}
        assert {e.site.split(":")[0] for e in control.rec.entries if e.kind == "write"} == {"crashsim.workloads"}

    def test_the_same_seed_records_the_same_bytes(self) -> None:
        a, b, c = (record(WORKLOADS["add"], s).rec for s in (3, 3, 4))
        assert a.state(len(a.entries)) == b.state(len(b.entries))
        assert a.state(len(a.entries))[JOURNAL] != c.state(len(c.entries))[JOURNAL]   # another salt
        assert a.state(len(a.entries))[IMAGE] == c.state(len(c.entries))[IMAGE]


class TestSalts:
    """The journal's salt source is a parameter (crashsim's seam), not a module to patch."""

    @staticmethod
    def commit(j: Journal, data: bytes) -> int | None:
        tx = Transaction("t")
        tx.step("s")
        tx.write(0, data)
        j.commit(tx)
        return j.salt

    def test_the_journal_takes_its_salts_from_the_source_it_is_given(self, tmp_path: Path) -> None:
        drawn = iter([7, 7, 7, 9])
        j = Journal(MemoryMedium(bytes(4096)), MemoryMedium(), salts=lambda: next(drawn))
        assert self.commit(j, b"a") == 7
        assert self.commit(j, b"b") == 9        # a repeat of the previous generation's salt is drawn again
        path = tmp_path / "x.qcow2"
        opened = Journal.open_for(path, MemoryMedium(bytes(4096)), True, salts=lambda: 5)
        assert self.commit(opened, b"c") == 5
        opened.close()
        assert Journal(MemoryMedium(bytes(4096)), MemoryMedium((tmp_path / "x.qcow2.qjournal").read_bytes())).salt == 5

    @pytest.mark.parametrize("source,text", [(lambda: 1 << 64, r"not an integer in \[0, 2\*\*64\)"),
                                             (lambda: -1, "not an integer"),
                                             (lambda: 3, "previous generation's salt 0x3 8 times")])
    def test_a_source_without_a_new_64_bit_salt_is_refused(self, source: Callable[[], int], text: str) -> None:
        j = Journal(MemoryMedium(bytes(4096)), MemoryMedium(), salts=source)
        if "previous" in text:
            self.commit(j, b"a")
        with pytest.raises(JournalError, match=r"^journal header, offset 24 \(salt\): .*" + text):
            self.commit(j, b"b")

    def test_a_run_draws_its_salts_from_its_seed(self) -> None:
        r = record(WORKLOADS["add"], 3)
        journal = r.rec.state(len(r.rec.entries))[JOURNAL]
        assert Journal(MemoryMedium(b""), MemoryMedium(journal)).salt == seeded_salts(3)()


class TestHarness:
    """crashsim.harness, the entry the test suite's crash tests use."""

    def test_a_failing_state_fails_the_assertion_with_its_id_and_invariant(self) -> None:
        w = harness.check(WORKLOADS["control-data-before-bits"], attrs.evolve(harness.TEST_OPTIONS, oracle="none"))
        assert w.failures and {s.strategy for s in w.states} <= {"prefix", "barrier"}
        with pytest.raises(AssertionError, match=r"control-data-before-bits/prefix/\d+ \(entries 0\.\.\d+ issued "
                                                 r"and landed in order\): bitmap-misses-write: "):
            harness.assert_passes(w, qjournal=())

    def test_an_outcome_no_state_reaches_fails_the_assertion(self) -> None:
        w = harness.check(WORKLOADS["enable"])
        assert all(v.oracle is not None for v in w.verdicts)     # qemu-img on every state
        harness.assert_passes(w, qjournal=("old", "new"), plain=("old", "new"))
        with pytest.raises(AssertionError, match=r"qjournal after recovery never sees dropped in \d+ "
                                                 r"state\(s\) \(it sees new, old\)"):
            harness.assert_passes(w, qjournal=("dropped",))   # only a reader that ignores the journal may

    def test_a_workload_that_raises_fails_the_assertion(self) -> None:
        def boom(img: Image) -> None:
            raise RuntimeError("boom")
        w = harness.check(Workload("boom", "raises", boom))
        assert harness.problems(w) == ["boom: the workload could not run: RuntimeError: boom"]

    def test_bases_of_the_same_name_are_built_apart(self) -> None:
        one, two = (Base("same-name", (qemu_img_cmd("create", "-q", "-f", "qcow2", IMG, size),))
                    for size in ("1M", "2M"))
        assert one.build()[24:32] != two.build()[24:32]      # the virtual size


class TestRules:
    SEM = Semantic(1 << 20, (("b", 512, 2, ((0, 512),)),), ((0, b"\x01" * 1024),))
    NEW = Semantic(1 << 20, (("b", 512, 2, ((0, 1536),)),), ((0, b"\x02" * 1024),))

    def test_sectors_old_or_new_and_never_neither(self) -> None:
        mixed = ((0, b"\x02" * 512 + b"\x01" * 512),)
        assert bad_sectors(mixed, self.SEM.guest, self.NEW.guest) == []
        garbage = ((0, b"\x02" * 512 + b"\x03" * 512),)
        assert bad_sectors(garbage, self.SEM.guest, self.NEW.guest) == [512]
        assert bad_sectors((), self.SEM.guest, ((4096, b"\x05" * 1024),)) == []        # zeros: as before
        assert bad_sectors(((4096, b"\x07" * 1024),), (), ((4096, b"\x05" * 1024),)) == [4096, 4608]

    def test_a_plain_reader_may_see_mixed_sectors_qjournal_may_not(self) -> None:
        e = Expect(self.SEM, self.NEW, 0, 0, "", True)
        mixed = Semantic(1 << 20, self.NEW.bitmaps, ((0, b"\x02" * 512 + b"\x01" * 512),))
        assert e.classify(mixed, e.allowed_plain, plain=True) == "new"
        assert e.classify(mixed, e.allowed_qjournal, plain=False) == "other"
        outside = Expect(self.SEM, self.NEW, 0, 0, "new", True)
        assert outside.classify(mixed, outside.allowed_plain, plain=True) == "other"

    def test_early_bits_only_between_old_and_new_and_only_for_guest_writes(self) -> None:
        early = Semantic(1 << 20, (("b", 512, 2, ((0, 1024),)),), self.SEM.guest)
        assert bits_between(early.bitmaps, self.SEM.bitmaps, self.NEW.bitmaps)
        fewer = (("b", 512, 2, ()),)
        assert not bits_between(fewer, self.SEM.bitmaps, self.NEW.bitmaps)
        relaxed = Expect(self.SEM, self.NEW, 0, 0, "", True, relaxed=True)
        strict = Expect(self.SEM, self.NEW, 0, 0, "", True)
        assert relaxed.classify(early, relaxed.allowed_plain, plain=True) == "old"
        assert strict.classify(early, strict.allowed_plain, plain=True) == "other"
        assert relaxed.classify(early, relaxed.allowed_qjournal, plain=False) == "other"   # journaled: exact

    def test_early_bits_in_the_old_directory_while_a_bitmap_is_added(self) -> None:
        added = Semantic(1 << 20, self.NEW.bitmaps + (("added", 4096, 2, ()),), self.NEW.guest)
        early = Semantic(1 << 20, (("b", 512, 2, ((0, 1024),)),), self.SEM.guest)
        assert bits_between(early.bitmaps, self.SEM.bitmaps, added.bitmaps)
        relaxed = Expect(self.SEM, added, 0, 0, "", True, relaxed=True)
        assert relaxed.classify(early, relaxed.allowed_plain, plain=True) == "old"
        garbage = (("b", 512, 2, ((0, 4096),)),)                # more bits than the new state has
        assert not bits_between(garbage, self.SEM.bitmaps, added.bitmaps)

    def test_data_a_shrink_cuts_off_needs_no_dirty_bit(self) -> None:
        old = Semantic(4096, (("b", 512, 2, ()),), ((0, b"\x01" * 1024), (2048, b"\x03" * 1024)))
        shrunk = Semantic(2048, old.bitmaps, ((0, b"\x01" * 1024),))
        assert missed_writes(shrunk, old) == ""
        written = Semantic(2048, old.bitmaps, ((0, b"\x01" * 512 + b"\x02" * 512),))
        assert "no dirty bit for guest offset 0x200" in missed_writes(written, old)

    def test_a_reader_of_the_old_size_must_see_the_old_data_past_a_shrink(self) -> None:
        old = Semantic(4096, (("b", 512, 2, ()),), ((0, b"\x01" * 1024), (2048, b"\x03" * 1024)))
        new = Semantic(2048, old.bitmaps, ((0, b"\x01" * 1024),))
        e = Expect(old, new, 0, 0, "", True)
        tail_gone = Semantic(4096, old.bitmaps, new.guest)      # the old size, the tail already dropped
        assert e.classify(tail_gone, e.allowed_plain, plain=True) == "other"
        assert e.classify(old, e.allowed_plain, plain=True) == "old"
        assert e.classify(new, e.allowed_plain, plain=True) == "new"

    def test_dropped_means_no_bitmaps_and_the_same_data(self) -> None:
        e = Expect(self.SEM, self.NEW, 0, 0, "", True)
        assert e.classify(Semantic(1 << 20, (), self.SEM.guest), e.allowed_plain, plain=True) == "dropped"
        assert e.classify(Semantic(1 << 20, (), ((0, b"\x09" * 1024),)), e.allowed_plain, plain=True) == "other"


class TestControls:
    """The checker can fail: each control breaks the ordering rule in a known way."""

    def test_directory_before_autoclear_fails_without_tears(self) -> None:
        w = run_one("control-seed-wrong-order", "prefix", "barrier", "subset")
        assert w.failures and w.ok
        v = w.failures[0]
        assert v.invariant == "plain-not-allowed" and v.plain == "other"
        assert len(v.minimal) == 1 and v.minimal[0].fate == "persisted"
        assert "in step directory-written" in v.explanation and "autoclear bit 0 is set" in v.explanation
        assert "neither the old nor the new one" in v.explanation
        assert "as new" in v.explanation and "as old" in v.explanation

    def test_whole_cluster_header_write_fails_only_when_it_tears(self) -> None:
        calm = run_one("control-header-tear", "prefix", "barrier", "subset", "versions", "recovery")
        assert not calm.failures and calm.states
        w = run_one("control-header-tear", "torn", oracle="all")
        (v,) = w.failures
        assert v.invariant == "plain-unreadable"
        ((fate,),) = [v.minimal]
        assert fate.fate == "torn" and fate.offset == 0 and fate.new_sectors == (0, 1)
        # What the tear leaves: autoclear set, the directory's size new, its offset old.
        assert "bitmaps.directory_size=0x60 (new, sector 1)" in v.explanation
        assert "bitmaps.directory_offset=0x21000 (old, sector 2)" in v.explanation
        assert "autoclear bit 0 is set" in v.explanation
        assert v.oracle is not None and v.oracle.check_exit == 1 and v.oracle.outcome == "error"
        assert "doesn't satisfy the constraints" in v.oracle.error

    def test_the_same_write_on_the_default_layout_cannot_tear_apart(self) -> None:
        w = run_one("qemu-header-rewrite", "torn", "subset", "prefix")
        assert not w.failures
        assert next(c for c in w.counts if c.strategy == "torn").generated == 0   # one sector changes

    def test_data_before_bits_leaves_a_bitmap_that_misses_a_write(self) -> None:
        w = run_one("control-data-before-bits", "prefix")
        assert w.failures and w.ok
        v = w.failures[0]
        assert v.invariant == "bitmap-misses-write"
        assert "in step data-written" in v.explanation and "would miss that write" in v.explanation

    def test_the_controls_fail_as_expected_so_the_run_says_pass_and_exits_0(
            self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["run", "controls", "--strategy", "prefix,torn", "--max-tears", "4", "--oracle", "none",
                     "--jobs", "1", "-q"]) == 0
        assert capsys.readouterr().out.rstrip().endswith(": PASS")


@pytest.fixture(scope="module")
def real() -> dict[str, WorkloadResult]:
    res = run(REAL, Options(oracle="none", jobs=2))
    return {w.name: w for w in res.workloads}


class TestRealWorkloads:
    def test_every_journaled_operation_is_covered(self) -> None:
        from qjournal.ops.bitmaps import Bitmaps
        ops = {"add", "remove", "clear", "enable", "disable", "merge", "repair", "set_in_use"}
        assert ops <= set(vars(Bitmaps))
        names = set(WORKLOADS)
        assert {"add", "remove", "clear", "enable", "disable", "merge", "repair", "set-in-use", "clear-in-use",
                "transaction", "guest-write", "guest-overwrite"} <= names

    def test_no_first_crash_is_ever_wrong(self, real: dict[str, WorkloadResult]) -> None:
        bad = [f"{v.state_id}: {v.invariant}: {v.explanation}" for w in real.values() for v in w.failures
               if not v.state_id.split("/")[1] == "recovery"]
        assert not bad, "\n".join(bad[:5])
        refused = {"new-cluster-over-metadata"}       # the overlap check refuses it: nothing is written
        for w in real.values():
            seen = {v.qjournal for v in w.verdicts}
            if w.name in refused:
                assert seen == {"old"} and not w.transactions, (w.name, seen)
                continue
            assert {"old", "new"} <= seen, (w.name, seen)    # crashes on both sides of the commit
            assert w.transactions and all(t.barriers >= t.minimum for t in w.transactions), w.name

    def test_the_seed_protocol_drops_bitmaps_for_qemu_and_never_for_qjournal(
            self, real: dict[str, WorkloadResult]) -> None:
        w = real["set-in-use"]
        assert any(v.plain == "dropped" for v in w.verdicts)
        assert all(v.qjournal in ("old", "new") for v in w.verdicts)

    def test_more_than_twelve_units_use_k_subsets_and_samples(self, real: dict[str, WorkloadResult]) -> None:
        w = real["guest-overwrite"]
        sampled = [s for s in w.states if s.strategy == "subset" and s.seed is not None]
        assert sampled and all(s.seed == 0 for s in sampled)
        assert max(len([f for f in s.fates if f.fate == "persisted"]) for s in w.states) > 12

    def test_a_crash_during_recovery_after_the_operation_returned(self, real: dict[str, WorkloadResult]) -> None:
        bad = [v.state_id for w in real.values() for v in w.failures]
        assert not bad, bad


class TestOracle:
    def test_qemu_img_agrees_on_every_state(self) -> None:
        w = run_one("add-split-header", oracle="all")
        assert all(v.oracle is not None for v in w.verdicts)
        agree = [v for v in w.verdicts if v.oracle is not None and v.oracle.outcome == v.plain]
        assert len(agree) == len(w.verdicts)
        assert {v.oracle.outcome for v in w.verdicts if v.oracle} >= {"old", "new", "dropped"}

    def test_a_sample_is_seeded(self) -> None:
        a = run_one("remove", "prefix", "subset", "torn", oracle="sample", oracle_samples=5, seed=1)
        b = run_one("remove", "prefix", "subset", "torn", oracle="sample", oracle_samples=5, seed=1)
        pick = [v.state_id for v in a.verdicts if v.oracle is not None]
        assert len(pick) == 5 and pick == [v.state_id for v in b.verdicts if v.oracle is not None]


class TestCommand:
    def test_list_names_every_workload(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["list"]) == 0
        assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == list(WORKLOADS)

    @pytest.mark.parametrize("argv", [["run", "no-such-workload"], ["run", "add", "--strategy", "bogus"],
                                      ["run", "add", "--sector-size", "300"], ["run", "add", "--executor", "x"],
                                      ["frobnicate"]])
    def test_usage_errors_exit_2(self, argv: list[str]) -> None:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2

    def test_a_passing_run_exits_0_writes_a_report_and_shows_no_bar_off_a_terminal(self, tmp_path: Path) -> None:
        out = tmp_path / "r.json"
        res = subprocess.run([sys.executable, "-m", "crashsim", "run", "enable", "--strategy", "prefix,subset,torn",
                              "--oracle", "none", "--jobs", "1", "--report", str(out)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stderr == ""
        assert "enable: " in res.stdout and "all allowed" in res.stdout
        result = RunResult.loads(out.read_text())
        assert result.ok and RunResult.from_json(json.loads(out.read_text())) == result
        (w,) = result.workloads
        assert sum(c.unique for c in w.counts) == len(w.states) == len(w.verdicts)

    def test_an_html_report_comes_with_its_json(self, tmp_path: Path) -> None:
        out = tmp_path / "r.html"
        assert main(["run", "disable", "--strategy", "prefix", "--oracle", "none", "--jobs", "1", "-q",
                     "--report", str(out)]) == 0
        assert out.read_text().lstrip().lower().startswith("<!doctype html")
        assert RunResult.loads(out.with_suffix(".json").read_text()).workloads[0].name == "disable"

    def test_replay_rebuilds_a_failing_state_for_qemu_img(self, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
        report = tmp_path / "r.json"
        assert main(["run", "control-header-tear", "--strategy", "torn", "--oracle", "none", "--jobs", "1",
                     "--seed", "5", "--report", str(report)]) == 0       # a control failing, as expected
        (v,) = RunResult.loads(report.read_text()).workloads[0].failures
        image = tmp_path / "s.qcow2"
        assert main(["replay", str(report), v.state_id, "-o", str(image)]) == 0
        code, out = qemu.check(image)
        assert code == 1 and "doesn't satisfy the constraints" in out["error"]

    def test_replay_of_a_recovery_state_writes_its_journal(self, tmp_path: Path) -> None:
        report = tmp_path / "r.json"
        main(["run", "guest-write-mixed", "--strategy", "prefix,torn,recovery", "--oracle", "none", "--jobs", "1",
              "-q", "--report", str(report)])
        w = RunResult.loads(report.read_text()).workloads[0]
        state = next(s for s in w.states if s.strategy == "recovery")
        image = tmp_path / "s.qcow2"
        assert main(["replay", str(report), state.id, "-o", str(image)]) == 0
        assert (tmp_path / "s.qcow2.qjournal").stat().st_size > 0

    def test_a_user_workload_by_module_and_function(self) -> None:
        w = run_one("test_crashsim:user_disable_first", "prefix", "subset")
        assert w.ok and w.description == "A user workload: disable the first bitmap."
        assert w.old != w.new and "long-0" in w.old


class TestExecutors:
    def counts(self, w: WorkloadResult) -> list[tuple[str, int, int, dict[str, int]]]:
        return [(c.strategy, c.generated, c.unique, c.outcomes) for c in w.counts]

    def test_a_process_pool_and_inline_agree(self) -> None:
        opts = Options(oracle="none", seed=2)
        inline = run([WORKLOADS["merge"]], opts, executor=InlineExecutor()).workloads[0]
        pooled = run([WORKLOADS["merge"]], attrs_evolve(opts, jobs=2)).workloads[0]
        assert self.counts(inline) == self.counts(pooled)
        assert [s.digest for s in inline.states] == [s.digest for s in pooled.states]

    def test_a_dask_cluster_gets_the_same_counts(self) -> None:
        distributed = pytest.importorskip("distributed")
        opts = Options(oracle="none", seed=2)
        inline = run([WORKLOADS["set-in-use"]], opts, executor=InlineExecutor()).workloads[0]
        with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                      dashboard_address=None) as cluster, distributed.Client(cluster) as client:
            dask = run([WORKLOADS["set-in-use"]], opts, executor=client.get_executor()).workloads[0]
        assert self.counts(inline) == self.counts(dask)
        assert [v.ok for v in inline.verdicts] == [v.ok for v in dask.verdicts]


def attrs_evolve(opts: Options, **changes: object) -> Options:
    import attrs
    return attrs.evolve(opts, **changes)


def test_a_workload_that_raises_is_reported_not_raised() -> None:
    def boom(img: Image) -> None:
        raise RuntimeError("boom")
    (w,) = run([Workload("boom", "raises", boom)], Options(oracle="none"), executor=InlineExecutor()).workloads
    assert w.error == "RuntimeError: boom" and not w.ok


class TestRealMedium:
    """``--medium real``: the workloads run on files through the real media, and crashsim
    records the system calls they make, so the media's own flush code is under test."""

    FAST = Options(strategies=("prefix", "barrier", "subset"), k=1, samples=4, oracle="none", medium="real")

    def test_every_workload_passes_on_the_real_medium(self) -> None:
        real = [w for w in WORKLOADS.values() if not w.expect_failure]
        result = run(real, self.FAST, InlineExecutor())
        assert [(w.name, w.error) for w in result.workloads if not w.ok] == []
        assert result.states >= len(real)

    def test_records_what_the_real_medium_syncs(self) -> None:
        r = record(WORKLOADS["set-in-use"], 0, "real")
        kinds = [e.kind for e in r.rec.entries]
        assert "write" in kinds and "barrier" in kinds
        # The image's barriers are the msync ranges the medium asked for (page aligned), the
        # journal's the fdatasync of its file.
        image_barriers = [e for e in r.rec.entries if e.kind == "barrier" and e.file == IMAGE]
        assert image_barriers and all(o % 4096 == 0 for e in image_barriers for o, _ in e.ranges)

    def test_a_flush_that_syncs_too_little_is_caught(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The planted bug crashsim could not see while it replaced the medium: a flush that
        msyncs only the first of the ranges it is given."""
        from qjournal.storage import medium as storage

        def first_only(self: storage.MmapMedium, ranges: object = None) -> None:
            if ranges is None:
                return original(self, None)
            ranges = list(ranges)  # type: ignore[call-overload]
            return original(self, ranges[:1])

        original = storage.MmapMedium.flush
        monkeypatch.setattr(storage.MmapMedium, "flush", first_only)
        names = ["guest-write", "add", "resize-grows-l1"]
        result = run([WORKLOADS[n] for n in names], self.FAST, InlineExecutor())
        assert not result.ok
        assert all(w.unsynced or w.failures for w in result.workloads if not w.ok)
        memory = run([WORKLOADS[n] for n in names], attrs.evolve(self.FAST, medium="memory"), InlineExecutor())
        assert memory.ok            # the recording medium alone never runs the real flush


# -- issue 11: barrier deficits, unsynced writes at close, user workloads, report fixes ----------
def _same_bytes(img: Image, steps: int, flush: bool = True) -> None:
    """Rewrite the header sector with its own bytes, ``steps`` times (a protocol that changes nothing)."""
    head = img.medium.read(0, 512)
    for i in range(steps):
        img.medium.write(0, head)
        if flush:
            img.medium.flush([(0, len(head))])
        img.medium.mark(f"step-{i}")


class TestFailuresBesideStates:
    def test_a_transaction_short_of_its_minimum_barriers_fails_the_run(self) -> None:
        short = Workload("short", "two barriers, three needed", lambda img: _same_bytes(img, 2),
                         journaled=False, minimum=3)
        (w,) = run([short], Options(strategies=("prefix",), oracle="none"), executor=InlineExecutor()).workloads
        assert not w.failures and w.deficits and not w.ok
        enough = attrs.evolve(short, name="enough", minimum=2)
        (w,) = run([enough], Options(strategies=("prefix",), oracle="none"), executor=InlineExecutor()).workloads
        assert not w.deficits and w.ok

    def test_writes_never_synced_before_close_fail_the_run(self) -> None:
        lazy = Workload("lazy", "writes, no barrier", lambda img: _same_bytes(img, 1, flush=False),
                        journaled=False, minimum=0)
        (w,) = run([lazy], Options(strategies=("prefix",), oracle="none"), executor=InlineExecutor()).workloads
        assert not w.failures and not w.ok
        assert w.unsynced.startswith("1 unit(s) written and never synced before close: image page 0x0")


EXAMPLE = '''
from crashsim.workloads import workload


def plain_write(img):
    """a guest write declared as an operation of its own: early bitmap bits are not allowed"""
    img.write(5 << 20, b"\\x42" * 8192)


@workload(relaxed=True)
def declared_write(img):
    """the same guest write, declared relaxed: bits set early only cost a backup extra bytes"""
    img.write(5 << 20, b"\\x42" * 8192)
'''


class TestUserWorkloadFiles:
    ARGS = ["--strategy", "prefix,subset", "--oracle", "none", "--jobs", "1"]

    def test_by_path_a_strict_guest_write_fails_and_a_relaxed_one_passes(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        path = tmp_path / "sub" / "mywl.py"
        path.parent.mkdir()
        path.write_text(EXAMPLE)
        assert main(["run", f"{path}:plain_write", *self.ARGS]) == 1
        out = capsys.readouterr().out
        assert "[plain-not-allowed]" in out and "in step bitmap-bits-set" in out and ": FAIL (" in out
        assert main(["run", f"{path}:declared_write", *self.ARGS]) == 0
        assert capsys.readouterr().out.rstrip().endswith(": PASS")

    def test_by_module_from_the_current_directory(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        (tmp_path / "mywl_cwd.py").write_text(EXAMPLE)
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
        assert main(["run", "mywl_cwd:declared_write", *self.ARGS, "-q"]) == 0

    def test_a_missing_file_is_a_usage_error(self, tmp_path: Path) -> None:
        with pytest.raises(SystemExit) as e:
            main(["run", f"{tmp_path}/nope.py:f"])
        assert e.value.code == 2

    def test_replay_names_have_no_colon_so_qemu_img_opens_them(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        (tmp_path / "mywl_replay.py").write_text(EXAMPLE)
        monkeypatch.chdir(tmp_path)
        report = tmp_path / "r.json"
        assert main(["run", "mywl_replay:declared_write", "--strategy", "prefix", "--oracle", "none", "--jobs", "1",
                     "-q", "--report", str(report)]) == 0
        sid = RunResult.loads(report.read_text()).workloads[0].states[-1].id
        assert main(["replay", str(report), sid]) == 0
        (image,) = tmp_path.glob("*.qcow2")
        assert ":" not in image.name and sid.replace("/", "-").replace(":", "-") + ".qcow2" == image.name
        code, out = qemu.check(image)
        assert code == 0, out


class TestReportSize:
    def test_passing_states_are_summarized_and_replay_from_their_line(self, tmp_path: Path) -> None:
        report = tmp_path / "r.json"
        opts = ["--oracle", "none", "--jobs", "2", "-q", "--report", str(report)]
        assert main(["run", "merge", "control-seed-wrong-order", *opts]) == 0
        data = json.loads(report.read_text())
        ok, control = data["workloads"]
        assert not ok["states"] and len(ok["summarized"]) > 50        # states summarized ...
        assert len(control["states"]) == len(control["verdicts"]) > 0    # ... failures in full
        assert all(s["fates"] for s in control["states"] if s["strategy"] != "barrier")
        assert report.stat().st_size < 100_000
        full = RunResult.loads(report.read_text())
        w = full.workloads[0]
        assert len(w.states) == len(w.verdicts) == sum(c.unique for c in w.counts)
        for strategy in ("torn", "subset", "prefix"):        # compact choices rebuild the same bytes
            state = next(s for s in w.states if s.strategy == strategy and s.choices)
            image = tmp_path / f"{strategy}.qcow2"
            assert main(["replay", str(report), state.id, "-o", str(image)]) == 0
            journal = image.with_suffix(".qcow2.qjournal")
            files = {IMAGE: image.read_bytes(), JOURNAL: journal.read_bytes() if journal.exists() else b""}
            assert digest(files).startswith(state.digest) and state.choices.startswith("L"), state

    def test_list_columns_align(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["list"]) == 0
        lines = capsys.readouterr().out.splitlines()
        starts = {len(line) - len(line[line.index("  ") + 2:].lstrip()) for line in lines}
        descs = {line.index(w.description) for line, w in zip(lines, WORKLOADS.values())}
        assert len(starts) == 1 and len(descs) == 1


class TestCrashesDuringRecovery:
    """Recovery is crash-tested like any operation: its own writes and barriers are recorded
    and cut by every strategy, two levels deep, and each state is judged."""

    @staticmethod
    def committed_not_applied() -> dict[str, bytes]:
        """The files of the ``add`` workload right after its transaction reached the journal."""
        rec = record(find("add"), 0).rec
        t = next(t for t in range(len(rec.entries) + 1) if pending(rec.state(t)[JOURNAL]))
        return rec.state(t)

    def test_recovery_states_reorder_within_barriers_and_nest_two_levels(self) -> None:
        w = run_one("two-transactions")
        paths = [decode_path(s.recovery) for s in w.states if s.strategy == "recovery"]
        assert "subset" in {p[-1].strategy for p in paths}      # a reordering inside recovery
        assert {len(p) for p in paths} == {1, 2}
        assert w.ok

    def test_a_nested_recovery_state_replays_to_the_same_bytes(self, tmp_path: Path) -> None:
        report = tmp_path / "r.json"
        assert main(["run", "two-transactions", "--oracle", "none", "--jobs", "1", "-q",
                     "--report", str(report)]) == 0
        w = RunResult.loads(report.read_text()).workloads[0]
        state = next(s for s in w.states if "/" in s.recovery)
        image = tmp_path / "s.qcow2"
        assert main(["replay", str(report), state.id, "-o", str(image)]) == 0
        files = {IMAGE: image.read_bytes(), JOURNAL: (tmp_path / "s.qcow2.qjournal").read_bytes()}
        assert digest(files).startswith(state.digest)

    def test_recovery_leaves_nothing_in_flight_or_pending(self) -> None:
        rec = recover(self.committed_not_applied()).recording
        assert rec is not None and recovery_leftovers(rec) == ""
        last_sync = max(i for i, e in enumerate(rec.entries) if e.kind == "barrier" and e.file == JOURNAL)
        unsynced = Recording(rec.initial, rec.entries[:last_sync] + rec.entries[last_sync + 1:])
        assert "not yet durable (journal" in recovery_leftovers(unsynced)

    def test_recovery_refuses_an_image_someone_else_changed(self) -> None:
        files = self.committed_not_applied()
        changed = changed_by_another(files)
        assert changed is not None
        image, off = changed
        assert off >= 1 << read_field(image, "cluster_bits") and image != files[IMAGE]
        with pytest.raises(JournalError, match="changed after the crash"):
            Image("x.qcow2", "r+", medium=MemoryMedium(image), journal_medium=MemoryMedium(files[JOURNAL]))
        assert recovery_ignores_change(files) == ""


@workload(qemu=["qemu-img bitmap --add -g 4096 base.qcow2 mine"])
def user_add_like_qemu(img: Image) -> None:
    """Add a bitmap as qemu-img bitmap --add does."""
    img.bitmaps.add("mine", 4096)


@workload(qemu=["qemu-img bitmap --add -g 4096 base.qcow2 mine"])
def user_add_unlike_qemu(img: Image) -> None:
    """Add a bitmap of another granularity than the one QEMU is asked for."""
    img.bitmaps.add("mine", 8192)


@workload(expect=lambda old, new: "" if len(new.bitmaps) == len(old.bitmaps) + 1 else "no bitmap was added")
def user_add_nothing(img: Image) -> None:
    """Declares that a bitmap is added, and adds none."""
    img.bitmaps.disable("fresh")


class TestIndependentNew:
    """The new state an operation must reach comes from QEMU doing the same operation, or from
    the workload's declaration, never only from the code under test."""

    def test_every_built_in_workload_with_a_qemu_twin_reaches_qemus_state(self) -> None:
        twins = [w for w in WORKLOADS.values() if w.qemu]
        assert len(twins) >= 20 and sum(1 for w in WORKLOADS.values() if w.expect) >= 4
        result = run(twins, Options(strategies=("prefix",), oracle="none", recovery_depth=0),
                     executor=InlineExecutor())
        assert [w.name for w in result.workloads if w.error] == []

    def test_a_result_qemu_does_not_reach_fails_the_run(self) -> None:
        assert run_one("test_crashsim:user_add_like_qemu", "prefix").ok
        opts = Options(strategies=("prefix",), oracle="none")
        (w,) = run([find("test_crashsim:user_add_unlike_qemu")], opts, executor=InlineExecutor()).workloads
        assert not w.ok and "not what QEMU leaves" in w.error and "bitmap 'mine'" in w.error

    def test_a_declared_result_not_reached_fails_the_run(self) -> None:
        opts = Options(strategies=("prefix",), oracle="none")
        (w,) = run([find("test_crashsim:user_add_nothing")], opts, executor=InlineExecutor()).workloads
        assert not w.ok and "no bitmap was added" in w.error

"""crashsim's reach: planted bugs (crashsim.mutants) applied to a scratch copy of qjournal.

The oracle is crashsim itself, run in a subprocess against the mutated copy: a seeded
sample of the mutants crashsim must catch is planted one at a time, and each must make a
workload fail. The whole set is ``crashsim mutants`` (README, "crashsim: proving it").
"""
from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from crashsim import mutants
from crashsim.mutants import MUTANTS, Mutant, Outcome, apply, run_one, sample, table
from crashsim.workloads import WORKLOADS

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = 4                      # ~10 s each on 2 cores: the CI budget is ~60 s
CLASSES = {"step order", "missing barrier", "medium flush", "journal commit", "journal checksum", "recovery",
           "close and checkpoint", "bitmap bits", "COW spans", "resize grow", "resize shrink", "overlap map", "operation result"}


class TestTheSet:
    def test_at_least_30_mutants_of_every_class_each_described(self) -> None:
        assert len(MUTANTS) >= 30
        assert {m.klass for m in MUTANTS} == CLASSES
        assert len({m.name for m in MUTANTS}) == len(MUTANTS)
        for m in MUTANTS:
            assert m.breaks and m.function and (ROOT / m.where).is_file(), m.name
            assert set(m.workloads) <= set(WORKLOADS), m.name

    def test_every_target_text_occurs_exactly_once(self) -> None:
        for m in MUTANTS:
            text = (ROOT / m.where).read_text()
            for old, new in m.edits:
                assert text.count(old) == 1, f"{m.name}: stale target {old!r}"
                text = text.replace(old, new)

    def test_a_seeded_sample_covers_several_classes_and_no_known_miss(self) -> None:
        chosen = sample(MUTANTS, SAMPLE, 0)
        assert len(chosen) == SAMPLE and len({m.klass for m in chosen}) == SAMPLE
        assert not any(m.known_miss for m in chosen)
        assert sample(MUTANTS, SAMPLE, 0) == chosen and sample(MUTANTS, SAMPLE, 1) != chosen


class TestApplying:
    def test_the_copy_holds_the_bug_and_the_tree_does_not(self, tmp_path: Path) -> None:
        m = mutants.find("bits-last-bit-missing")
        assert apply(m, ROOT, tmp_path) == ""
        assert "bits[lo:hi] = 1" in (tmp_path / m.where).read_text()
        assert "bits[lo:hi + 1] = 1" in (ROOT / m.where).read_text()
        assert (tmp_path / "crashsim" / "mutants.py").is_file()

    def test_a_target_that_moved_is_stale_not_passed(self) -> None:
        m = attrs.evolve(mutants.find("bits-last-bit-missing"), name="moved",
                         edits=(("bits[lo:hi + 1] = True\n", "bits[lo:hi] = True\n"),))
        o = run_one(m)
        assert o.status == "stale" and "occurs 0 times" in o.detail

    def test_a_bug_no_workload_sees_is_reported_missed(self) -> None:
        m = Mutant("harmless", "step order", mutants.BITS, "bits_steps (a comment)", "nothing",
                   (("    out: list[Write] = []\n", "    out: list[Write] = []  # planted\n"),), ("enable",))
        o = run_one(m, jobs=2, fallback=False)
        assert o.status == "missed" and "1 workloads passed" in o.detail

    def test_the_table_names_mutant_class_and_check(self) -> None:
        text = table([Outcome("a", "bitmap bits", "caught", "guest-write: bitmap-misses-write"),
                      Outcome("b", "recovery", "missed", detail="34 workloads passed")])
        assert "| `a` | bitmap bits | guest-write: bitmap-misses-write |" in text
        assert "| `b` | recovery | **MISSED**: 34 workloads passed |" in text


@pytest.mark.parametrize("name", [m.name for m in sample(MUTANTS, SAMPLE, 0)])
def test_a_sampled_mutant_is_caught(name: str) -> None:
    o = run_one(mutants.find(name), jobs=2, fallback=False)
    assert o.status == "caught", o
    assert o.caught_by.split(": ")[0] in mutants.find(name).workloads


def test_the_command_lists_every_mutant(capsys: pytest.CaptureFixture[str]) -> None:
    assert mutants.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(f"{m.name}  [{m.klass}]" in out for m in MUTANTS)
    assert mutants.main(["no-such-mutant"]) == 2


@pytest.mark.parametrize("name, check", [
    ("recovery-no-barriers", "recovery-not-durable"), ("recovery-no-checkpoint", "recovery-not-durable"),
    ("recovery-no-sync", "recovery-not-durable"), ("recovery-skips-binding", "recovery-ignores-change"),
    ("checkpoint-not-written", "recovery-not-durable"),
    ("overlap-first-cluster-only", "workload-error"), ("overlap-no-bitmap-data", "workload-error"),
    ("seed-in-use-not-set", "workload-error"), ("merge-not-or", "workload-error"),
    ("add-wrong-granularity", "workload-error")])
def test_bugs_of_recovery_damage_and_results_are_caught(name: str, check: str) -> None:
    """Recovery crash-tested and checked for durability and a changed image; a damaged base whose
    own corruption is allowed; a new state declared independently of the code under test."""
    o = run_one(mutants.find(name), jobs=2, fallback=False)
    assert o.status == "caught" and o.caught_by.split(": ")[1] == check, o

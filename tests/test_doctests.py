"""The examples in qjournal's and crashsim's docstrings, run as doctests.

Oracle: the expected output written in each docstring. Every module is imported and
its doctests run here, so a plain ``python3 -m pytest`` (as .ci/run calls it) runs
them with no extra option.
"""
from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts[:-1] if p.name == "__init__.py"
             else p.relative_to(ROOT).with_suffix("").parts)
    for pkg in ("qjournal", "crashsim") for p in (ROOT / pkg).rglob("*.py")
    if p.name != "__main__.py" and p.name != "nbdplugin.py")   # nbdkit's plugin: imports ``nbdkit``, inside nbdkit only
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _tests(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    return [t for t in doctest.DocTestFinder(exclude_empty=True).find(module, name) if t.examples]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    out: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for t in _tests(name):
        runner.run(t, out=out.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(out)


def test_the_documented_helpers_have_examples() -> None:
    """The doctests are found (a finder that finds nothing would pass every module)."""
    found = {t.name for name in ("qjournal.format.tables", "qjournal.format.refcount",
                                 "qjournal.journal.transaction", "qjournal.journal.crc32c",
                                 "qjournal.storage.medium") for t in _tests(name)}
    for want in ("qjournal.format.tables.size_to_l1", "qjournal.format.tables.compressed_span",
                 "qjournal.format.refcount.pack_block", "qjournal.journal.transaction.Transaction",
                 "qjournal.journal.crc32c.crc32c", "qjournal.storage.medium.merge_ranges"):
        assert want in found, sorted(found)


def test_a_wrong_example_fails() -> None:
    """The runner reports a failing example (so a broken doctest cannot pass silently)."""
    parser = doctest.DocTestParser()
    t = parser.get_doctest(">>> 1 + 1\n3\n", {}, "wrong", "wrong.py", 0)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    runner.run(t, out=lambda s: None)
    assert runner.summarize(verbose=False).failed == 1

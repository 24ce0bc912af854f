"""The ``qjournal`` command as a whole process: what ``info``, ``--help`` and ``--version``
import (none of the heavy modules), that building one command family's parsers parses as
all of them do, the memory ``write -P`` takes, and ``python -m bench info``.

Oracles: ``sys.modules`` of a real ``python -m qjournal ...`` process, read when it
exits; ``qemu-img info``, ``qemu-img check`` and ``qemu-io read -P`` for what the
commands print and write; GNU time for peak RSS. Importing numpy alone takes longer than
``qemu-img info`` takes to run, so the commands that only read a header must not load
it. Commands that do the work numpy is for (check, map) load it, which shows the probe
sees an import when there is one. Nothing here is timed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

import damage
import qemu
from qjournal.cli import app
from qjournal.format.lazy import LazyModule

ROOT = Path(__file__).resolve().parent.parent

HEAVY = ("numpy", "zstandard", "tqdm", "crc32c", "sortedcontainers", "importlib.metadata",
         "concurrent.futures", "secrets")
"""Modules a command that only reads an image's header needs none of (see qjournal/format/lazy.py)."""

PROBE = """
import atexit, json, runpy, sys
out = sys.argv.pop(1)
def dump():
    with open(out, "w") as f:
        json.dump(sorted(sys.modules), f)
atexit.register(dump)
sys.argv[0] = "qjournal"
runpy.run_module("qjournal", run_name="__main__", alter_sys=True)
"""
"""``python -m qjournal ARGS`` (runpy does what -m does), writing ``sys.modules`` at exit.
The probe's own imports (atexit, json, runpy) are none of ``HEAVY``."""


def run_qjournal(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``python -m qjournal ARGS``; its result and the modules it had imported at exit."""
    out = tmp_path / "modules.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", PROBE, str(out), *args], capture_output=True, text=True, env=env,
                         stdin=subprocess.DEVNULL)
    return res, set(json.loads(out.read_text()))


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A small image as qemu-img makes it, with a snapshot and a backing file."""
    base = tmp_path / "base.qcow2"
    img = tmp_path / "small.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", str(base), "64M")
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(img))
    qemu.qemu_io(img, "write -P 0x5a 0 64k")
    qemu.qemu_img("snapshot", "-c", "snap1", str(img))
    return img


class TestInfoImportsNothingHeavy:
    def test_info(self, tmp_path: Path, small: Path) -> None:
        res, modules = run_qjournal(tmp_path, "info", str(small))
        assert res.returncode == 0, res.stderr
        assert "snap1" in res.stdout and f"backing file: {small.parent / 'base.qcow2'}" in res.stdout
        assert "qjournal.core.image" in modules  # the probe ran the command
        assert sorted(modules.intersection(HEAVY)) == []

    def test_info_loads_no_operation(self, tmp_path: Path, small: Path) -> None:
        """``info`` reads a header: the façade (qjournal.api), the operations, the guest
        readers and writers and the other command families stay unloaded."""
        res, modules = run_qjournal(tmp_path, "info", str(small))
        assert res.returncode == 0, res.stderr
        loaded = {m for m in modules if m.startswith(("qjournal.api", "qjournal.ops.", "qjournal.read",
                                                       "qjournal.write", "qjournal.cli."))}
        assert loaded == {"qjournal.ops.syntax", "qjournal.cli.app", "qjournal.cli.options", "qjournal.cli.info"}

    def test_info_json(self, tmp_path: Path, small: Path) -> None:
        res, modules = run_qjournal(tmp_path, "info", "--output=json", str(small))
        assert res.returncode == 0, res.stderr
        ours, theirs = json.loads(res.stdout), qemu.info(small)
        assert ours["virtual-size"] == theirs["virtual-size"]
        assert ours["snapshots"] == theirs["snapshots"]
        assert sorted(modules.intersection(HEAVY)) == []

    def test_help(self, tmp_path: Path) -> None:
        res, modules = run_qjournal(tmp_path, "--help")
        assert res.returncode == 0, res.stderr
        assert "convert" in res.stdout and "info" in res.stdout
        assert sorted(modules.intersection(HEAVY)) == []

    def test_version(self, tmp_path: Path) -> None:
        res, modules = run_qjournal(tmp_path, "--version")
        assert res.returncode == 0 and res.stdout.startswith("qjournal "), res.stderr
        assert sorted(modules.intersection(HEAVY)) == []


class TestWorkLoadsWhatItNeeds:
    """The same probe sees numpy once a command scans tables (so an empty list above
    means nothing was imported, not that the probe saw nothing)."""

    def test_check_loads_numpy(self, tmp_path: Path, small: Path) -> None:
        res, modules = run_qjournal(tmp_path, "check", str(small))
        assert res.returncode == 0, res.stdout + res.stderr
        assert "No errors were found on the image." in res.stdout
        assert "numpy" in modules

    def test_map_loads_numpy(self, tmp_path: Path, small: Path) -> None:
        res, modules = run_qjournal(tmp_path, "map", "--output=json", str(small))
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)[0]["data"] is True
        assert "numpy" in modules

    def test_a_journaled_command_loads_no_extras(self, tmp_path: Path, small: Path) -> None:
        """``snapshot -c`` commits through the journal (CRC32C, numpy) but loads neither
        the crc32c package's ``importlib.metadata`` (its C extension is loaded alone),
        nor ``secrets`` (the journal's salt is ``os.urandom``), nor ``numpy.ma``
        (``np.unique`` loads it; the allocator does without): 20 ms of its start."""
        res, modules = run_qjournal(tmp_path, "snapshot", "-c", "s2", str(small))
        assert res.returncode == 0, res.stderr
        assert {"numpy", "crc32c._crc32c"} <= modules
        assert sorted(modules.intersection({"importlib.metadata", "secrets", "hmac", "numpy.ma"})) == []
        assert [s["name"] for s in qemu.info(small)["snapshots"]] == ["snap1", "s2"]
        qemu.assert_clean(small)


class TestOneFamilyParses:
    """``qjournal COMMAND ...`` builds only COMMAND's family of parsers; nothing else changes."""

    def test_families_declare_what_they_register(self) -> None:
        declared = [name for names in app.FAMILIES.values() for name in names]
        assert len(declared) == len(set(declared))
        assert list(app.commands()) == declared
        for names in app.FAMILIES.values():
            assert set(app.commands_of(names[0])) == set(names)

    @pytest.mark.parametrize("name", [n for names in app.FAMILIES.values() for n in names])
    def test_same_parser_alone(self, name: str) -> None:
        alone, full = app.commands_of(name)[name], app.commands()[name]
        assert alone.format_help() == full.format_help()
        assert alone.prog == full.prog == f"qjournal {name}"

    def test_same_parse(self, tmp_path: Path) -> None:
        argv = ["map", "--output=json", "--start-offset", "1M", "-U", str(tmp_path / "x.qcow2")]
        assert vars(app.build_parser("map").parse_args(argv)) == vars(app.build_parser().parse_args(argv))

    def test_usage_errors_unchanged(self, tmp_path: Path, small: Path) -> None:
        bad = run_qjournal(tmp_path, "info", "--no-such-option", str(small))[0]
        assert bad.returncode == 1
        assert bad.stderr == "qjournal: unrecognized arguments: --no-such-option (see 'qjournal --help')\n"
        unknown = run_qjournal(tmp_path, "no-such-command")[0]
        assert unknown.returncode == 1 and "invalid choice: 'no-such-command'" in unknown.stderr
        assert "'info'" in unknown.stderr and "'convert'" in unknown.stderr  # every command is offered


class TestWritePatternStreams:
    """``qjournal write -P``: the pattern is made a chunk at a time, whatever LENGTH is.

    Oracle: qemu-io read -P and qemu-img check for the result, GNU time for the peak RSS
    (a child of GNU time, not of pytest: see bench/harness.py on forked page tables).
    """

    SIZE = 256 << 20

    def test_bounded_memory(self, tmp_path: Path) -> None:
        img = tmp_path / "w.qcow2"
        qemu.qemu_img("create", "-q", "-f", "qcow2", str(img), "1G")
        rss = tmp_path / "rss"
        res = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss), sys.executable, "-m", "qjournal", "write",
                              str(img), "1M", "-P", "0xab", str(self.SIZE)], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert res.returncode == 0, res.stderr
        assert res.stdout == f"wrote {self.SIZE}/{self.SIZE} bytes at offset {1 << 20}\n"
        peak_mib = int(rss.read_text().split()[-1]) / 1024
        assert peak_mib < 128, f"peak RSS {peak_mib:.0f} MiB for a {self.SIZE >> 20} MiB write"
        qemu.qemu_io(img, f"read -P 0xab 1M {self.SIZE}", "read -P 0 0 1M", f"read -P 0 {(1 << 20) + self.SIZE} 1M",
                     read_only=True)
        assert qemu.check(img)[0] == 0

    def test_refused_part_way_writes_nothing(self, tmp_path: Path) -> None:
        """A damaged L2 entry in the second chunk refuses the whole request, as one write:
        the first chunk's new clusters are given back and nothing is mapped."""
        img = qemu.create(tmp_path / "d.qcow2", "64M", "cluster_size=4096")
        qemu.qemu_io(img, "write -P 0x11 20M 4k")
        damage.poke64(img, damage.l2_pos(img, 20 << 20), damage.u64(img, damage.l2_pos(img, 20 << 20)) | 1 << 2)
        before = img.read_bytes()
        res = subprocess.run([sys.executable, "-m", "qjournal", "write", str(img), "0", "-P", "0x5a", "24M"],
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert res.returncode == 1 and "L2" in res.stderr and res.stderr.count("\n") == 1, res.stderr
        assert img.read_bytes() == before

    def test_past_the_end_writes_nothing(self, tmp_path: Path) -> None:
        img = tmp_path / "w.qcow2"
        qemu.qemu_img("create", "-q", "-f", "qcow2", str(img), "64M")
        before = img.read_bytes()
        res = subprocess.run([sys.executable, "-m", "qjournal", "write", str(img), "63M", "-P", "1", "2M"],
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert res.returncode == 1
        assert res.stderr == ("qjournal: write: 2097152 bytes at offset 66060288 run past the end of the "
                              "67108864-byte disk\n")
        assert img.read_bytes() == before


class TestBench:
    def test_info_bench_times_whole_processes(self, tmp_path: Path) -> None:
        """``python -m bench info``: ours and both peer commands timed, the ratio against their sum."""
        out = tmp_path / "results.json"
        res = subprocess.run([sys.executable, "-m", "bench", "info", "--rounds", "2", "--dir", str(tmp_path),
                              "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "info: peer = qemu-img info IMAGE " in res.stdout and " + python" in res.stdout
        (r,) = json.loads(out.read_text())["results"]
        assert r["error"] is None and r["goal_ratio"] == 2.0
        parts = r["peer_parts_s"]
        assert [label.split()[0] for label in parts] == ["qemu-img", os.path.basename(sys.executable)]
        assert all(len(ts) == 2 for ts in parts.values())
        for i in range(2):
            assert r["peer_s"][i] == pytest.approx(sum(ts[i] for ts in parts.values()))
        assert r["ratio"] == pytest.approx(r["ours_median_s"] / r["peer_median_s"])


class TestLazyModule:
    def test_loads_on_first_attribute(self) -> None:
        mod = LazyModule("colorsys")
        assert not mod.loaded
        assert mod.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
        assert mod.loaded and mod.__dict__["rgb_to_hsv"] is sys.modules["colorsys"].rgb_to_hsv
        assert type(mod) is types.ModuleType  # a plain module from then on: reads cost what a module's do

    def test_missing_attribute_raises(self) -> None:
        mod = LazyModule("colorsys")
        with pytest.raises(AttributeError):
            mod.no_such_name  # noqa: B018
        assert mod.loaded

    def test_missing_module_raises_on_use(self) -> None:
        mod = LazyModule("qjournal_no_such_module")
        with pytest.raises(ModuleNotFoundError):
            mod.anything  # noqa: B018

    def test_threads_see_one_module(self) -> None:
        mod = LazyModule("fractions")
        seen: list[object] = []
        threads = [threading.Thread(target=lambda: seen.append(mod.Fraction)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(seen) == 8 and all(f is sys.modules["fractions"].Fraction for f in seen)

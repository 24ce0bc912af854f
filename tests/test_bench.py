"""The benchmark harness, `python -m bench`, run as a user runs it.

Oracle: the harness's own output (table and JSON); the benchmark it runs checks
both sides' results with qemu-img check and qemu-img info.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


class TestRun:
    def test_one_round_prints_a_ratio(self, tmp_path: Path) -> None:
        out = tmp_path / "results.json"
        res = bench("bitmap-add", "--rounds", "1", "--warmup", "0", "--warm", "16", "--dir", tmp_path, "--json", out)
        assert res.returncode == 0, res.stderr
        rows = [line for line in res.stdout.splitlines() if line.startswith("bitmap-add")]
        assert len(rows) == 1, res.stdout
        assert re.search(r"\d+\.\d ms +\d+\.\d ms +\d+\.\d\dx +<= 1\.0x +(PASS|MISS)$", rows[0]), rows[0]
        (result,) = json.loads(out.read_text())["results"]
        assert result["name"] == "bitmap-add"
        assert len(result["ours_s"]) == len(result["peer_s"]) == 1
        assert result["ratio"] == result["ours_median_s"] / result["peer_median_s"] > 0
        assert list(tmp_path.iterdir()) == [out], "the work directory was not removed"


class TestSelect:
    def test_list_and_prefix(self) -> None:
        res = bench("--list")
        assert res.returncode == 0, res.stderr
        names = [line.split()[0] for line in res.stdout.splitlines()]
        assert {"bitmap-add", "bitmap-merge", "bitmap-clear", "bitmap-remove", "bitmap-info"} <= set(names)

    def test_unknown_name_is_a_usage_error(self) -> None:
        res = bench("no-such-benchmark")
        assert res.returncode == 2
        assert "no benchmark named 'no-such-benchmark'" in res.stderr


class TestRate:
    def test_crc32c_is_measured_against_its_rate(self, tmp_path: Path) -> None:
        out = tmp_path / "results.json"
        res = bench("crc32c", "--rounds", "1", "--warmup", "0", "--warm", "16", "--dir", tmp_path, "--json", out)
        assert res.returncode == 0, res.stderr
        results = {r["name"]: r for r in json.loads(out.read_text())["results"]}
        assert set(results) == {"crc32c-whole", "crc32c-blocks"}, "the prefix selects both"
        for name, rate in (("crc32c-whole", 4e9), ("crc32c-blocks", 1e9)):
            r = results[name]
            assert r["error"] is None
            assert r["goal_rate_bytes_per_s"] == rate
            assert r["peer_s"] == [(64 << 20) / rate], "the peer is the time the goal allows, no process"
            assert r["ours_rate_bytes_per_s"] == (64 << 20) / r["ours_median_s"]
            assert r["pass"] == (r["ours_rate_bytes_per_s"] >= rate)
            (line,) = [x for x in res.stdout.splitlines() if x.startswith(f"{name}: ")]
            assert re.fullmatch(rf"{name}: \d+\.\d\d GB/s \(64 MiB a call; goal >= {rate / 1e9:.1f} GB/s, .*\)", line)

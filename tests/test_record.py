"""crashsim record: a real qemu-img run recorded over NBD (nbdkit's Python plugin), its trace
round-tripped into a crashsim Recording, and its crash states judged by QEMU's rules.

The oracle is QEMU itself: the recorded final image must be byte for byte what the same
qemu-img command leaves on a plain file, and each state is judged by qemu-img check,
info and compare.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crashsim import nbdrecord, qemurules, trace as tr
from crashsim.cli import main as crashsim_main
from crashsim.states import Generator, Timeline
from qemu import qemu_img

ROOT = Path(__file__).resolve().parent.parent
ADD = ["qemu-img", "bitmap", "--add", "--image-opts", "{nbd}", "b0"]


def make_image(path: Path) -> Path:
    # QEMU's default layout for 64 KiB clusters: the feature name table puts the bitmaps
    # extension's header at the end of sector 0 and its data in sector 1.
    qemu_img("create", "-q", "-f", "qcow2", str(path), "4M")
    return path


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, tr.Trace]:
    """``qemu-img bitmap --add`` recorded, and the same command run on a plain copy."""
    d = tmp_path_factory.mktemp("record")
    image = make_image(d / "disk.qcow2")
    plain = d / "plain.qcow2"
    plain.write_bytes(image.read_bytes())
    qemu_img("bitmap", "--add", str(plain), "b0")
    nbdrecord.record(image, ADD, d / "add.trace", spare=8 << 20, timeout=60)
    return image, plain, tr.load(d / "add.trace")


def leftovers(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (our private folder)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1]
        except OSError:
            continue
        if marker in cmd and state != "Z":
            out.append(f"{pid}: {cmd}")
    return out


class TestRecording:
    def test_the_final_image_is_what_qemu_img_leaves_on_a_file(self, recorded: tuple[Path, Path, tr.Trace]) -> None:
        image, plain, t = recorded
        assert image.read_bytes() == t.initial          # IMAGE itself is never written
        final = tr.final_image(t)
        assert final == plain.read_bytes()               # byte for byte, at the size a file would have
        assert t.used_size == plain.stat().st_size > t.header["size"]
        assert tr.sha256(final) == t.end["final_sha256"]

    def test_bitmap_add_writes_in_order_with_flushes_before_the_header(
            self, recorded: tuple[Path, Path, tr.Trace]) -> None:
        _, _, t = recorded
        kinds = [r.kind for r in t.records]
        assert kinds[0] == "open"
        assert set(kinds) <= {"open", "write", "flush", "trim", "zero"}
        writes = [i for i, k in enumerate(kinds) if k == "write"]
        header = [i for i in writes if t.records[i].offset == 0]
        assert len(header) == 1 and header[0] == writes[-1]       # the header switch comes last
        # QEMU flushes the bitmap directory and refcounts before it rewrites the header, and
        # the header before it returns.
        assert "flush" in kinds[writes[-2]:header[0]]
        assert "flush" in kinds[header[0]:]
        assert t.end["exit"] == 0 and t.header["spare"] == 8 << 20

    def test_plugin_and_trace_agree_on_the_record_head(self) -> None:
        source = (ROOT / "crashsim" / "nbdplugin.py").read_text()
        assert f'HEAD = struct.Struct("{tr.HEAD.format}")' in source
        for kind in ("W", "U", "F", "T", "Z", "O"):
            assert f'b"{kind}"' in source


class TestTraceFormat:
    def test_round_trip(self, recorded: tuple[Path, Path, tr.Trace], tmp_path: Path) -> None:
        _, _, t = recorded
        path = tmp_path / "copy.trace"
        with open(path, "wb") as f:
            tr.write_start(f, t.header, t.initial)
            for r in t.records:
                kind = {v: k for k, v in tr.KINDS.items()}[r.kind]
                f.write(tr.HEAD.pack(kind, r.offset, r.length) + r.data)
        tr.append_end(path, t.end)
        assert tr.load(path) == t

    def test_every_kind_converts_to_recording_entries(self, tmp_path: Path) -> None:
        initial = bytes(range(256)) * 32                     # 8 KiB
        path = tmp_path / "kinds.trace"
        with open(path, "wb") as f:
            tr.write_start(f, {"size": len(initial), "initial_sha256": tr.sha256(initial)}, initial)
            for kind, off, n, data in ((tr.OPEN, 0, 0, b""), (tr.WRITE, 100, 3, b"abc"),
                                       (tr.FUA_WRITE, 9000, 4, b"wxyz"), (tr.FLUSH, 0, 0, b""),
                                       (tr.TRIM, 8000, 4096, b""), (tr.ZERO, 12000, 100, b""),
                                       (tr.FLUSH, 12000, 100, b"")):
                f.write(tr.HEAD.pack(kind, off, n) + data)
        tr.append_end(path, {"used_size": 12100})
        rec = tr.to_recording(tr.load(path))
        got = [(e.kind, e.off, len(e.data), e.ranges, e.name) for e in rec.entries]
        assert got == [
            ("mark", 0, 0, (), "nbd-open"),
            ("write", 100, 3, (), ""),
            ("write", 9000, 4, (), ""), ("barrier", 0, 0, ((9000, 4),), ""),   # FUA: a barrier over its range
            ("barrier", 0, 0, ((0, 9004),), ""),                                 # flush: the whole file
            ("write", 8000, 1004, (), ""),                                       # trim: clipped, never grows
            ("write", 12000, 100, (), ""),                                       # zero: grows the file
            ("barrier", 0, 0, ((12000, 100),), ""),
        ]
        final = tr.final_image(tr.load(path))
        assert len(final) == 12100 and final[100:103] == b"abc" and final[:100] == initial[:100]
        assert final[8000:] == bytes(12100 - 8000)      # the trim zeroed the FUA write too, up to the end

    def test_a_cut_trace_is_refused(self, recorded: tuple[Path, Path, tr.Trace], tmp_path: Path) -> None:
        _, _, t = recorded
        whole = tmp_path / "whole.trace"
        with open(whole, "wb") as f:
            tr.write_start(f, t.header, t.initial)
            f.write(tr.HEAD.pack(tr.WRITE, 0, 10) + b"12345")
        with pytest.raises(tr.TraceError, match="holds 5 of its 10 bytes"):
            tr.load(whole)
        (tmp_path / "junk.trace").write_bytes(b"not a trace")
        with pytest.raises(tr.TraceError, match="not a crashsim trace"):
            tr.load(tmp_path / "junk.trace")


class TestJudging:
    def test_states_of_bitmap_add_by_qemus_rules(self, recorded: tuple[Path, Path, tr.Trace]) -> None:
        _, _, t = recorded
        r = qemurules.check_trace(t, "add", jobs=1)
        tl = Timeline(tr.to_recording(t))
        gen = Generator(tl, "add")
        distinct = {tl.key(s) for strategy in qemurules.TRACE_STRATEGIES for s in gen.generate(strategy)}
        assert len(r.judged) == r.unique == len(distinct) and not r.sampled
        out = r.outcomes()
        assert out["old"] >= 1 and out["new"] == 1
        # What QEMU 7.2 really does: a whole-cluster header write whose bitmaps extension
        # straddles sectors 0 and 1. Torn between them, the header announces the extension
        # while the extension's data is still zeros: qemu-img refuses the image. Nothing else
        # is outside the spec: no corruption, and each other state is old, new or leaks.
        bad = [j for j in r.judged if j.outcome in qemurules.NOT_ALLOWED]
        assert bad and all(j.strategy == "torn" and j.outcome == "unopenable" for j in bad)
        assert all("bitmaps extension with zero bitmaps" in j.reason for j in bad)
        assert set(out) <= {"old", "new", "leaks only", "unopenable"}
        assert not r.ok
        # With 4 KiB atomic sectors the header cluster's first page cannot tear: all allowed.
        r4 = qemurules.check_trace(t, "add", jobs=1, sector_size=4096)
        assert r4.ok and r4.outcomes().get("unopenable", 0) == 0

    def test_a_sample_keeps_every_prefix(self, recorded: tuple[Path, Path, tr.Trace]) -> None:
        _, _, t = recorded
        whole = qemurules.check_trace(t, "add", ("prefix", "subset"), jobs=1)
        prefixes = next(x.unique for x in whole.tallies if x.strategy == "prefix")
        assert whole.unique > prefixes + 1
        r = qemurules.check_trace(t, "add", ("prefix", "subset"), jobs=1, max_states=prefixes + 1)
        assert r.sampled and len(r.judged) == prefixes + 1
        assert sum(1 for j in r.judged if j.strategy == "prefix") == prefixes
        assert {"old", "new"} <= set(r.outcomes())

    def test_generation_stops_at_its_budget_and_says_so(self, recorded: tuple[Path, Path, tr.Trace]) -> None:
        _, _, t = recorded
        r = qemurules.check_trace(t, "add", ("prefix", "subset"), jobs=1, max_candidates=3)
        assert [(x.strategy, x.generated, x.stopped) for x in r.tallies] == [("prefix", 3, True),
                                                                             ("subset", 3, True)]
        assert len(r.judged) == r.unique <= 6
        text = "\n".join(qemurules.summary_lines(r))
        assert text.count("/3 states (generation stopped there: the first candidates only)") == 2

    def test_classify_in_use_and_dropped(self, tmp_path: Path) -> None:
        # The seed protocol's two outcomes, made by qemu itself: a bitmap left in_use by a
        # killed qemu-io, and bitmaps dropped by a clear autoclear bit.
        old = make_image(tmp_path / "old.qcow2")
        qemu_img("bitmap", "--add", str(old), "b0")
        in_use = tmp_path / "in_use.qcow2"
        in_use.write_bytes(old.read_bytes())
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "sigraise 9", str(in_use)], capture_output=True)
        dropped = bytearray(old.read_bytes())
        dropped[0x5F] &= 0xFE                             # autoclear_features bit 0, the last byte of the field
        refs = qemurules.make_refs(str(tmp_path), old.read_bytes(), old.read_bytes())
        for image, want in ((in_use.read_bytes(), "bitmap left in_use"), (bytes(dropped), "bitmaps dropped"),
                            (old.read_bytes(), "old"), (b"QFI\xfb" + bytes(200), "unopenable")):
            look = qemurules.look(image, str(tmp_path), "s", refs)
            assert qemurules.classify(look, refs.old, refs.new)[0] == want


    def test_guest_data_tells_old_from_new_when_info_does_not(self, tmp_path: Path) -> None:
        old = make_image(tmp_path / "old.qcow2")
        new = tmp_path / "new.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(old), "4M")
        new.write_bytes(old.read_bytes())
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 64k 4k", str(new)], check=True,
                       capture_output=True)
        refs_dir = tmp_path / "refs"
        refs_dir.mkdir()
        refs = qemurules.make_refs(str(refs_dir), old.read_bytes(), new.read_bytes())
        assert refs.old.info == refs.new.info             # qemu-img info cannot tell them apart
        for image, want in ((old.read_bytes(), "old"), (new.read_bytes(), "new")):
            look = qemurules.look(image, str(tmp_path), "s", refs)
            assert qemurules.classify(look, refs.old, refs.new)[0] == want


    def test_bitmap_bits_tell_old_from_new_when_info_and_data_do_not(self, tmp_path: Path) -> None:
        old = make_image(tmp_path / "old.qcow2")
        qemu_img("bitmap", "--add", str(old), "b0")
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 64k 4k", str(old)], check=True,
                       capture_output=True)
        new = tmp_path / "new.qcow2"
        new.write_bytes(old.read_bytes())
        qemu_img("bitmap", "--clear", str(new), "b0")
        refs_dir = tmp_path / "refs"
        refs_dir.mkdir()
        refs = qemurules.make_refs(str(refs_dir), old.read_bytes(), new.read_bytes())
        assert refs.old.info == refs.new.info and refs.old.guest == refs.new.guest == "same"
        for image, want in ((old.read_bytes(), "old"), (new.read_bytes(), "new")):
            look = qemurules.look(image, str(tmp_path), "s", refs)
            assert qemurules.classify(look, refs.old, refs.new)[0] == want


class TestErrors:
    def run_record(self, tmp_path: Path, *command: str, timeout: str = "30",
                   interrupt: bool = False) -> tuple[subprocess.CompletedProcess[str] | None, str, list[str]]:
        image = make_image(tmp_path / "disk.qcow2")
        env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT))
        argv = [sys.executable, "-m", "crashsim", "record", "--spare", "1M", "--timeout", timeout,
                str(image), "--", *command]
        if not interrupt:
            res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
            return res, res.stderr, leftovers(str(tmp_path) + "/crashsim-record-")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 30
        while not leftovers(str(tmp_path) + "/crashsim-record-")[1:]:     # nbdkit and the command
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130
        return None, err, leftovers(str(tmp_path) + "/crashsim-record-")

    def assert_clean(self, tmp_path: Path, left: list[str]) -> None:
        assert left == []
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("crashsim-record-")] == []
        assert not (tmp_path / "disk.qcow2.trace").exists() and not (tmp_path / "disk.qcow2.trace.part").exists()

    def test_a_failing_command(self, tmp_path: Path) -> None:
        res, err, left = self.run_record(tmp_path, "qemu-img", "bitmap", "--remove", "--image-opts", "{nbd}", "nope")
        assert res is not None and res.returncode == 1
        assert err.startswith("crashsim record: qemu-img failed with exit status 1: qemu-img: ")
        assert "nope" in err and len(err.strip().splitlines()) == 1
        self.assert_clean(tmp_path, left)

    def test_a_hanging_command(self, tmp_path: Path) -> None:
        res, err, left = self.run_record(tmp_path, "qemu-io", "--image-opts", "{nbd}", "-c", "sleep 60000",
                                         timeout="1")
        assert res is not None and res.returncode == 1
        assert err.strip() == "crashsim record: qemu-io did not finish within 1 s (killed)"
        self.assert_clean(tmp_path, left)

    def test_a_command_that_never_connects(self, tmp_path: Path) -> None:
        res, err, left = self.run_record(tmp_path, "sh", "-c", "true", "{nbd}")
        assert res is not None and res.returncode == 1
        assert err.strip() == ("crashsim record: sh exited without ever connecting to the export "
                               "(is {nbd} where it opens its image?)")
        self.assert_clean(tmp_path, left)

    def test_ctrl_c(self, tmp_path: Path) -> None:
        _, err, left = self.run_record(tmp_path, "qemu-io", "--image-opts", "{nbd}", "-c", "sleep 60000",
                                       interrupt=True)
        assert "interrupted" in err
        self.assert_clean(tmp_path, left)


def test_record_then_run_trace_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = make_image(tmp_path / "disk.qcow2")
    out = tmp_path / "add.trace"
    assert crashsim_main(["record", "-o", str(out), str(image), "--", *ADD]) == 0
    assert "crashsim record: " + str(out) in capsys.readouterr().out
    # 4 KiB sectors: QEMU's bitmap --add leaves only allowed states, exit status 0.
    code = crashsim_main(["run", "--trace", str(out), "--strategy", "prefix,torn", "--sector-size", "4096",
                          "--jobs", "1"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "add: qemu-img bitmap --add --image-opts {nbd} b0" in text
    assert "  prefix: " in text and "  torn: " in text and "outcomes: old" in text
    assert text.rstrip().endswith("0 corrupt or unopenable: PASS")
    # 512-byte sectors: the torn header is unopenable, the run fails (exit status 1).
    assert crashsim_main(["run", "--trace", str(out), "--strategy", "torn", "--jobs", "1"]) == 1
    text = capsys.readouterr().out
    assert "UNOPENABLE" in text and text.rstrip().endswith("FAIL (states the qcow2 spec does not allow)")
    # Too many states: a seeded sample, and the summary says so.
    assert crashsim_main(["run", "--trace", str(out), "--strategy", "prefix", "--jobs", "1",
                          "--max-states", "2"]) == 0
    assert "distinct states, a seeded sample of 2 judged" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["run"], ["run", "add", "--trace", "x.trace"],
                                  ["run", "--trace", "x.trace", "--report", "r.json"],
                                  ["record", "disk.qcow2"], ["record", "--spare", "lots", "disk.qcow2", "--", "x"]])
def test_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        crashsim_main(argv)
    assert e.value.code == 2


def test_a_command_without_the_export_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = make_image(tmp_path / "disk.qcow2")
    assert crashsim_main(["record", str(image), "--", "qemu-img", "info", str(image)]) == 1
    assert capsys.readouterr().err.startswith("crashsim record: the command never names the export: write {nbd}")
    assert crashsim_main(["run", "--trace", str(image)]) == 1
    assert "not a crashsim trace" in capsys.readouterr().err


def test_a_command_that_outgrows_the_spare_room(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.qcow2")
    with pytest.raises(nbdrecord.RecordError) as e:
        nbdrecord.record(image, ["qemu-io", "--image-opts", "{nbd}", "-c", "write -P 1 0 2M"], tmp_path / "t.trace",
                         spare=1 << 20, timeout=30)
    assert str(e.value).startswith("qemu-io failed with exit status 1: it wrote past the end of the export "
                                   "(NBD_CMD_WRITE: offset and count are out of range")
    assert str(e.value).endswith(f"give it more --spare (now {1 << 20} bytes)")
    with pytest.raises(nbdrecord.RecordError, match="exit status 1: read failed: Input/output error$"):
        nbdrecord.record(image, ["qemu-io", "--image-opts", "{nbd}", "-c", "read 0 8M"], tmp_path / "t.trace",
                         spare=1 << 20, timeout=30)

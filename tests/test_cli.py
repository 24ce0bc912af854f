"""The ``qjournal`` command as a new user meets it: versions, help, usage errors,
option names, standard input and output, closed pipes, formats, stale journals.

Oracles: qemu-img (its option list for ``create -o help``, ``check`` and ``convert``
of what qjournal wrote), the bytes of the files themselves, and for a few cases a real
``python -m qjournal`` process, whose exit code and stderr are what a shell sees.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import qemu
import qjournal
from crashsim.recorder import IMAGE, JOURNAL, Recording, RecordingMedium
from qjournal.cli import main
from qjournal.cli.app import EXIT_BROKEN_PIPE, commands
from qjournal import Image

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def qj(*argv: object, stdin: bytes | None = None) -> tuple[int, str, str]:
    """``qjournal ARGV`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
    finally:
        sys.stdin = saved
    return code, out.getvalue(), err.getvalue()


def run(module: str, *argv: object, stdin: bytes = b"", cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """``python -m MODULE ARGV`` as a real process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", module, *map(str, argv)], input=stdin, capture_output=True,
                          env=env, cwd=cwd, timeout=120)


def popen(*argv: object) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "qjournal", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)


def one_line_error(code: int, out: str, err: str) -> str:
    assert code == 1 and out == "", (code, out, err)
    assert err.startswith("qjournal: ") and err.count("\n") == 1, err
    return err


# Each subcommand on an image IMG (NEW: a file to create), valid as written.
COMMANDS = {
    "create": ["create", "NEW", "1M"],
    "info": ["info", "IMG"],
    "check": ["check", "IMG"],
    "map": ["map", "IMG"],
    "bitmap": ["bitmap", "--add", "IMG", "b"],
    "read": ["read", "IMG", "0", "512"],
    "write": ["write", "IMG", "0", "-P", "1", "512"],
    "zero": ["zero", "IMG", "0", "512"],
    "discard": ["discard", "IMG", "0", "512"],
    "resize": ["resize", "IMG", "2M"],
    "snapshot": ["snapshot", "-l", "IMG"],
    "compare": ["compare", "IMG", "IMG"],
    "measure": ["measure", "IMG"],
    "commit": ["commit", "IMG"],                 # IMG made with a backing file (see BACKED)
    "rebase": ["rebase", "-u", "-b", "", "IMG"],
    "amend": ["amend", "-o", "lazy_refcounts=on", "IMG"],
    "recover": ["recover", "IMG"],
    "journal": ["journal", "IMG"],
    "convert": ["convert", "-O", "qcow2", "IMG", "NEW"],
}


BACKED = {"commit"}
"""Commands whose IMG needs a backing file."""
READS_RAW = {"compare", "measure", "convert"}
"""Commands that read raw images too (as qemu-img's): -f raw is theirs."""


def argv_for(name: str, img: Path, new: Path, fmt: str | None = None) -> list[str]:
    argv = [{"IMG": str(img), "NEW": str(new)}.get(a, a) for a in COMMANDS[name]]
    return argv[:1] + (["-f", fmt] if fmt is not None else []) + argv[1:]


def test_the_table_covers_every_subcommand() -> None:
    assert set(COMMANDS) == set(commands())


class TestVersionAndHelp:
    def test_version_in_process(self) -> None:
        assert qj("--version") == (0, f"qjournal {qjournal.__version__}\n", "")

    def test_version_of_both_commands(self) -> None:
        for module in ("qjournal", "crashsim"):
            res = run(module, "--version")
            assert (res.returncode, res.stderr) == (0, b""), res
            assert res.stdout.decode() == f"{module} {qjournal.__version__}\n"

    def test_every_subcommand_has_a_description_and_an_example(self) -> None:
        code, top, _ = qj("--help")
        assert code == 0
        for name, parser in commands().items():
            assert name in top
            code, out, err = qj(name, "--help")
            assert (code, err) == (0, ""), name
            assert parser.description and len(parser.description) > 40, name
            assert " ".join(parser.description.split()[:4]) in " ".join(out.split()), name
            examples = out.split("examples:\n", 1)[1]
            assert re.search(rf"^  qjournal {name} \S", examples, re.M), (name, examples)


class TestUsageErrors:
    @pytest.mark.parametrize("argv", [[], ["bogus"], ["info"], ["info", "--output=xml", "x.qcow2"],
                                      ["check", "-r", "some", "x.qcow2"], ["read", "x.qcow2", "0"],
                                      ["bitmap", "--nope", "x.qcow2", "b"], ["create"]])
    def test_one_line_and_exit_1(self, argv: list[str]) -> None:
        err = one_line_error(*qj(*argv))
        assert "usage:" not in err

    def test_exit_1_in_a_real_process(self) -> None:
        res = run("qjournal", "info")
        assert res.returncode == 1 and res.stdout == b"", res
        assert res.stderr.decode().startswith("qjournal: info: ") and res.stderr.count(b"\n") == 1

    def test_create_o_help_lists_qemu_img_options(self, tmp_path: Path) -> None:
        theirs = qemu.qemu_img("create", "-f", "qcow2", "-o", "help", str(tmp_path / "q.qcow2"), "1M").stdout
        names = set(re.findall(r"^  ([a-z0-9_.-]+)=<", theirs, re.M))
        assert {"cluster_size", "refcount_bits", "compat", "size"} <= names
        for spec in ("help", "?", "cluster_size=4k,help"):
            code, out, err = qj("create", "-o", spec, tmp_path / "x.qcow2", "1M")
            assert (code, err) == (0, ""), err
            assert set(re.findall(r"^  ([a-z0-9_.-]+)=<", out, re.M)) == names
        code, out, _ = qj("create", "-o", "help")
        assert code == 0 and "cluster_size=<size>" in out
        assert not (tmp_path / "x.qcow2").exists()


class TestReadOutputFile:
    def test_output_file_holds_the_bytes(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "d.qcow2", "4M")
        qemu.qemu_io(img, "write -P 0x5a 4096 64k")
        out = tmp_path / "out.bin"
        assert qj("read", "--output-file", out, img, "0", "1M") == (0, "", "")
        qemu.qemu_img("convert", "-O", "raw", str(img), str(tmp_path / "ref.raw"))
        assert out.read_bytes() == (tmp_path / "ref.raw").read_bytes()[:MiB]

    def test_output_file_dash_is_stdout(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "d.qcow2", "4M")
        qemu.qemu_io(img, "write -P 0x5a 100 200")
        res = run("qjournal", "read", "--output-file", "-", img, "0", "512")
        assert (res.returncode, res.stderr) == (0, b"")
        assert res.stdout == b"\0" * 100 + b"\x5a" * 200 + b"\0" * 212

    def test_output_names_a_format_so_read_refuses_it(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "d.qcow2", "4M")
        with contextlib.chdir(tmp_path):
            for argv in (["--output=json"], ["--output", "out.bin"]):
                err = one_line_error(*qj("read", *argv, img, "0", "512"))
                assert "--output-file" in err
            assert sorted(p.name for p in tmp_path.iterdir()) == ["d.qcow2"]   # no file called json


class TestWriteStdin:
    def test_stdin_in_a_real_process(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "d.qcow2", "4M")
        data = os.urandom(3 * MiB + 17)
        res = run("qjournal", "write", img, "5000", "--input", "-", stdin=data)
        assert (res.returncode, res.stderr) == (0, b""), res
        assert res.stdout == f"wrote {len(data)}/{len(data)} bytes at offset 5000\n".encode()
        qemu.assert_clean(img)
        qemu.qemu_img("convert", "-O", "raw", str(img), str(tmp_path / "ref.raw"))
        assert (tmp_path / "ref.raw").read_bytes()[5000:5000 + len(data)] == data

    def test_stdin_that_fits_exactly(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "d.qcow2", "2M")
        assert qj("write", img, "1M", "--input", "-", stdin=b"\x11" * MiB)[0] == 0
        with Image(img) as q:
            assert q.read(MiB - 1, MiB + 1) == b"\0" + b"\x11" * MiB

    def test_too_long_stdin_writes_nothing(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "d.qcow2", "2M")
        before = img.read_bytes()
        err = one_line_error(*qj("write", img, "1M", "--input", "-", stdin=b"\x11" * (MiB + 1)))
        assert "standard input" in err and "nothing was written" in err
        assert img.read_bytes() == before

    def test_too_long_pipe_in_a_real_process(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "d.qcow2", "2M")
        before = img.read_bytes()
        res = run("qjournal", "write", img, "0", "--input", "-", stdin=b"\x22" * (3 * MiB))
        assert res.returncode == 1 and res.stderr.count(b"\n") == 1, res
        assert img.read_bytes() == before


class TestMessagesAndPipes:
    def test_empty_names_are_never_shown_empty(self) -> None:
        for name in COMMANDS:
            argv = [a if a not in ("IMG", "NEW") else "" for a in COMMANDS[name]]
            code, out, err = qj(*argv)
            if name == "compare":
                assert code == 2, err      # compare's errors exit 2, as qemu-img compare's
                code = 1
            err = one_line_error(code, out, err)
            assert ": :" not in err and "empty" in err, (name, err)

    def test_missing_file_is_named(self, tmp_path: Path) -> None:
        err = one_line_error(*qj("info", tmp_path / "nope.qcow2"))
        assert f"'{tmp_path / 'nope.qcow2'}'" in err and "No such file" in err

    def test_closed_pipe_in_process(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "d.qcow2", "4M")

        class Closed(io.StringIO):
            def write(self, s: str) -> int:
                raise BrokenPipeError(32, "Broken pipe")

        err = io.StringIO()
        with contextlib.redirect_stdout(Closed()), contextlib.redirect_stderr(err):
            assert main(["map", str(img)]) == EXIT_BROKEN_PIPE
        assert err.getvalue() == ""

    def test_map_into_head(self, tmp_path: Path) -> None:
        img = tmp_path / "big.qcow2"
        with qjournal.create(img, 8 * MiB, cluster_size=512) as q, q.transaction():
            for off in range(0, 8 * MiB, 1024):
                q.write(off, b"x")
        p = popen("map", img)
        assert p.stdout is not None and p.stdout.readline().startswith(b"Offset")
        p.stdout.close()
        assert p.wait(60) == EXIT_BROKEN_PIPE
        assert p.stderr is not None and p.stderr.read() == b""

    def test_read_into_head(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "d.qcow2", "64M")
        p = popen("read", "--output-file", "-", img, "0", "64M")
        assert p.stdout is not None and p.stdout.read(1) == b"\0"
        p.stdout.close()
        assert p.wait(60) == EXIT_BROKEN_PIPE
        assert p.stderr is not None and p.stderr.read() == b""


def _with_pending_journal(path: Path) -> None:
    """Give ``path`` a journal holding a committed transaction that never reached it."""
    rec = Recording({IMAGE: path.read_bytes(), JOURNAL: b""})
    with Image("rec.qcow2", "r+", medium=RecordingMedium(rec, IMAGE),
               journal_medium=RecordingMedium(rec, JOURNAL)) as img:
        img.bitmaps.add("pending", 65536)
    commit = next(i for i, e in enumerate(rec.entries) if e.kind == "mark" and e.name == "commit")
    files = rec.state(commit + 1)
    path.write_bytes(files[IMAGE])
    Path(f"{path}.qjournal").write_bytes(files[JOURNAL])


class TestCreateOverAnOldJournal:
    def test_the_trap(self, tmp_path: Path) -> None:
        """What qjournal create avoids: a new image beside the old one's journal is refused."""
        img = qemu.create(tmp_path / "d.qcow2", "16M")
        _with_pending_journal(img)
        qemu.create(img, "16M")                     # qemu-img replaces the image, not the journal
        assert qj("bitmap", "--add", img, "x")[0] == 1

    def test_create_removes_the_old_journal(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "d.qcow2", "16M")
        _with_pending_journal(img)
        assert qj("create", img, "16M") == (0, "", "")
        assert not Path(f"{img}.qjournal").exists()
        assert qj("bitmap", "--add", img, "x")[0] == 0
        qemu.assert_clean(img)
        assert [b["name"] for b in qemu.bitmaps(img)] == ["x"]

    def test_journal_goes_before_the_rename(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A crash at the rename leaves the old image without its journal, never the new
        image with the old journal."""
        img = qemu.create(tmp_path / "d.qcow2", "16M")
        _with_pending_journal(img)
        old = img.read_bytes()

        class Crash(BaseException):
            pass

        def rename(src: str, dst: str) -> None:
            raise Crash

        monkeypatch.setattr(os, "rename", rename)
        with pytest.raises(Crash):
            qj("create", img, "32M")
        monkeypatch.undo()
        assert not Path(f"{img}.qjournal").exists()
        assert img.read_bytes() == old
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d.qcow2"]   # no temporary file left

    def test_a_clean_journal_stays_and_is_harmless(self, tmp_path: Path) -> None:
        """The README says why a journal stays after clean operations: nothing is pending
        in it, and removing it changes nothing."""
        img = qemu.create(tmp_path / "d.qcow2", "16M")
        assert qj("bitmap", "--add", img, "x")[0] == 0
        journal = Path(f"{img}.qjournal")
        assert journal.exists()
        code, out, _ = qj("journal", "--output=json", img)
        assert code == 0 and '"checkpointed"' in out and '"committed"' not in out
        journal.unlink()
        assert qj("bitmap", "--remove", img, "x")[0] == 0
        qemu.assert_clean(img)


class TestFormats:
    @pytest.mark.parametrize("name", sorted(COMMANDS))
    def test_f_qcow2_is_accepted(self, name: str, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "d.qcow2", "1M")
        if name in BACKED:
            qemu.create(tmp_path / "b.qcow2", "1M")
            qemu.qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", str(img))
        code, _, err = qj(*argv_for(name, img, tmp_path / "new.qcow2", "qcow2"))
        assert (code, err) == (0, ""), err

    @pytest.mark.parametrize("name", sorted(set(COMMANDS) - READS_RAW))
    def test_other_formats_are_refused(self, name: str, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "d.qcow2", "1M")
        before = img.read_bytes()
        for fmt in ("raw", "vmdk", ""):
            err = one_line_error(*qj(*argv_for(name, img, tmp_path / "new.qcow2", fmt)))
            assert "qcow2 images only" in err, (name, fmt, err)
        assert img.read_bytes() == before and not (tmp_path / "new.qcow2").exists()

    @pytest.mark.parametrize("name", sorted(set(COMMANDS) - {"create"} - READS_RAW))
    def test_a_raw_file_is_not_a_qcow2_image(self, name: str, tmp_path: Path) -> None:
        raw = tmp_path / "d.raw"
        raw.write_bytes(b"\x5a" * MiB)
        err = one_line_error(*qj(*argv_for(name, raw, tmp_path / "new.qcow2")))
        assert f"'{raw}' is not a qcow2 image" in err, err
        assert raw.read_bytes() == b"\x5a" * MiB and not Path(f"{raw}.qjournal").exists()

    def test_merge_source_format(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "d.qcow2", "1M")
        src = qemu.create(tmp_path / "s.qcow2", "1M")
        qemu.qemu_img("bitmap", "--add", str(src), "s")
        assert qj("bitmap", "--add", img, "b")[0] == 0
        assert qj("bitmap", "--merge", "s", "-b", src, "-F", "qcow2", img, "b")[0] == 0
        err = one_line_error(*qj("bitmap", "--merge", "s", "-b", src, "-F", "raw", img, "b"))
        assert err.startswith("qjournal: -F raw")

"""``crashsim record``: run a real QEMU command against an image served by a recording NBD server.

    crashsim record [--spare 64M] [--timeout S] [-o TRACE] IMAGE -- COMMAND ARGS...

The server is nbdkit with its Python plugin (:mod:`crashsim.nbdplugin`), not an NBD server
of ours: nbdkit already speaks every part of the protocol QEMU's client uses (newstyle
handshake, structured replies, block status, FUA, write-zeroes, trim), and the plugin only
has to append each request to the trace. It runs in the foreground (``-f``), serializes
all requests (one total order), exits with its parent (``--exit-with-parent``), and
writes a pid file once it accepts connections, which is when the command starts.

What happens, in order:

1. IMAGE is copied into a private temporary directory (mode 0700) as the export, with
   ``--spare`` bytes of zeros at its end (an NBD export cannot grow). IMAGE itself is
   never written: the trace holds what the command did.
2. The trace is started (magic, header, the initial image, see :mod:`crashsim.trace`),
   and nbdkit serves the export on a Unix socket in that directory, appending every
   request to the trace.
3. COMMAND runs with ``{nbd}`` replaced by :func:`image_opts` (a qcow2 node over the
   export) and ``{sock}`` by the socket's path (for options of your own, e.g. a backing
   file over NBD). It gets no terminal input; its output is passed on afterwards.
4. nbdkit is stopped, and the trace gets its end record (exit status, used size, the
   final image's digest). The directory is removed, whatever happened.

The trace is written as ``TRACE.part`` and renamed to TRACE once complete, so a failed
recording leaves no trace and an earlier trace of the same name untouched.

Errors (each a :class:`RecordError` with a one-line message):
the command exits non-zero (the first line of its standard error, or of its output when
its standard error is empty, as qemu-io's is, is quoted; a request past the export's end,
which nbdkit refuses, asks for more ``--spare``), runs past
``timeout`` seconds (it is killed, with its process group), never connects to the export,
or nbdkit does not start. On Ctrl-C (``KeyboardInterrupt``) the command and nbdkit are
killed and the directory removed before the interrupt goes on.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import attrs

from qjournal.errors import UsageError
from qjournal.ops.syntax import parse_size

from . import trace as tr

PLUGIN = Path(__file__).with_name("nbdplugin.py")
DEFAULT_SPARE = 64 << 20
START_TIMEOUT = 30.0           # seconds nbdkit gets to accept connections
STOP_TIMEOUT = 10.0            # seconds nbdkit gets to exit after SIGTERM


class RecordError(RuntimeError):
    """The command could not be recorded; the message is one line."""


@attrs.frozen
class RecordResult:
    trace: Path
    exit: int
    seconds: float
    size: int                  # the image's size before the command
    used_size: int             # ... and the size it uses afterwards (see crashsim.trace)
    requests: dict[str, int]   # records by kind
    stdout: str
    stderr: str


def image_opts(sock: str) -> str:
    """The ``--image-opts`` of a qcow2 image served on the Unix socket ``sock``."""
    return f"driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path={sock}"


def substitute(command: Sequence[str], sock: str) -> list[str]:
    return [a.replace("{nbd}", image_opts(sock)).replace("{sock}", sock) for a in command]


def record(image: str | Path, command: Sequence[str], trace: str | Path, spare: int = DEFAULT_SPARE,
           timeout: float = 600.0) -> RecordResult:
    """Run ``command`` against ``image`` served over NBD, and write what it did to ``trace``."""
    if not command:
        raise RecordError("no command to record: give it after --")
    if not any("{nbd}" in a or "{sock}" in a for a in command):
        raise RecordError("the command never names the export: write {nbd} where its image goes "
                          "(e.g. qemu-img info --image-opts '{nbd}')")
    if shutil.which("nbdkit") is None:
        raise RecordError("nbdkit is not installed (Debian: apt-get install nbdkit nbdkit-plugin-python)")
    try:
        initial = Path(image).read_bytes()
    except OSError as e:
        raise RecordError(f"{image}: cannot read the image ({e.strerror})") from None
    final_path = Path(trace)
    trace = final_path.with_name(final_path.name + ".part")     # renamed into place once complete
    tmp = tempfile.mkdtemp(prefix="crashsim-record-")
    export, sock, pidfile = (os.path.join(tmp, n) for n in ("export", "nbd.sock", "nbdkit.pid"))
    argv = substitute(command, sock)
    server: subprocess.Popen[bytes] | None = None
    proc: subprocess.Popen[bytes] | None = None
    done = False
    try:
        with open(export, "wb") as f:
            f.write(initial)
            f.truncate(len(initial) + spare)
        header = {"image": str(image), "size": len(initial), "spare": spare, "command": argv,
                  "template": list(command),
                  "initial_sha256": tr.sha256(initial)}
        with open(trace, "wb") as f:
            tr.write_start(f, header, initial)
        with open(os.path.join(tmp, "nbdkit.err"), "wb") as err:
            server = subprocess.Popen(["nbdkit", "-f", "-U", sock, "-P", pidfile, "--exit-with-parent",
                                       "python", str(PLUGIN), f"file={export}", f"log={trace}"],
                                      stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True)
        _wait_ready(server, pidfile, os.path.join(tmp, "nbdkit.err"))
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            raise RecordError(f"{argv[0]}: cannot run it ({e.strerror})") from None
        try:
            out, errb = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            _stop(server)
            raise RecordError(f"{argv[0]} did not finish within {timeout:g} s (killed)"
                              + ("" if tr.summarize(trace, len(initial)).connected
                                 else "; it never connected to the export")) from None
        seconds = time.monotonic() - t0
        _stop(server)
        stderr = errb.decode(errors="replace")
        if proc.returncode != 0:
            outside = _out_of_range(os.path.join(tmp, "nbdkit.err"))
            if outside:
                raise RecordError(f"{argv[0]} failed with exit status {proc.returncode}: it wrote past the end of "
                                  f"the export ({outside}; the export is {len(initial) + spare} bytes): "
                                  f"give it more --spare (now {spare} bytes)")
            text = stderr if stderr.strip() else out.decode(errors="replace")   # qemu-io reports on stdout
            first = next((line.strip() for line in text.splitlines() if line.strip()), "(no message)")
            raise RecordError(f"{argv[0]} failed with exit status {proc.returncode}: {first}")
        summary = tr.summarize(trace, len(initial))
        if not summary.connected:
            raise RecordError(f"{argv[0]} exited without ever connecting to the export "
                              f"(is {{nbd}} where it opens its image?)")
        with open(export, "rb") as f:
            final = f.read(summary.used_size)
        tr.append_end(trace, {"exit": proc.returncode, "seconds": round(seconds, 6),
                              "used_size": summary.used_size, "final_sha256": tr.sha256(final),
                              "stderr": stderr[:4096]})
        os.replace(trace, final_path)
        done = True
        return RecordResult(final_path, proc.returncode, seconds, len(initial), summary.used_size, summary.counts,
                            out.decode(errors="replace"), stderr)
    finally:
        if proc is not None and proc.poll() is None:
            _kill_group(proc)
            proc.wait()
        if server is not None:
            _stop(server)
        shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            trace.unlink(missing_ok=True)


def _wait_ready(server: subprocess.Popen[bytes], pidfile: str, errfile: str) -> None:
    """Until nbdkit wrote its pid file (it does once it accepts connections)."""
    deadline = time.monotonic() + START_TIMEOUT
    while not os.path.exists(pidfile) or os.path.getsize(pidfile) == 0:
        if server.poll() is not None:
            with open(errfile, errors="replace") as f:
                first = next((line.strip() for line in f if line.strip()), "(no message)")
            raise RecordError(f"nbdkit exited with status {server.returncode} before serving the export: {first}")
        if time.monotonic() > deadline:
            raise RecordError(f"nbdkit did not start serving the export within {START_TIMEOUT:g} s")
        time.sleep(0.005)


def _out_of_range(errfile: str) -> str:
    """nbdkit's complaint about a request past the export's end ("" when there is none)."""
    with open(errfile, errors="replace") as f:
        for line in f:
            if "out of range" in line:
                return line.split("invalid request: ", 1)[-1].strip()
    return ""


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stop(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM (nbdkit closes its connections, the plugin flushes the trace), then SIGKILL."""
    if server.poll() is not None:
        return
    server.terminate()
    try:
        server.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crashsim record", description="Run a real QEMU command against IMAGE "
                                "served over NBD by a recording server; write every request to a trace "
                                "that 'crashsim run --trace' checks.")
    p.add_argument("--spare", type=_size, default=DEFAULT_SPARE, metavar="SIZE",
                   help="zeros added at the export's end, room for the image to grow (default 64M)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="kill the command after S seconds (default 600)")
    p.add_argument("-o", "--output", type=Path, metavar="TRACE", help="the trace to write (default IMAGE.trace)")
    p.add_argument("image", type=Path, metavar="IMAGE")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS...",
                   help="{nbd} is replaced by the image-opts of the export, {sock} by its socket's path")
    return p


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: Sequence[str]) -> int:
    """Exit status: 0 recorded; 1 the command failed, hung, never connected, or nbdkit did not
    start (one line on stderr); 2 bad usage; 130 interrupted (Ctrl-C), nothing left behind."""
    p = parser()
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to record after --, e.g. -- qemu-img info --image-opts '{nbd}'")
    out = args.output or Path(str(args.image) + ".trace")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        r = record(args.image, command, out, spare=args.spare, timeout=args.timeout)
    except RecordError as e:
        print(f"crashsim record: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("crashsim record: interrupted; the command and nbdkit are stopped, nothing was written",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(r.requests.items()))
    print(f"crashsim record: {out}: {kinds}; image {r.size} -> {r.used_size} bytes; "
          f"command took {r.seconds:.2f} s")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt

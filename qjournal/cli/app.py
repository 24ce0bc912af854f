"""The ``qjournal`` command, modelled on qemu-img: the parser and the dispatch.

Each command family has its module, named in :data:`FAMILIES`; what they parse alike
is in :mod:`qjournal.cli.options`. ``qjournal COMMAND`` imports only its own family's
module, and so only the layers that family uses: ``info`` reads a header without
loading the operations, numpy or the journal's checksums.

Every error is one line on stderr (``qjournal: ...``) and a non-zero exit, never a
traceback: usage errors exit 1, as qemu-img's do. A reader that goes away (``| head``)
ends the command quietly.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from types import ModuleType
from typing import Any, Sequence

from .. import __version__
from ..errors import QcowError, StaleJournalWarning
from .options import Parser

EXIT_BROKEN_PIPE = 128 + 13
"""What a shell reports for a command that SIGPIPE ended, as qemu-img would be."""


FAMILIES: dict[str, tuple[str, ...]] = {
    "image": ("create", "check", "map"),
    "info": ("info",),
    "bitmap": ("bitmap",),
    "guest": ("read", "write", "zero", "discard"),
    "resize": ("resize",),
    "snapshot": ("snapshot",),
    "imageops": ("compare", "measure", "commit", "rebase", "amend"),
    "journal": ("recover", "journal"),
    "convert": ("convert",),
}
"""The command families (modules of this package) and the subcommands each one's
``add_parsers`` registers, in ``qjournal --help`` order. A family's module is imported
when one of its commands is parsed (:func:`family`), never at start: that is what keeps
``qjournal info`` from importing every operation (``tests/test_startup.py``)."""


def family(name: str) -> ModuleType:
    """The module of the command family ``name`` (a key of :data:`FAMILIES`), imported now."""
    return importlib.import_module(f"{__package__}.{name}")


def _parsers(command: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser and its subcommands' parsers; with ``command``, only that command's family.

    ``qjournal COMMAND ARGS`` parses the same either way: the first word picks the
    subcommand and the rest goes to its parser alone. Building one family instead of
    all saves a few milliseconds of every command's start.
    """
    p = Parser(prog="qjournal", description="A qcow2 editor with a write-ahead journal, modelled on qemu-img. "
               "'qjournal COMMAND --help' describes each command, with examples.")
    p.add_argument("--version", action="version", version=f"qjournal {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, names in FAMILIES.items():
        if command is None or command in names:
            family(name).add_parsers(sub)
    return p, dict(sub.choices)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``qjournal`` parser, every subcommand registered (with ``command``, only the
    commands of its family: enough to parse ``qjournal COMMAND ...``)."""
    return _parsers(command)[0]


def commands_of(command: str) -> dict[str, argparse.ArgumentParser]:
    """The parsers of ``command``'s family by name, as :func:`build_parser` ``(command)`` registers them."""
    return _parsers(command)[1]


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser by name, in ``qjournal --help`` order.

    >>> list(commands())[:4]
    ['create', 'check', 'map', 'info']
    """
    return _parsers()[1]


def _os_error(e: OSError) -> str:
    """One line for an OSError, the file name quoted so that an empty one shows."""
    what = e.strerror or str(e)
    if e.filename is None:
        return what
    return f"could not open {os.fsdecode(e.filename)!r}: {what}"


def _quiet_stdout() -> None:
    """After a broken pipe: point standard output at /dev/null, so that the flush at exit
    does not print a second error."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _one_line(message: str) -> str:
    """An error on one line, whatever it quotes (a file name may hold a newline)."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    print(f"qjournal: warning: {_one_line(str(message))}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``qjournal ARGV`` and return its exit code (``--help`` and ``--version``: 0)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # No command multiplies matrices, but numpy's OpenBLAS starts a thread per core when
    # numpy is imported: one thread is enough, and saves 20-40 ms of a short command's
    # start on a busy 2-core machine. (numpy is imported later, on first use.)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    known = argv[0] if argv and any(argv[0] in names for names in FAMILIES.values()) else None
    try:
        args = build_parser(known).parse_args(argv)
        with warnings.catch_warnings():
            # A stale journal on a read-only open: one line, and the command goes on.
            warnings.simplefilter("always", StaleJournalWarning)
            warnings.showwarning = _one_line_warning
            code = int(args.func(args))
        sys.stdout.flush()
        return code
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except QcowError as e:
        print(f"qjournal: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"qjournal: {_one_line(_os_error(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

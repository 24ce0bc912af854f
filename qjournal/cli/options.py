"""What every ``qjournal`` subcommand parses the same way, in one place.

* the parser class: a usage error is one line on stderr and exit 1, as qemu-img's
  (argparse's own is a usage block and exit 2);
* ``-f FMT``: every subcommand that names an image takes it. ``qcow2`` is accepted;
  everything else is refused with one line, ``raw`` included: qjournal journals qcow2
  metadata, and a raw file has none (qemu-io and qemu-img handle raw files);
* the image argument: never empty, and a file that is not qcow2 is refused with one
  line saying so, before anything else reads or writes it;
* ``--output=human|json``, ``-U``;
* sizes and offsets (``64k``, ``1.5G``, ``0x1000``: qemu's syntax), pattern bytes,
  and the ``-o key=val,...`` lists of ``create``.
"""
from __future__ import annotations

import argparse
from typing import Any, NoReturn, Sequence

from ..errors import FormatError, UsageError
from ..format.lazy import json
from ..format.header import MAGIC, V2_LENGTH
from ..ops.syntax import parse_size, split_options, strtou64

FORMATS = ("qcow2",)
"""What ``-f`` accepts, for every subcommand."""


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors raise :class:`UsageError` (one line, exit 1)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.partition(" ")[2]
        where = f"{command}: " if command else ""
        raise UsageError(f"{where}{message} (see '{self.prog} --help')")


def add_command(sub: Any, name: str, summary: str, description: str, examples: Sequence[str],
                usage: str | None = None) -> Parser:
    """A subcommand with its one-line ``summary`` (in ``qjournal --help``), its
    ``description`` and its ``examples`` (both in ``qjournal NAME --help``)."""
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)
    parser: Parser = sub.add_parser(name, help=summary, description=description, epilog=epilog, usage=usage,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser


def add_format(p: argparse.ArgumentParser, flag: str = "-f", dest: str = "format") -> None:
    """``-f FMT``: the image format (qcow2 only)."""
    p.add_argument(flag, dest=dest, metavar="FMT", help="image format: qcow2 (the only one qjournal edits)")


def add_output(p: argparse.ArgumentParser) -> None:
    """``--output=human|json``, as in qemu-img."""
    p.add_argument("--output", choices=("human", "json"), default="human", help="output format (default human)")


def add_force_share(p: argparse.ArgumentParser) -> None:
    """``-U``: open without taking the image locks (read-only commands)."""
    p.add_argument("-U", "--force-share", action="store_true",
                   help="do not take the image locks (the image may change while it is read)")


def check_format(fmt: str | None, flag: str = "-f") -> None:
    """Refuse every format but qcow2, the same way for every subcommand."""
    if fmt is None or fmt in FORMATS:
        return
    if fmt == "raw":
        raise UsageError(f"{flag} raw: qjournal edits qcow2 images only (a raw image has no metadata to "
                         "journal: use qemu-io or qemu-img for it)")
    raise UsageError(f"{flag} {fmt!r}: unknown or unsupported format: qjournal edits qcow2 images only")


def qcow2_path(path: str, fmt: str | None = None, flag: str = "-f") -> str:
    """``path``, checked: ``fmt`` is qcow2 (or not given), the name is not empty, and
    the file holds a v2 header's length and starts with the qcow2 magic (the rest of
    the header is the image's to check). A missing file raises FileNotFoundError."""
    check_format(fmt, flag)
    if not path:
        raise UsageError("the image name is empty: name a qcow2 file")
    with open(path, "rb") as f:
        head = f.read(V2_LENGTH)
    if len(head) < V2_LENGTH:
        raise FormatError("qcow2 header", 0, f"file is {len(head)} bytes, shorter than the {V2_LENGTH}-byte "
                                             f"header: {path!r} is not a qcow2 image")
    if head[:len(MAGIC)] != MAGIC:
        raise FormatError("qcow2 header", 0, f"bad magic {head[:len(MAGIC)].hex()}, expected {MAGIC.hex()}: "
                                             f"{path!r} is not a qcow2 image")
    return path


def size(text: str) -> int:
    """A size or offset in qemu's syntax (``64k``, ``1.5G``, ``0x1000``)."""
    return parse_size(text)


def pattern_byte(text: str) -> int:
    """A pattern byte as qemu-io takes it (``0xab``, ``171``, ``0253``): 0..255."""
    try:
        value = strtou64(text)
    except (ValueError, OverflowError):
        value = -1
    if not 0 <= value <= 255:
        raise UsageError(f"{text} is not a valid pattern byte (0..255)")
    return value


def wants_help(specs: Sequence[str]) -> bool:
    """Whether a ``-o`` list asks for the list of options (``help`` or ``?``)."""
    return any(key in ("help", "?") for spec in specs for key, _ in split_options(spec))


def print_json(obj: Any) -> None:
    """JSON as qemu-img prints it (four-space indent)."""
    print(json.dumps(obj, indent=4))

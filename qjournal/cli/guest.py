"""``qjournal read`` (qemu-io's read) and ``qjournal map`` (qemu-img map).

    qjournal read [-P PATTERN] [--output OUT] [-U] FILE OFFSET LENGTH
    qjournal map [--output=human|json] [--start-offset OFFSET] [--max-length LEN] [-U] FILE

``read`` prints qemu-io's summary line (``read N/N bytes at offset X``); with ``-P``
it first checks every byte against the pattern and, on a mismatch, exits 1 with one
line naming the first offset that differs; with ``--output`` it writes the bytes to
OUT (``-`` for standard output) instead of the summary. Sizes take qemu suffixes
(``64k``, ``1M``, ``0x1000``).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, BinaryIO

import numpy as np

from ..read import guest
from ..errors import UnsupportedError, UsageError
from ..core.image import Image

CHUNK = 16 << 20  # bytes read, checked or written at a time


def add_parsers(sub: Any) -> None:
    """Register ``read`` and ``map`` on the subparsers object of ``qjournal``."""
    r = sub.add_parser("read", help="read guest data (qemu-io read)")
    r.add_argument("-P", dest="pattern", help="check that every byte equals PATTERN (0..255)")
    r.add_argument("--output", metavar="OUT", help="write the bytes to OUT ('-': standard output)")
    r.add_argument("-U", "--force-share", action="store_true")
    r.add_argument("-f", dest="format")
    r.add_argument("filename")
    r.add_argument("offset")
    r.add_argument("length")
    r.set_defaults(func=cmd_read)

    m = sub.add_parser("map", help="how the guest disk maps to files (qemu-img map)")
    m.add_argument("--output", choices=("human", "json"), default="human")
    m.add_argument("--start-offset", dest="start_offset")
    m.add_argument("--max-length", dest="max_length")
    m.add_argument("-U", "--force-share", action="store_true")
    m.add_argument("-f", dest="format")
    m.add_argument("filename")
    m.set_defaults(func=cmd_map)


def _format(fmt: str | None) -> None:
    if fmt not in (None, "qcow2"):
        raise UsageError(f"format {fmt!r} is not supported: qjournal reads qcow2 images")


def _pattern(text: str) -> int:
    from ..ops.create import strtou64
    try:
        value = strtou64(text)
    except (ValueError, OverflowError):
        value = -1
    if not 0 <= value <= 255:
        raise UsageError(f"{text} is not a valid pattern byte")
    return value


def cmd_read(args: argparse.Namespace) -> int:
    from ..ops.create import parse_size
    _format(args.format)
    offset, length = parse_size(args.offset), parse_size(args.length)
    pattern = _pattern(args.pattern) if args.pattern is not None else None
    with contextlib.ExitStack() as stack:
        img = stack.enter_context(Image(args.filename, "r", take_locks=not args.force_share))
        size = img.header.size
        if offset + length > size:
            raise UsageError(f"read of {length} bytes at offset {offset} lies past the end of the "
                             f"{size}-byte disk")
        out: BinaryIO | None = None
        if args.output == "-":
            out = sys.stdout.buffer
        elif args.output is not None:
            out = stack.enter_context(open(args.output, "wb"))
        for pos in range(offset, offset + length, CHUNK):
            data = guest.read(img, pos, min(CHUNK, offset + length - pos))
            if pattern is not None:
                bad = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) != pattern)
                if len(bad):
                    at = pos + int(bad[0])
                    print(f"Pattern verification failed at offset {at}: byte {data[int(bad[0])]:#04x}, "
                          f"expected {pattern:#04x} (read of {length} bytes at offset {offset})", file=sys.stderr)
                    return 1
            if out is not None:
                out.write(data)
    if args.output is None:
        print(f"read {length}/{length} bytes at offset {offset}")
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    from ..ops.create import parse_size
    from ..read.mapping import entries, format_human, format_json
    _format(args.format)
    start = parse_size(args.start_offset) if args.start_offset is not None else 0
    length = parse_size(args.max_length) if args.max_length is not None else None
    with Image(args.filename, "r", take_locks=not args.force_share) as img:
        found = entries(img, start, length)
    if args.output == "json":
        sys.stdout.write(format_json(found))
        return 0
    try:
        for line in format_human(found):
            print(line)
    except ValueError as e:
        sys.stdout.flush()
        raise UnsupportedError(f"{e} (use --output=json)") from None
    return 0

"""``qjournal resize`` (qemu-img resize).

    qjournal resize [-f qcow2] [--preallocation=off] [-q] [--shrink] FILE [+|-]SIZE

SIZE takes qemu suffixes (``64k``, ``1.5G``, ``0x1000``); ``+SIZE`` and ``-SIZE`` are
relative to the current virtual size. As in qemu-img, ``-1G`` is a size, not an
option. Prints
``Image resized.`` unless ``-q``. Every refusal is one line and exit 1, and leaves the
image byte-identical.
"""
from __future__ import annotations

import argparse
from typing import Any

from ..errors import UnsupportedError, UsageError
from ..api import Image


def add_parsers(sub: Any) -> None:
    """Register ``resize`` on the subparsers object of ``qjournal``."""
    r = sub.add_parser("resize", help="change the virtual size (qemu-img resize)",
                       usage="qjournal resize [-f qcow2] [--preallocation=off] [-q] [--shrink] FILE [+|-]SIZE")
    r.add_argument("--shrink", action="store_true")
    r.add_argument("-q", dest="quiet", action="store_true")
    r.add_argument("-f", dest="format")
    r.add_argument("--preallocation")
    r.add_argument("filename")
    # The rest is read by hand: "-1G" must stay a size (qemu-img takes it out of argv too).
    r.add_argument("rest", nargs=argparse.REMAINDER)
    r.set_defaults(func=cmd_resize)


def _options(args: argparse.Namespace) -> tuple[str, bool, bool]:
    """(size, shrink, quiet), with options also accepted after FILE, as getopt does."""
    shrink, quiet, fmt, prealloc = args.shrink, args.quiet, args.format, args.preallocation
    positional: list[str] = []
    it = iter(args.rest)
    for w in it:
        if w == "--shrink":
            shrink = True
        elif w == "-q":
            quiet = True
        elif w == "-f":
            fmt = next(it, "")
        elif w.startswith("--preallocation"):
            prealloc = w.partition("=")[2] if "=" in w else next(it, "")
        elif w == "--":
            positional += list(it)
        else:
            positional.append(w)
    if fmt not in (None, "qcow2"):
        raise UsageError(f"format {fmt!r} is not supported: qjournal resizes qcow2 images")
    if prealloc not in (None, "off"):
        raise UnsupportedError(f"preallocation mode {prealloc!r} is not supported (only off)")
    if len(positional) != 1:
        raise UsageError("usage: qjournal resize [-f qcow2] [--preallocation=off] [-q] [--shrink] FILE [+|-]SIZE")
    return positional[0], shrink, quiet


def cmd_resize(args: argparse.Namespace) -> int:
    from ..ops.resize import resize, target_size
    size, shrink, quiet = _options(args)
    with Image(args.filename, "r+") as img:
        resize(img, target_size(img.header.size, size), shrink)
    if not quiet:
        print("Image resized.")
    return 0

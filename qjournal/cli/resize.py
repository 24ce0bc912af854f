"""``qjournal resize`` (qemu-img resize).

    qjournal resize [-f qcow2] [--preallocation=off|metadata|falloc|full] [-q] [--shrink] FILE [+|-]SIZE

SIZE takes qemu suffixes (``64k``, ``1.5G``, ``0x1000``); ``+SIZE`` and ``-SIZE`` are
relative to the current virtual size. As in qemu-img, ``-1G`` is a size, not an
option. Prints
``Image resized.`` unless ``-q``. Every refusal is one line and exit 1, and leaves the
image byte-identical.
"""
from __future__ import annotations

import argparse
from typing import Any

from ..api import Image
from ..errors import UsageError
from ..ops.resize import PREALLOCATION, resize, target_size
from .options import add_command, add_format, check_format, qcow2_path

USAGE = "qjournal resize [-f qcow2] [--preallocation=off|metadata|falloc|full] [-q] [--shrink] FILE [+|-]SIZE"


def add_parsers(sub: Any) -> None:
    """Register ``resize`` on the subparsers object of ``qjournal``."""
    r = add_command(sub, "resize", "change the virtual size (qemu-img resize)",
                    "Change the virtual size of the guest disk as qemu-img resize does: SIZE, or +SIZE/-SIZE "
                    "relative to the current size. Shrinking needs --shrink. The L1 table grows in one "
                    "journaled switch; --preallocation=metadata|falloc|full also allocates the grown area's "
                    "clusters (full writes zeros into them); a refusal leaves the image byte-identical.",
                    ["qjournal resize disk.qcow2 +10G", "qjournal resize --shrink disk.qcow2 -1G",
                     "qjournal resize --preallocation=metadata disk.qcow2 20G"], usage=USAGE)
    r.add_argument("--shrink", action="store_true", help="allow the disk to shrink (data past the end is lost)")
    r.add_argument("-q", dest="quiet", action="store_true", help="quiet: do not print 'Image resized.'")
    add_format(r)
    r.add_argument("--preallocation", help="preallocation of the grown area: off (default), metadata, falloc, full")
    r.add_argument("filename", metavar="FILE")
    # The rest is read by hand: "-1G" must stay a size (qemu-img takes it out of argv too).
    r.add_argument("rest", nargs=argparse.REMAINDER)
    r.set_defaults(func=cmd_resize)


def _options(args: argparse.Namespace) -> tuple[str, bool, bool, str]:
    """(size, shrink, quiet, preallocation), with options also accepted after FILE, as getopt does."""
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
    check_format(fmt)
    if prealloc is not None and prealloc not in PREALLOCATION:
        raise UsageError(f"Invalid preallocation mode {prealloc!r}")
    if len(positional) != 1:
        raise UsageError(f"usage: {USAGE}")
    return positional[0], shrink, quiet, prealloc or "off"


def cmd_resize(args: argparse.Namespace) -> int:
    size, shrink, quiet, prealloc = _options(args)
    with Image(qcow2_path(args.filename), "r+") as img:
        resize(img, target_size(img.header.size, size), shrink, prealloc)
    if not quiet:
        print("Image resized.")
    return 0

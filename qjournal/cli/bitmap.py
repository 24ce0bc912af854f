"""``qjournal bitmap``: persistent dirty bitmaps, qemu-img bitmap's options plus
``--dump`` and ``--repair``.

    qjournal bitmap [-f qcow2] (--add | --remove | --clear | --enable | --disable |
                    --merge SOURCE [-b SOURCE_FILE [-F qcow2]] | --repair)... [-g GRANULARITY] FILE BITMAP
    qjournal bitmap [-f qcow2] --dump [--output=human|json] [-U] FILE BITMAP

All actions of one call run in the order given, as one transaction.
"""
from __future__ import annotations

import argparse
from typing import Any

from ..api import Image
from ..errors import UsageError
from .options import (add_command, add_force_share, add_format, add_output, print_json, qcow2_path,
                      size)

ACTIONS = ("add", "remove", "clear", "enable", "disable", "dump", "repair")


class _Ordered(argparse.Action):
    """Collects bitmap actions in the order given on the command line."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        acts = list(getattr(ns, "actions", None) or [])
        acts.append((self.dest, values))
        ns.actions = acts


def add_parsers(sub: Any) -> None:
    """Register ``bitmap`` on the subparsers of ``qjournal``."""
    b = add_command(sub, "bitmap", "persistent dirty bitmaps (qemu-img bitmap)",
                    "Add, remove, clear, enable, disable, merge, repair or dump a persistent dirty bitmap. "
                    "The actions of one call run in the order given, as one journaled transaction: if one "
                    "is refused, the image is left byte-identical.",
                    ["qjournal bitmap --add -g 64K disk.qcow2 backup-0",
                     "qjournal bitmap --clear --enable disk.qcow2 frozen",
                     "qjournal bitmap --merge src -b other.qcow2 disk.qcow2 frozen",
                     "qjournal bitmap --dump --output=json disk.qcow2 backup-0"])
    for flag in ACTIONS:
        b.add_argument(f"--{flag}", dest=flag, nargs=0, action=_Ordered, help=f"{flag} the bitmap")
    b.add_argument("--merge", dest="merge", metavar="SOURCE", action=_Ordered,
                   help="merge bitmap SOURCE into the bitmap")
    b.add_argument("-b", dest="source_file", metavar="SOURCE_FILE", help="the image --merge reads SOURCE from")
    add_format(b, "-F", "source_fmt")
    b.add_argument("-g", dest="granularity", help="granularity of --add (default 64K)")
    add_format(b)
    add_force_share(b)
    add_output(b)
    b.add_argument("filename", metavar="FILE")
    b.add_argument("bitmap", metavar="BITMAP")
    b.set_defaults(func=cmd_bitmap, actions=None)


def cmd_bitmap(args: argparse.Namespace) -> int:
    actions = args.actions or []
    if not actions:
        raise UsageError("bitmap: give at least one of --add, --remove, --clear, --enable, --disable, "
                         "--merge, --dump, --repair")
    names = [a for a, _ in actions]
    path = qcow2_path(args.filename, args.format)
    if "dump" in names:
        if len(actions) > 1:
            raise UsageError("bitmap: --dump cannot be combined with other actions")
        return _dump(args, path)
    if args.granularity is not None and "add" not in names:
        raise UsageError("bitmap: -g (granularity) only applies to --add")
    if (args.source_file or args.source_fmt) and "merge" not in names:
        raise UsageError("bitmap: -b and -F (source file and format) only apply to --merge")
    source = qcow2_path(args.source_file, args.source_fmt, "-F") if args.source_file is not None else None
    gran = size(args.granularity) if args.granularity is not None else 65536
    with Image(path, "r+") as img:
        src_img = Image(source, "r") if source is not None else None
        try:
            # All actions of one call are one transaction: all or nothing.
            with img.transaction("bitmap " + " ".join(names)):
                for act, val in actions:
                    if act == "add":
                        img.bitmaps.add(args.bitmap, gran, disabled="disable" in names)
                    elif act == "disable" and "add" in names:
                        continue  # --add --disable creates the bitmap disabled
                    elif act == "merge":
                        img.bitmaps.merge(args.bitmap, val, src_img)
                    elif act == "repair":
                        if not img.bitmaps.repair(args.bitmap):
                            print(f"bitmap {args.bitmap!r} is not in use: nothing to repair")
                    else:
                        getattr(img.bitmaps, act)(args.bitmap)
        finally:
            if src_img is not None:
                src_img.close()
    return 0


def _dump(args: argparse.Namespace, path: str) -> int:
    with Image(path, "r", take_locks=not args.force_share) as img:
        try:
            b = img.bitmaps[args.bitmap]
        except KeyError:
            raise UsageError(f"bitmap {args.bitmap!r} not found in {path}") from None
        extents = list(b.dirty_extents())
        disk = img.header.size
    if args.output == "json":
        out, pos = [], 0
        for start, length in extents:
            if start > pos:
                out.append({"start": pos, "length": start - pos, "dirty": False})
            out.append({"start": start, "length": length, "dirty": True})
            pos = start + length
        if pos < disk:
            out.append({"start": pos, "length": disk - pos, "dirty": False})
        print_json(out)
    else:
        print(f"{'Offset':<20}{'Length':<20}")
        for start, length in extents:
            print(f"{start:<#20x}{length:<#20x}")
    return 0

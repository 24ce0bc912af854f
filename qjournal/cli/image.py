"""``qjournal create``, ``check`` and ``map``: whole images, as qemu-img's.

    qjournal create [-f qcow2] [-o OPTIONS] [-b BACKING -F FMT] [-q] FILE [SIZE]
    qjournal check [-f qcow2] [--output=human|json] [-r leaks|all] [-U] FILE
    qjournal map [-f qcow2] [--output=human|json] [--start-offset OFFSET] [--max-length LEN] [-U] FILE

``check`` exits as qemu-img check does: 0 clean, 2 corruptions, 3 leaks only, 1 the
check could not complete.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..api import Image
from ..errors import UnsupportedError, UsageError
from ..ops.check import check
from ..ops.create import create_image, option_help, option_lists
from ..read.mapping import entries, format_human, format_json
from .options import (add_command, add_force_share, add_format, add_output, check_format,
                      print_json, qcow2_path, size, wants_help)


def add_parsers(sub: Any) -> None:
    """Register ``create``, ``check`` and ``map`` on the subparsers of ``qjournal``."""
    c = add_command(sub, "create", "create a qcow2 image (qemu-img create)",
                    "Create a qcow2 image byte for byte as 'qemu-img create -f qcow2' does, replacing FILE "
                    "(and removing the journal of the image it replaces). SIZE may be left out with a "
                    "backing file: the new image takes its size. '-o help' lists the options.",
                    ["qjournal create disk.qcow2 16G",
                     "qjournal create -o cluster_size=4K,lazy_refcounts=on disk.qcow2 1T",
                     "qjournal create -b base.qcow2 -F qcow2 overlay.qcow2"])
    add_format(c)
    c.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="qcow2 options, key=value,... ('-o help' lists them)")
    c.add_argument("-b", dest="backing_file", metavar="BACKING", help="backing file (backing_file=)")
    c.add_argument("-F", dest="backing_fmt", metavar="FMT", help="backing file format (backing_fmt=)")
    c.add_argument("-q", action="store_true", help="quiet (qjournal create prints nothing anyway)")
    c.add_argument("filename", metavar="FILE", nargs="?")
    c.add_argument("size", metavar="SIZE", nargs="?")
    c.set_defaults(func=cmd_create)

    k = add_command(sub, "check", "check (and repair) an image (qemu-img check)",
                    "Check an image's refcounts, tables and bitmaps as qemu-img check does, with its "
                    "counters and exit codes (0 clean, 2 corruptions, 3 leaks only, 1 the check could "
                    "not complete). -r repairs in one journaled transaction.",
                    ["qjournal check disk.qcow2", "qjournal check -r all disk.qcow2",
                     "qjournal check --output=json disk.qcow2"])
    add_format(k)
    add_output(k)
    k.add_argument("-r", dest="repair", choices=("leaks", "all"), help="repair leaks, or everything")
    add_force_share(k)
    k.add_argument("filename", metavar="FILE")
    k.set_defaults(func=cmd_check)

    m = add_command(sub, "map", "how the guest disk maps to files (qemu-img map)",
                    "Print the allocation map of the guest disk, entry for entry as qemu-img map does.",
                    ["qjournal map disk.qcow2", "qjournal map --output=json --start-offset 1G --max-length 1M "
                     "disk.qcow2"])
    add_format(m)
    add_output(m)
    m.add_argument("--start-offset", dest="start_offset", metavar="OFFSET", help="first guest byte to map")
    m.add_argument("--max-length", dest="max_length", metavar="LEN", help="how many guest bytes to map")
    add_force_share(m)
    m.add_argument("filename", metavar="FILE")
    m.set_defaults(func=cmd_map)


def cmd_create(args: argparse.Namespace) -> int:
    check_format(args.format)
    if wants_help(args.options):
        print("\n".join(option_help()))
        return 0
    if args.filename is None:
        raise UsageError("create: no FILE given (see 'qjournal create --help')")
    if not args.filename:
        raise UsageError("create: the image name is empty")
    opts = option_lists(args.options, args.backing_file, args.backing_fmt)
    create_image(args.filename, size(args.size) if args.size is not None else None, opts)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    path = qcow2_path(args.filename, args.format)
    writable = args.repair is not None
    with Image(path, "r+" if writable else "r", salvage=True, take_locks=not args.force_share) as img:
        res = check(img, args.repair)
    if args.output == "json":
        print_json(res.to_json())
        return res.exit_code
    for m in res.messages:
        print(m, file=sys.stderr if m.startswith("ERROR") else sys.stdout)
    if res.leaks_fixed or res.corruptions_fixed:
        print(f"The following inconsistencies were found and repaired:\n\n"
              f"    {res.leaks_fixed} leaked clusters\n    {res.corruptions_fixed} corruptions\n")
        print("Double checking the fixed image now...")
        with Image(path, "r", salvage=True, take_locks=False) as img:
            res = check(img, None)
    if res.corruptions:
        print(f"\n{res.corruptions} errors were found on the image.\n"
              "Data may be corrupted, or further writes to the image may corrupt it.")
    if res.leaks:
        print(f"\n{res.leaks} leaked clusters were found on the image.\n"
              "This means waste of disk space, but no harm to data.")
    if not res.corruptions and not res.leaks:
        print("No errors were found on the image.")
    if res.total_clusters:
        t = res.total_clusters
        print(f"{res.allocated_clusters}/{t} = {100 * res.allocated_clusters / t:.2f}% allocated, "
              f"{100 * res.fragmented_clusters / max(1, res.allocated_clusters):.2f}% fragmented, "
              f"{100 * res.compressed_clusters / max(1, res.allocated_clusters):.2f}% compressed clusters")
    print(f"Image end offset: {res.image_end_offset}")
    return res.exit_code


def cmd_map(args: argparse.Namespace) -> int:
    path = qcow2_path(args.filename, args.format)
    start = size(args.start_offset) if args.start_offset is not None else 0
    length = size(args.max_length) if args.max_length is not None else None
    with Image(path, "r", take_locks=not args.force_share) as img:
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

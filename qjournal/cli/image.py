"""``qjournal create``, ``info``, ``check`` and ``map``: whole images, as qemu-img's.

    qjournal create [-f qcow2] [-o OPTIONS] [-b BACKING -F FMT] [-q] FILE [SIZE]
    qjournal info [-f qcow2] [--output=human|json] [-U] FILE
    qjournal check [-f qcow2] [--output=human|json] [-r leaks|all] [-U] FILE
    qjournal map [-f qcow2] [--output=human|json] [--start-offset OFFSET] [--max-length LEN] [-U] FILE

``check`` exits as qemu-img check does: 0 clean, 2 corruptions, 3 leaks only, 1 the
check could not complete.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any, Sequence

from ..api import Image
from ..errors import UnsupportedError, UsageError
from ..ops.check import check
from ..format.snapshots import Snapshot
from ..ops.create import create_image, option_help
from ..read.mapping import entries, format_human, format_json
from .options import (add_command, add_force_share, add_format, add_output, check_format, create_options,
                      print_json, qcow2_path, size, wants_help)


COMMANDS = ("create", "info", "check", "map")
"""The subcommands :func:`add_parsers` registers."""


def add_parsers(sub: Any) -> None:
    """Register ``create``, ``info``, ``check`` and ``map`` on the subparsers of ``qjournal``."""
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

    i = add_command(sub, "info", "show what an image holds (qemu-img info)",
                    "Show an image's header, format-specific data, snapshots and unknown header "
                    "extensions with qemu-img info's keys and values. A committed transaction not yet "
                    "applied is shown as it will be after recovery; nothing is written.",
                    ["qjournal info disk.qcow2", "qjournal info --output=json disk.qcow2"])
    add_format(i)
    add_output(i)
    add_force_share(i)
    i.add_argument("filename", metavar="FILE")
    i.set_defaults(func=cmd_info)

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


def human_size(n: int) -> str:
    """qemu's size_to_str(): three significant digits, switching unit at 1000 of the smaller one."""
    exp = math.frexp(n / (1000.0 / 1024.0))[1]
    i = max(0, (exp - 1) // 10)
    v = n / (1 << (i * 10))
    return f"{v:0.3g} {('', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei')[i]}B"


def _dump_qobject(obj: Any, indent: int) -> None:
    """qemu-img's dump_qobject(): the human form of format-specific data."""
    items = obj.items() if isinstance(obj, dict) else ((f"[{i}]", v) for i, v in enumerate(obj))
    for key, val in items:
        if isinstance(obj, dict):
            key = key.replace("-", " ")
        if isinstance(val, (dict, list)):
            print(f"{'':{indent * 4}}{key}:")
            _dump_qobject(val, indent + 1)
        else:
            print(f"{'':{indent * 4}}{key}: {str(val).lower() if isinstance(val, bool) else val}")


def cmd_create(args: argparse.Namespace) -> int:
    check_format(args.format)
    if wants_help(args.options):
        print("\n".join(option_help()))
        return 0
    if args.filename is None:
        raise UsageError("create: no FILE given (see 'qjournal create --help')")
    if not args.filename:
        raise UsageError("create: the image name is empty")
    opts = create_options(args.options, args.backing_file, args.backing_fmt)
    create_image(args.filename, size(args.size) if args.size is not None else None, opts)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with Image(qcow2_path(args.filename, args.format), "r", take_locks=not args.force_share) as img:
        info = img.info()
    if args.output == "json":
        print_json(info.to_json())
        return 0
    print(f"image: {info.filename}")
    print("file format: qcow2")
    print(f"virtual size: {human_size(info.virtual_size)} ({info.virtual_size} bytes)")
    print(f"disk size: {human_size(info.actual_size)}")
    if info.encrypted:
        print("encrypted: yes")
    print(f"cluster_size: {info.cluster_size}")
    if info.dirty_flag:
        print("cleanly shut down: no")
    if info.backing_filename is not None:
        actual = "" if info.full_backing_filename == info.backing_filename else \
            f" (actual path: {info.full_backing_filename})"
        print(f"backing file: {info.backing_filename}{actual}")
        if info.backing_format:
            print(f"backing file format: {info.backing_format}")
    if info.snapshots:
        print_snapshots(info.snapshots)
    print("Format specific information:")
    _dump_qobject(info.to_json()["format-specific"]["data"], 1)
    for t, n in info.unknown_extensions:
        print(f"unknown header extension: type {t:#010x}, {n} bytes (kept as is)")
    return 0


def print_snapshots(snapshots: Sequence[Snapshot]) -> None:
    """The snapshot list as qemu-img prints it (``info``, ``snapshot -l``)."""
    print("Snapshot list:")
    print(f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}")
    for s in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.date_sec))
        secs, ms = s.vm_clock_nsec // 1_000_000_000, s.vm_clock_nsec // 1_000_000 % 1000
        clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{ms:03d}"
        icount = "" if s.icount is None or s.icount == (1 << 64) - 1 else str(s.icount)
        print(f"{s.id:<9} {s.name:<16} {human_size(s.vm_state_size):>8}{date:>20}{clock:>13}{icount:>11}")


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

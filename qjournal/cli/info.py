"""``qjournal info``: what an image holds, as ``qemu-img info`` shows it.

    qjournal info [-f qcow2] [--output=human|json] [-U] FILE

A family of its own, so that the command loads no more than reading a header needs:
the core image (:mod:`qjournal.core.image`), not the façade with every operation
(:mod:`qjournal.api`). It only reads, so the façade's work at a writable open (the
rebuild of a dirty image's refcounts) never applies.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Any, Sequence

from ..core.image import Image
from ..format.snapshots import Snapshot
from .options import add_command, add_force_share, add_format, add_output, print_json, qcow2_path


def add_parsers(sub: Any) -> None:
    """Register ``info`` on the subparsers of ``qjournal``."""
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

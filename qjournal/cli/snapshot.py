"""``qjournal snapshot`` (qemu-img snapshot): internal snapshots.

    qjournal snapshot [-f qcow2] [-U] (-l | -c NAME | -a NAME | -d NAME) FILE

``-l`` lists the snapshots as qemu-img does; ``-c`` takes one; ``-a`` goes back to one
(by id or name); ``-d`` deletes one (by name). Each change is one journaled transaction; a refusal leaves the image
byte-identical.
"""
from __future__ import annotations

import argparse
from typing import Any

from ..api import Image
from ..ops import snapshot
from .info import print_snapshots
from .options import add_command, add_force_share, add_format, qcow2_path


def add_parsers(sub: Any) -> None:
    """Register ``snapshot`` on the subparsers object of ``qjournal``."""
    s = add_command(sub, "snapshot", "list, create or delete internal snapshots (qemu-img snapshot)",
                    "List (-l), create (-c NAME), apply (-a NAME) or delete (-d NAME) the internal snapshots "
                    "of FILE, as "
                    "qemu-img snapshot does. A new snapshot shares every cluster of the disk; later writes "
                    "copy on write. Each change is one journaled transaction.",
                    ["qjournal snapshot -c before-upgrade disk.qcow2", "qjournal snapshot -l disk.qcow2",
                     "qjournal snapshot -a before-upgrade disk.qcow2", "qjournal snapshot -d before-upgrade disk.qcow2"])
    act = s.add_mutually_exclusive_group(required=True)
    act.add_argument("-l", dest="list", action="store_true", help="list the snapshots")
    act.add_argument("-c", dest="create", metavar="NAME", help="create a snapshot called NAME")
    act.add_argument("-a", dest="apply", metavar="NAME", help="revert the disk to the snapshot NAME (id or name)")
    act.add_argument("-d", dest="delete", metavar="NAME", help="delete the snapshot called NAME")
    add_format(s)
    add_force_share(s)
    s.add_argument("filename", metavar="FILE")
    s.set_defaults(func=cmd_snapshot)


def cmd_snapshot(args: argparse.Namespace) -> int:
    path = qcow2_path(args.filename, args.format)
    if args.list:
        with Image(path, "r", take_locks=not args.force_share) as img:
            if img.snapshots:
                print_snapshots(img.snapshots)
        return 0
    with Image(path, "r+") as img:
        if args.create is not None:
            snapshot.create(img, args.create)
        elif args.apply is not None:
            snapshot.apply(img, args.apply)
        else:
            snapshot.delete(img, args.delete)
    return 0

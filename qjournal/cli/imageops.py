"""``qjournal compare``, ``measure``, ``commit``, ``rebase`` and ``amend`` (qemu-img's image operations).

    qjournal compare [-f FMT] [-F FMT] [-s] [-U] [-q] A B
    qjournal measure [--output=human|json] [-O raw|qcow2] [-o OPTIONS] (--size N | [-f FMT] [-U] FILE)
    qjournal commit [-f qcow2] [-b BASE] [-d] [-p] [-q] FILE
    qjournal rebase [-f qcow2] [-u] -b BACKING [-F FMT] [-p] [-q] FILE
    qjournal amend [-f qcow2] -o OPTIONS FILE

``compare`` exits as qemu-img compare does: 0 identical, 1 different, 2 an error.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..api import Image
from ..errors import QcowError
from ..ops import amend as amend_op
from ..ops import commit as commit_op
from ..ops import compare as compare_op
from ..ops import measure as measure_op
from ..ops import rebase as rebase_op
from ..progress import Progress
from .options import add_command, add_force_share, add_format, add_output, print_json, qcow2_path, size


def add_parsers(sub: Any) -> None:
    """Register ``compare``, ``measure``, ``commit`` and ``rebase`` on the subparsers of ``qjournal``."""
    c = add_command(sub, "compare", "compare the guest contents of two images (qemu-img compare)",
                    "Compare what a guest sees in A and B (qcow2, with their backing chains, or raw), as "
                    "qemu-img compare does. Exit 0 when identical, 1 when they differ (the first differing "
                    "sector is printed), 2 on an error. Images of different sizes are identical when the "
                    "longer one's tail reads as zeros, unless -s.",
                    ["qjournal compare disk.qcow2 disk.raw", "qjournal compare -s a.qcow2 b.qcow2"])
    c.add_argument("-f", dest="fmt_a", metavar="FMT", help="format of A: qcow2 or raw (default: probed)")
    c.add_argument("-F", dest="fmt_b", metavar="FMT", help="format of B: qcow2 or raw (default: probed)")
    c.add_argument("-s", dest="strict", action="store_true",
                   help="strict: different sizes or allocation states are a mismatch")
    c.add_argument("-q", dest="quiet", action="store_true", help="quiet: print nothing")
    c.add_argument("-p", dest="progress", action="store_true", help="show progress")
    add_force_share(c)
    c.add_argument("a", metavar="A")
    c.add_argument("b", metavar="B")
    c.set_defaults(func=cmd_compare)

    m = add_command(sub, "measure", "the size a new image would need (qemu-img measure)",
                    "Print the file size a new image of format -O (raw by default, as qemu-img) with the "
                    "-o options would need: for a disk of --size N, or to hold the data of FILE. For a "
                    "qcow2 source and a v3 output, also the size its persistent bitmaps need.",
                    ["qjournal measure -O qcow2 --size 1T", "qjournal measure --output=json -O qcow2 disk.qcow2",
                     "qjournal measure -O qcow2 -o cluster_size=4k,refcount_bits=64 disk.raw"])
    add_output(m)
    m.add_argument("-O", dest="out_fmt", default="raw", metavar="FMT", help="output format: raw or qcow2")
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="options of the output format (those of qjournal create, and preallocation)")
    m.add_argument("--size", type=size, metavar="N", help="the virtual size of the new image")
    m.add_argument("-f", dest="fmt", metavar="FMT", help="format of FILE: qcow2 or raw (default: probed)")
    add_force_share(m)
    m.add_argument("filename", metavar="FILE", nargs="?")
    m.set_defaults(func=cmd_measure)

    k = add_command(sub, "commit", "write an overlay's data into its backing file (qemu-img commit)",
                    "Write every range FILE holds (or, with -b, every image above BASE holds) down into "
                    "the backing file, through the base's own journaled transactions (its enabled bitmaps "
                    "record the ranges). Then FILE is emptied, as qemu-img does, unless -d (implied by -b).",
                    ["qjournal commit overlay.qcow2", "qjournal commit -b base.qcow2 top.qcow2"])
    add_format(k)
    k.add_argument("-b", dest="base", metavar="BASE", help="the image of the chain to commit into (implies -d)")
    k.add_argument("-d", dest="drop", action="store_true", help="do not empty FILE afterwards")
    k.add_argument("-p", dest="progress", action="store_true", help="show progress")
    k.add_argument("-q", dest="quiet", action="store_true", help="quiet: do not print 'Image committed.'")
    k.add_argument("filename", metavar="FILE")
    k.set_defaults(func=cmd_commit)

    r = add_command(sub, "rebase", "change the backing file (qemu-img rebase)",
                    "Make BACKING the backing file of FILE. Safe mode (the default) first copies into FILE "
                    "every cluster where the old and the new backing chains differ and FILE has no data of "
                    "its own, so that the guest sees the same disk; -u only changes the header. The header "
                    "switch is one journaled transaction. -b \"\" removes the backing file.",
                    ["qjournal rebase -b new-base.qcow2 -F qcow2 overlay.qcow2",
                     "qjournal rebase -u -b moved/base.qcow2 -F qcow2 overlay.qcow2"])
    add_format(r)
    r.add_argument("-b", dest="backing", metavar="BACKING", required=True, help="the new backing file")
    r.add_argument("-F", dest="backing_fmt", metavar="FMT", help="format of the new backing file")
    r.add_argument("-u", dest="unsafe", action="store_true", help="unsafe: change only the header")
    r.add_argument("-p", dest="progress", action="store_true", help="show progress")
    r.add_argument("-q", dest="quiet", action="store_true", help="accepted for qemu-img compatibility")
    r.add_argument("filename", metavar="FILE")
    r.set_defaults(func=cmd_rebase)

    a = add_command(sub, "amend", "change creation options of an image in place (qemu-img amend)",
                    "Change options of FILE as qemu-img amend does, each change one journaled transaction: "
                    "lazy_refcounts=on|off; refcount_bits=1..64 (a new refcount structure switched in by one "
                    "header write); compat=1.1 (upgrade) and compat=0.10 (downgrade, refused with the reason "
                    "when version 2 cannot express the image: extended L2, persistent bitmaps, a data file, "
                    "zstd; zero clusters are expanded as qemu-img expands them).",
                    ["qjournal amend -o lazy_refcounts=on disk.qcow2",
                     "qjournal amend -o refcount_bits=64 disk.qcow2",
                     "qjournal amend -o compat=1.1 old.qcow2"])
    add_format(a)
    a.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="options to change (lazy_refcounts, compat, refcount_bits)")
    a.add_argument("-q", dest="quiet", action="store_true", help="accepted for qemu-img compatibility")
    a.add_argument("filename", metavar="FILE")
    a.set_defaults(func=cmd_amend)


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        a = compare_op.Side.open(args.a, args.fmt_a, args.force_share)
        try:
            b = compare_op.Side.open(args.b, args.fmt_b, args.force_share)
            try:
                with Progress(max(a.size, b.size), "compare", "B", show=args.progress) as bar:
                    last = [0]

                    def step(done: int) -> None:
                        bar.update(max(0, done - last[0]))
                        last[0] = max(last[0], done)
                    result = compare_op.compare(a, b, args.strict, step)
            finally:
                b.close()
        finally:
            a.close()
    except (QcowError, OSError) as e:
        # qemu-img compare exits 2 on any error, not 1.
        what = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        name = f"{os.fsdecode(e.filename)!r}: " if isinstance(e, OSError) and e.filename is not None else ""
        print(f"qjournal: {name}{what}", file=sys.stderr)
        return 2
    if not args.quiet:
        for line in result.lines:
            print(line)
    return result.code


def cmd_measure(args: argparse.Namespace) -> int:
    m = measure_op.measure(args.out_fmt, ",".join(o for o in args.options if o), args.size, args.filename,
                           args.fmt, args.force_share)
    if args.output == "json":
        print_json(m.to_json())
    else:
        for line in m.human():
            print(line)
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    path = qcow2_path(args.filename, args.format)
    drop = args.drop or args.base is not None
    with Image(path, "r" if drop else "r+") as top:
        base_path, base_fmt = commit_op.find_base(top, args.base)
        with Progress(0, "commit", "B", show=args.progress) as bar:
            last = [0]

            def step(done: int, total: int) -> None:
                if not last[0]:
                    bar.add(total)
                bar.update(done - last[0])
                last[0] = done
            if base_fmt == "qcow2":
                with Image(base_path, "r+") as base:
                    commit_op.commit(top, commit_op.Target(image=base), base_path, drop, step, base.resize)
            else:
                target = commit_op.Target(raw_path=base_path)
                try:
                    commit_op.commit(top, target, base_path, drop, step)
                finally:
                    target.close()
    if not args.quiet:
        print("Image committed.")
    return 0


def cmd_rebase(args: argparse.Namespace) -> int:
    path = qcow2_path(args.filename, args.format)
    with Image(path, "r+") as img:
        with Progress(0, "rebase", "B", show=args.progress) as bar:
            last = [0]

            def step(done: int, total: int) -> None:
                if not last[0]:
                    bar.add(total)
                bar.update(done - last[0])
                last[0] = done
            rebase_op.rebase(img, args.backing, args.backing_fmt, args.unsafe, step)
    return 0


def cmd_amend(args: argparse.Namespace) -> int:
    path = qcow2_path(args.filename, args.format)
    with Image(path, "r+") as img:
        amend_op.amend(img, ",".join(o for o in args.options if o))
    return 0

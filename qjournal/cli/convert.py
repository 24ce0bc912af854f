"""``qjournal convert`` (qemu-img convert): copy a disk into a new raw or qcow2 image.

    qjournal convert [-p] [-q] [-c] [-f FMT] [-O raw|qcow2] [-o OPTIONS] [-B BACKING [-F FMT]] [-n]
                     [-S SPARSE_SIZE] [--bitmaps] [-m N] SRC DST

The options mean what qemu-img's mean; see :mod:`qjournal.ops.convert` for what is
copied, how it stays sparse, and why a crash never leaves a half-made DST.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import UsageError
from ..format.header import MAGIC
from ..ops.convert import ConvertOptions, convert
from .options import add_command, size, wants_help
from ..ops.create import option_help, option_lists


def add_parsers(sub: Any) -> None:
    """Register ``convert`` on the subparsers of ``qjournal``."""
    c = add_command(sub, "convert", "copy a disk into a new raw or qcow2 image (qemu-img convert)",
                    "Copy the guest disk of SRC (raw, or qcow2 with its backing chain flattened) into DST, "
                    "as qemu-img convert does. Zeros stay sparse (-S), -c compresses on every core, "
                    "--bitmaps copies the persistent bitmaps, -B writes only what differs from a backing "
                    "file. DST is built under a temporary name and renamed into place, so a crash never "
                    "leaves a half-made DST; -n writes into an existing DST instead.",
                    ["qjournal convert -O raw disk.qcow2 disk.raw",
                     "qjournal convert -p -c -o compression_type=zstd disk.raw disk.qcow2",
                     "qjournal convert --bitmaps -o cluster_size=1M old.qcow2 new.qcow2",
                     "qjournal convert -B base.qcow2 -F qcow2 disk.qcow2 overlay.qcow2"])
    c.add_argument("-p", dest="progress", action="store_true", help="show a progress bar (on a terminal)")
    c.add_argument("-q", dest="quiet", action="store_true", help="quiet (no progress bar)")
    c.add_argument("-c", dest="compress", action="store_true", help="compress the clusters of a qcow2 target")
    c.add_argument("-f", dest="format", metavar="FMT", help="source format: raw or qcow2 (default: detected)")
    c.add_argument("-O", dest="out_format", metavar="FMT", default="raw",
                   help="target format: raw (the default, as qemu-img) or qcow2")
    c.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="qcow2 create options, key=value,... ('-o help' lists them)")
    c.add_argument("-B", dest="backing_file", metavar="BACKING",
                   help="the target's backing file: write only what differs from it")
    c.add_argument("-F", dest="backing_fmt", metavar="FMT", help="the backing file's format (default: detected)")
    c.add_argument("-n", dest="no_create", action="store_true", help="write into an existing target")
    c.add_argument("-S", dest="sparse_size", metavar="SPARSE_SIZE", default="4k",
                   help="runs of zeros of this size become holes (default 4k; 0: allocate everything)")
    c.add_argument("--bitmaps", action="store_true", help="copy the persistent bitmaps (qcow2 to qcow2)")
    c.add_argument("-m", dest="workers", metavar="N", type=int, help="compression threads (default: every core)")
    c.add_argument("source", metavar="SRC", nargs="?")
    c.add_argument("target", metavar="DST", nargs="?")
    c.set_defaults(func=cmd_convert)


def _detected_format(target: str, backing: str) -> str:
    full = backing if os.path.isabs(backing) else os.path.join(os.path.dirname(os.path.abspath(target)), backing)
    try:
        with open(full, "rb") as f:
            return "qcow2" if f.read(len(MAGIC)) == MAGIC else "raw"
    except OSError as e:
        raise UsageError(f"could not open backing file {full!r}: {e.strerror}") from None


def cmd_convert(args: argparse.Namespace) -> int:
    if wants_help(args.options):
        print("\n".join(option_help()))
        return 0
    if args.source is None or args.target is None:
        raise UsageError("convert: SRC and DST are needed (see 'qjournal convert --help')")
    if not args.source:
        raise UsageError("convert: the source name is empty")
    if args.workers is not None and not 1 <= args.workers <= 16:
        raise UsageError(f"convert -m {args.workers}: must be between 1 and 16")
    if args.out_format not in ("raw", "qcow2"):
        raise UsageError(f"convert -O {args.out_format!r}: unknown or unsupported format: expected raw or qcow2")
    if args.out_format == "raw" and (args.options or args.backing_file):
        raise UsageError("convert: -o and -B need -O qcow2")
    fmt = args.backing_fmt
    if args.backing_file is not None and fmt is None and args.target:
        fmt = _detected_format(args.target, args.backing_file)
    opts = option_lists(args.options, args.backing_file, fmt)
    os.stat(args.source)   # a missing source: "could not open 'SRC': No such file or directory"
    convert(args.source, args.target, ConvertOptions(
        out_format=args.out_format, src_format=args.format, create=opts, compress=args.compress,
        no_create=args.no_create, sparse_size=size(args.sparse_size), bitmaps=args.bitmaps,
        workers=args.workers, progress=args.progress and not args.quiet))
    return 0

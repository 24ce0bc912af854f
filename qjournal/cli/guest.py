"""``qjournal read``, ``write``, ``zero`` and ``discard``: guest data, qemu-io style.

    qjournal read [-f qcow2] [-P PATTERN] [--output-file OUT] [-U] FILE OFFSET LENGTH
    qjournal write [-f qcow2] FILE OFFSET (-P PATTERN LENGTH | --input IN)
    qjournal zero|discard [-f qcow2] FILE OFFSET LENGTH

``read`` prints qemu-io's summary line (``read N/N bytes at offset X``); with ``-P``
it first checks every byte against the pattern and, on a mismatch, exits 1 with one
line naming the first offset that differs; with ``--output-file`` it writes the bytes
to OUT (``-`` for standard output) instead of the summary. ``--output`` is not the file
option: everywhere else it names a format (``--output=json``), so ``read`` refuses it.

``write --input IN`` never writes part of an input that is too long: the input's length
is known before anything is written. A file or block device is measured; anything else
(standard input with ``-``, a pipe, a FIFO, a character device) is first copied to a
temporary file, 1 MiB at a time, and refused as soon as it runs past the end of the disk.

A refused request (past the end of the disk, say) leaves the file as it found it, even
an image that lazy refcounts left dirty: the rebuild of its refcounts, which QEMU runs at
every writable open, waits here for the first write (fuzz seed 20261207, case 7487).

Sizes and offsets take qemu suffixes (``64k``, ``1M``, ``0x1000``).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
from typing import Any, BinaryIO

from ..format.lazy import np, tempfile
from ..api import Image
from ..errors import UsageError
from ..read import guest
from ..read.copy import copy_out
from ..write.data import in_place_transaction
from .options import add_command, add_force_share, add_format, pattern_byte, qcow2_path, size

CHUNK = 16 << 20   # bytes read, checked or written at a time
SPOOL = 1 << 20    # bytes of an input of unknown length held in memory at a time


def add_parsers(sub: Any) -> None:
    """Register ``read``, ``write``, ``zero`` and ``discard`` on the subparsers of ``qjournal``."""
    r = add_command(sub, "read", "read guest data (qemu-io read)",
                    "Read LENGTH bytes of the guest disk at OFFSET, as qemu-io's read does: print its "
                    "summary line, check every byte against -P, or write the bytes to --output-file.",
                    ["qjournal read disk.qcow2 1M 128k -P 0xab",
                     "qjournal read --output-file disk.raw disk.qcow2 0 1G",
                     "qjournal read --output-file - disk.qcow2 0 512 | hexdump -C"])
    add_format(r)
    r.add_argument("-P", dest="pattern", help="check that every byte equals PATTERN (0..255)")
    r.add_argument("--output-file", dest="output_file", metavar="OUT",
                   help="write the bytes to OUT ('-': standard output) instead of the summary line")
    r.add_argument("--output", dest="old_output", metavar="FMT", help=argparse.SUPPRESS)
    add_force_share(r)
    r.add_argument("filename", metavar="FILE")
    r.add_argument("offset", metavar="OFFSET")
    r.add_argument("length", metavar="LENGTH")
    r.set_defaults(func=cmd_read)

    w = add_command(sub, "write", "write guest data (qemu-io write)",
                    "Write LENGTH bytes of PATTERN, or the whole of IN, to the guest disk at OFFSET. "
                    "IN may be '-' (standard input). An input that runs past the end of the disk is "
                    "refused before anything is written.",
                    ["qjournal write disk.qcow2 1M -P 0xab 128k",
                     "qjournal write disk.qcow2 5000 --input blob.bin",
                     "gzip -dc disk.raw.gz | qjournal write disk.qcow2 0 --input -"])
    add_format(w)
    w.add_argument("-P", dest="pattern", nargs=2, metavar=("PATTERN", "LENGTH"),
                   help="write LENGTH bytes of PATTERN (0..255)")
    w.add_argument("--input", metavar="IN", help="write the bytes of IN ('-': standard input)")
    w.add_argument("filename", metavar="FILE")
    w.add_argument("offset", metavar="OFFSET")
    w.set_defaults(func=cmd_write)

    for name, what, example in (
            ("zero", "make a range read as zeros (whole clusters become zero clusters)",
             "qjournal zero disk.qcow2 1M 64k"),
            ("discard", "discard a range: it reads as zeros afterwards, whole clusters are freed",
             "qjournal discard disk.qcow2 0 1G")):
        z = add_command(sub, name, what, f"{what[0].upper()}{what[1:]}, in one journaled transaction "
                        "(qemu-io's write -z and discard).", [example])
        add_format(z)
        z.add_argument("filename", metavar="FILE")
        z.add_argument("offset", metavar="OFFSET")
        z.add_argument("length", metavar="LENGTH")
        z.set_defaults(func=cmd_zero)


def cmd_read(args: argparse.Namespace) -> int:
    if args.old_output is not None:
        raise UsageError(f"read: --output {args.old_output}: --output names an output format elsewhere "
                         "(--output=json); write the bytes to a file with --output-file FILE")
    path = qcow2_path(args.filename, args.format)
    offset, length = size(args.offset), size(args.length)
    pattern = pattern_byte(args.pattern) if args.pattern is not None else None
    with contextlib.ExitStack() as stack:
        img = stack.enter_context(Image(path, "r", take_locks=not args.force_share))
        disk = img.header.size
        if offset + length > disk:
            raise UsageError(f"read of {length} bytes at offset {offset} lies past the end of the "
                             f"{disk}-byte disk")
        out: BinaryIO | None = None
        if args.output_file == "-":
            out = sys.stdout.buffer
        elif args.output_file is not None:
            out = stack.enter_context(open(args.output_file, "wb"))
            if pattern is None and stat.S_ISREG(os.fstat(out.fileno()).st_mode):
                # A regular file: data by copy_file_range, zeros as holes (qemu-img convert's output).
                copy_out(img, offset, length, out.fileno())
                return 0
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
    if args.output_file is None:
        print(f"read {length}/{length} bytes at offset {offset}")
    return 0


def _known_length(f: BinaryIO) -> int | None:
    """The bytes left in ``f`` from its position, if it is a file or a block device."""
    try:
        fd = f.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation: a stream without a file behind it
        return None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        return None
    start = os.lseek(fd, 0, os.SEEK_CUR)
    end = os.lseek(fd, 0, os.SEEK_END)
    os.lseek(fd, start, os.SEEK_SET)
    return end - start


def _spool(f: BinaryIO, room: int, name: str) -> BinaryIO:
    """The bytes of ``f`` copied to an unnamed temporary file, SPOOL bytes at a time,
    refused as soon as more than ``room`` arrive: so nothing is written for an input
    of unknown length that does not fit."""
    spool = tempfile.TemporaryFile()
    try:
        length = 0
        while chunk := f.read(SPOOL):
            length += len(chunk)
            if length > room:
                raise UsageError(f"write: --input {name} holds more than the {room} bytes left on the disk "
                                 "after the offset; nothing was written")
            spool.write(chunk)
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool


def cmd_write(args: argparse.Namespace) -> int:
    path = qcow2_path(args.filename, args.format)
    offset = size(args.offset)
    if (args.input is None) == (args.pattern is None):
        raise UsageError("write: give either -P PATTERN LENGTH or --input IN")
    if args.input is not None:
        if not args.input:
            raise UsageError("write: the --input name is empty (use - for standard input)")
        # Streamed through the guest disk: batched commits (every 256 MiB, and at the
        # end), and memory bounded however large the input is.
        total = 0
        with contextlib.ExitStack() as stack:
            f = sys.stdin.buffer if args.input == "-" else stack.enter_context(open(args.input, "rb"))
            img = stack.enter_context(Image(path, "r+", defer_repair=True))
            disk_size = img.header.size
            src = f
            length = _known_length(f)
            if length is None:
                name = "- (standard input)" if args.input == "-" else repr(args.input)
                src = stack.enter_context(_spool(f, max(0, disk_size - offset), name))
                length = os.fstat(src.fileno()).st_size
            if offset + length > disk_size:
                raise UsageError(f"write: {length} bytes at offset {offset} run past the end of the "
                                 f"{disk_size}-byte disk")
            with img.disk() as disk:
                disk.seek(offset)
                while chunk := src.read(CHUNK):
                    total += disk.write(chunk)
        print(f"wrote {total}/{total} bytes at offset {offset}")
        return 0
    text, count = args.pattern
    pattern, length = pattern_byte(text), size(count)
    # One transaction, as one write has (a request refused part-way maps nothing, and
    # new clusters past the old end are given back), written CHUNK bytes at a time
    # from one CHUNK of the pattern: new data goes straight to its clusters, so memory
    # stays bounded (only in-place data that waits for enabled bitmaps' bits is held).
    with Image(path, "r+", defer_repair=True) as img:
        if offset + length > img.header.size:
            raise UsageError(f"write: {length} bytes at offset {offset} run past the end of the "
                             f"{img.header.size}-byte disk")
        chunk = memoryview(bytes([pattern]) * min(length, CHUNK))
        with in_place_transaction(img, "guest write"):
            for pos in range(0, length, CHUNK):
                img.write(offset + pos, chunk[:min(CHUNK, length - pos)])
    print(f"wrote {length}/{length} bytes at offset {offset}")
    return 0


def cmd_zero(args: argparse.Namespace) -> int:
    path = qcow2_path(args.filename, args.format)
    offset, length = size(args.offset), size(args.length)
    with Image(path, "r+", defer_repair=True) as img:
        img.write_zeroes(offset, length)
    print(f"wrote {length}/{length} bytes at offset {offset}")
    return 0

"""The ``qjournal`` command, modelled on qemu-img.

Every error is one line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import stat
import json
import sys
from typing import Any, Sequence

from .. import Image
from ..errors import QcowError, UsageError


def _human_size(n: int) -> str:
    """qemu's size_to_str(): three significant digits, switching unit at 1000 of the smaller one."""
    import math
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


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=4))


# -- info ----------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    with Image(args.filename, "r", take_locks=not args.force_share) as img:
        info = img.info()
    if args.output == "json":
        _print_json(info.to_json())
        return 0
    print(f"image: {info.filename}")
    print("file format: qcow2")
    print(f"virtual size: {_human_size(info.virtual_size)} ({info.virtual_size} bytes)")
    print(f"disk size: {_human_size(info.actual_size)}")
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
        import time
        print("Snapshot list:")
        print(f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}")
        for s in info.snapshots:
            date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.date_sec))
            secs, ms = s.vm_clock_nsec // 1_000_000_000, s.vm_clock_nsec // 1_000_000 % 1000
            clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{ms:03d}"
            icount = "" if s.icount is None or s.icount == (1 << 64) - 1 else str(s.icount)
            print(f"{s.id:<9} {s.name:<16} {_human_size(s.vm_state_size):>8}{date:>20}{clock:>13}{icount:>11}")
    print("Format specific information:")
    _dump_qobject(info.to_json()["format-specific"]["data"], 1)
    for t, n in info.unknown_extensions:
        print(f"unknown header extension: type {t:#010x}, {n} bytes (kept as is)")
    return 0


# -- create --------------------------------------------------------------------
def cmd_create(args: argparse.Namespace) -> int:
    from ..ops.create import create_image, parse_options, parse_size
    spec = ",".join(args.options or [])
    extra = []
    if args.backing_file:
        extra.append(f"backing_file={args.backing_file}")
    if args.backing_fmt:
        extra.append(f"backing_fmt={args.backing_fmt}")
    spec = ",".join([s for s in [spec] + extra if s])
    if args.format not in (None, "qcow2"):
        raise UsageError(f"format {args.format!r} is not supported: qjournal creates qcow2 images")
    opts = parse_options(spec)
    size = parse_size(args.size) if args.size is not None else None
    create_image(args.filename, size, opts)
    return 0


# -- check ---------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    from ..ops.check import check
    writable = args.repair is not None
    with Image(args.filename, "r+" if writable else "r", salvage=True, take_locks=not args.force_share) as img:
        res = check(img, args.repair)
    if args.output == "json":
        _print_json(res.to_json())
        return res.exit_code
    for m in res.messages:
        print(m, file=sys.stderr if m.startswith("ERROR") else sys.stdout)
    if res.leaks_fixed or res.corruptions_fixed:
        print(f"The following inconsistencies were found and repaired:\n\n"
              f"    {res.leaks_fixed} leaked clusters\n    {res.corruptions_fixed} corruptions\n")
        print("Double checking the fixed image now...")
        with Image(args.filename, "r", salvage=True, take_locks=False) as img:
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


# -- bitmap --------------------------------------------------------------------
class _Ordered(argparse.Action):
    """Collects bitmap actions in the order given on the command line."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        acts = list(getattr(ns, "actions", None) or [])
        acts.append((self.dest, values))
        ns.actions = acts


def cmd_bitmap(args: argparse.Namespace) -> int:
    from ..ops.create import parse_size
    actions = args.actions or []
    if not actions:
        raise UsageError("bitmap: give at least one of --add, --remove, --clear, --enable, --disable, "
                         "--merge, --dump, --repair")
    names = [a for a, _ in actions]
    if "dump" in names:
        if len(actions) > 1:
            raise UsageError("bitmap: --dump cannot be combined with other actions")
        return _dump(args)
    if args.granularity is not None and "add" not in names:
        raise UsageError("bitmap: -g (granularity) only applies to --add")
    if args.source_file and "merge" not in names:
        raise UsageError("bitmap: -b (source file) only applies to --merge")
    gran = parse_size(args.granularity) if args.granularity is not None else 65536
    with Image(args.filename, "r+") as img:
        src_img = Image(args.source_file, "r") if args.source_file else None
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


def _dump(args: argparse.Namespace) -> int:
    with Image(args.filename, "r", take_locks=not args.force_share) as img:
        try:
            b = img.bitmaps[args.bitmap]
        except KeyError:
            raise UsageError(f"bitmap {args.bitmap!r} not found in {args.filename}") from None
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
        _print_json(out)
    else:
        print(f"{'Offset':<20}{'Length':<20}")
        for start, length in extents:
            print(f"{start:<#20x}{length:<#20x}")
    return 0


# -- guest writes ----------------------------------------------------------------
def _int(text: str) -> int:
    from ..ops.create import parse_size
    return parse_size(text)


def cmd_write(args: argparse.Namespace) -> int:
    offset = _int(args.offset)
    if (args.input is None) == (args.pattern is None):
        raise UsageError("write: give either -P PATTERN LENGTH or --input FILE")
    if args.input is not None:
        # Streamed through the guest disk: batched commits (every 256 MiB, and at the
        # end), and memory bounded however large the input is.
        total = 0
        with open(args.input, "rb") as f, Image(args.filename, "r+") as img:
            mode = os.fstat(f.fileno()).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise UsageError(f"write: --input {args.input} is not a file or a block device (its length "
                                 "must be known before anything is written)")
            size = os.lseek(f.fileno(), 0, os.SEEK_END)
            os.lseek(f.fileno(), 0, os.SEEK_SET)
            if offset + size > img.header.size:
                raise UsageError(f"write: {size} bytes at offset {offset} run past the end of the "
                                 f"{img.header.size}-byte disk")
            with img.disk() as disk:
                disk.seek(offset)
                while chunk := f.read(16 << 20):
                    total += disk.write(chunk)
        print(f"wrote {total}/{total} bytes at offset {offset}")
        return 0
    text, length = args.pattern
    try:
        pattern = int(text, 0)
    except ValueError:
        pattern = -1
    if not 0 <= pattern <= 255:
        raise UsageError(f"write: pattern {text!r} is not a byte value (0..255)")
    data = bytes([pattern]) * _int(length)
    with Image(args.filename, "r+") as img:
        img.write(offset, data)
    print(f"wrote {len(data)}/{len(data)} bytes at offset {offset}")
    return 0


def cmd_zero(args: argparse.Namespace) -> int:
    offset, length = _int(args.offset), _int(args.length)
    with Image(args.filename, "r+") as img:
        img.write_zeroes(offset, length)
    print(f"wrote {length}/{length} bytes at offset {offset}")
    return 0


# -- journal -------------------------------------------------------------------
def cmd_recover(args: argparse.Namespace) -> int:
    from ..journal import Journal
    from ..storage.medium import MmapMedium
    from ..storage import lock
    m = MmapMedium(args.filename, True)
    try:
        lock.acquire(m.fd, args.filename, True)
        j = Journal.open_for(args.filename, m, True)
        try:
            n = j.recover()
        finally:
            j.close()
    finally:
        m.close()
    print(f"{args.filename}: {n} transaction(s) replayed" if n else f"{args.filename}: nothing to recover")
    return 0


def cmd_journal(args: argparse.Namespace) -> int:
    from ..journal import Journal
    from ..storage.medium import MmapMedium
    m = MmapMedium(args.filename, False)
    try:
        j = Journal.open_for(args.filename, m, False)
        desc = j.describe()
        j.close()
    finally:
        m.close()
    if args.output == "json":
        _print_json(desc)
        return 0
    txs = desc.get("transactions", []) if isinstance(desc, dict) else desc
    if not txs:
        print(f"{args.filename}: the journal holds no transaction")
    for tx in txs:
        print(f"transaction {tx.get('txid')}: {tx.get('description', '')} [{tx.get('state')}]")
        for step in tx.get("steps", []):
            writes = ", ".join(f"{o:#x}+{n}" for o, n in step.get("writes", []))
            print(f"    step {step.get('name')}: {writes}")
    return 0


# -- the parser ----------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qjournal", description="qcow2 editor with a write-ahead journal")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("create", help="create a qcow2 image (qemu-img create)")
    c.add_argument("-f", dest="format")
    c.add_argument("-o", dest="options", action="append")
    c.add_argument("-b", dest="backing_file")
    c.add_argument("-F", dest="backing_fmt")
    c.add_argument("-q", action="store_true")
    c.add_argument("filename")
    c.add_argument("size", nargs="?")
    c.set_defaults(func=cmd_create)

    i = sub.add_parser("info", help="show what an image holds (qemu-img info)")
    i.add_argument("--output", choices=("human", "json"), default="human")
    i.add_argument("-f", dest="format")
    i.add_argument("-U", "--force-share", action="store_true")
    i.add_argument("filename")
    i.set_defaults(func=cmd_info)

    k = sub.add_parser("check", help="check (and repair) an image (qemu-img check)")
    k.add_argument("--output", choices=("human", "json"), default="human")
    k.add_argument("-r", dest="repair", choices=("leaks", "all"))
    k.add_argument("-f", dest="format")
    k.add_argument("-U", "--force-share", action="store_true")
    k.add_argument("filename")
    k.set_defaults(func=cmd_check)

    b = sub.add_parser("bitmap", help="persistent dirty bitmaps (qemu-img bitmap)")
    for flag in ("add", "remove", "clear", "enable", "disable", "dump", "repair"):
        b.add_argument(f"--{flag}", dest=flag, nargs=0, action=_Ordered)
    b.add_argument("--merge", dest="merge", metavar="SOURCE", action=_Ordered)
    b.add_argument("-b", dest="source_file")
    b.add_argument("-F", dest="source_fmt")
    b.add_argument("-g", dest="granularity")
    b.add_argument("-f", dest="format")
    b.add_argument("-U", "--force-share", action="store_true")
    b.add_argument("--output", choices=("human", "json"), default="human")
    b.add_argument("filename")
    b.add_argument("bitmap")
    b.set_defaults(func=cmd_bitmap, actions=None)

    w = sub.add_parser("write", help="write guest data (qemu-io write)")
    w.add_argument("-P", dest="pattern", nargs=2, metavar=("PATTERN", "LENGTH"))
    w.add_argument("--input")
    w.add_argument("filename")
    w.add_argument("offset")
    w.set_defaults(func=cmd_write)
    for name, what in (("zero", "make a range read as zeros (whole clusters become zero clusters)"),
                       ("discard", "discard a range: it reads as zeros afterwards, whole clusters are freed")):
        z = sub.add_parser(name, help=what)
        z.add_argument("filename")
        z.add_argument("offset")
        z.add_argument("length")
        z.set_defaults(func=cmd_zero)

    r = sub.add_parser("recover", help="replay committed journal transactions")
    r.add_argument("filename")
    r.set_defaults(func=cmd_recover)

    j = sub.add_parser("journal", help="show the journal of an image")
    j.add_argument("--output", choices=("human", "json"), default="human")
    j.add_argument("filename")
    j.set_defaults(func=cmd_journal)

    from .guest import add_parsers
    add_parsers(sub)
    from .resize import add_parsers as add_resize
    add_resize(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except QcowError as e:
        print(f"qjournal: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"qjournal: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

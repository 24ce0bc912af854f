"""``qjournal journal`` and ``qjournal recover``: the sidecar journal ``FILE.qjournal``.

    qjournal journal [-f qcow2] [--output=human|json] FILE
    qjournal recover [-f qcow2] [--discard] FILE

Both refuse a file that is not a qcow2 image before they look at any journal.
"""
from __future__ import annotations

import argparse
from typing import Any

from ..errors import JournalError, UsageError
from ..journal import Journal
from ..storage import lock
from ..storage.medium import MmapMedium
from .options import add_command, add_format, add_output, print_json, qcow2_path


def add_parsers(sub: Any) -> None:
    """Register ``journal`` and ``recover`` on the subparsers of ``qjournal``."""
    r = add_command(sub, "recover", "replay committed journal transactions",
                    "Replay the transactions of FILE.qjournal that were committed but not applied (a crash "
                    "interrupted them), after checking that the image still holds what the journal "
                    "expects. Every writable open does the same.",
                    ["qjournal recover disk.qcow2",
                     "qjournal recover --discard disk.qcow2   # keep the image as QEMU left it"])
    add_format(r)
    r.add_argument("--discard", action="store_true",
                   help="when the journal no longer matches the image (someone changed it after the crash), "
                        "remove the journal and keep the image as it stands")
    r.add_argument("filename", metavar="FILE")
    r.set_defaults(func=cmd_recover)

    j = add_command(sub, "journal", "show the journal of an image",
                    "Show the transactions of FILE.qjournal, each with its state (committed, checkpointed, "
                    "incomplete) and the byte ranges of its steps. Nothing is written.",
                    ["qjournal journal disk.qcow2", "qjournal journal --output=json disk.qcow2"])
    add_format(j)
    add_output(j)
    j.add_argument("filename", metavar="FILE")
    j.set_defaults(func=cmd_journal)


def cmd_recover(args: argparse.Namespace) -> int:
    path = qcow2_path(args.filename, args.format)
    m = MmapMedium(path, True)
    try:
        lock.acquire(m.fd, path, True)
        j = Journal.open_for(path, m, True)
        try:
            if args.discard:
                try:
                    j.check_binding()
                except JournalError as e:
                    j.close()
                    Journal.discard(path)
                    print(f"{path}: the journal was stale and is removed; the image is kept as it stands ({e})")
                    return 0
                raise UsageError(f"{path}: the journal still matches the image; recover it instead of "
                                 "discarding it (qjournal recover without --discard)")
            n = j.recover()
        finally:
            j.close()
    finally:
        m.close()
    print(f"{path}: {n} transaction(s) replayed" if n else f"{path}: nothing to recover")
    return 0


def cmd_journal(args: argparse.Namespace) -> int:
    path = qcow2_path(args.filename, args.format)
    m = MmapMedium(path, False)
    try:
        j = Journal.open_for(path, m, False)
        desc = j.describe()
        j.close()
    finally:
        m.close()
    if args.output == "json":
        print_json(desc)
        return 0
    if not desc:
        print(f"{path}: the journal holds no transaction")
    for tx in desc:
        print(f"transaction {tx['txid']}: {tx['description']} [{tx['state']}]")
        for step in tx["steps"]:
            writes = ", ".join(f"{o:#x}+{n}" for o, n in step["writes"])
            print(f"    step {step['name']}: {writes}")
    return 0

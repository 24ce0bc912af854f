"""QEMU's own protocols, recorded: each real ``qemu-img``/``qemu-io`` command beside the crashsim
workload that does the same operation through qjournal, on the same starting image.

Each :class:`Protocol` starts from a :class:`crashsim.workloads.Base` (the image the
matching built-in workload starts from, made by qemu-img), records its command with
:func:`crashsim.nbdrecord.record`, and names the built-in workloads to compare with.

``commit`` records the *base*: the overlay is a real file made by qemu-img (the data the
``commit`` workload commits: 8 KiB at 0, 12 KiB at 5 MiB, a zero cluster at 10 MiB), and
it is rebased (``-u``) onto the export as ``json:{"driver":"qcow2","file":{"driver":"nbd",...}}`` (``{sock}``) and
committed with ``qemu-img commit -d``, so every write the commit makes into the base is
recorded. The overlay itself is not changed
(``-d``), so it needs no recording.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import attrs

from .nbdrecord import RecordError, RecordResult, record
from .workloads import BASES, IMG

MiB = 1 << 20


@attrs.frozen
class Protocol:
    name: str
    base: str                          # a crashsim.workloads.BASES name
    command: tuple[str, ...]           # {nbd}: the export's image-opts; {sock}: its socket; {dir}: the work folder
    workloads: tuple[str, ...]         # the built-in crashsim workloads doing the same through qjournal
    setup: tuple[tuple[str, ...], ...] = ()   # commands run in {dir} first (base.qcow2 is there)
    description: str = ""


def _img(*args: str) -> tuple[str, ...]:
    return ("qemu-img", *args, "--image-opts", "{nbd}")


# The overlay's header names its backing file, and a backing node's options cannot replace
# that name with an NBD server: the overlay is rebased (-u, only its header changes) onto
# the export, as a json: file name, then committed.
COMMIT = ("sh", "-c", "qemu-img rebase -u -F qcow2 -b "
          "'json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"nbd\",\"server\":{\"type\":\"unix\",\"path\":\"{sock}\"}}}' {dir}/top.qcow2 "
          "&& qemu-img commit -d {dir}/top.qcow2")

PROTOCOLS: tuple[Protocol, ...] = (
    Protocol("bitmap-add", "standard", ("qemu-img", "bitmap", "--add", "-g", "4096", "--image-opts", "{nbd}",
                                        "added"), ("add",), description="qemu-img bitmap --add -g 4096"),
    Protocol("bitmap-remove", "standard", ("qemu-img", "bitmap", "--remove", "--image-opts", "{nbd}", "fresh"),
             ("remove",), description="qemu-img bitmap --remove"),
    Protocol("bitmap-merge", "standard", ("qemu-img", "bitmap", "--merge", "b1", "--image-opts", "{nbd}",
                                          "fresh"), ("merge",), description="qemu-img bitmap --merge"),
    Protocol("bitmap-clear", "standard", ("qemu-img", "bitmap", "--clear", "--image-opts", "{nbd}", "b1"),
             ("clear",), description="qemu-img bitmap --clear"),
    Protocol("io-write", "standard", ("qemu-io", "--image-opts", "{nbd}", "-c", f"write -P 0x5a {5 * MiB} 12k"),
             ("guest-write", "set-in-use"),
             description="qemu-io write under auto bitmaps: in_use at open, bitmaps stored at close (the seed)"),
    Protocol("snapshot-create", "snapshot-shared", ("qemu-img", "snapshot", "-c", "s1", "--image-opts", "{nbd}"),
             ("snapshot-create",), description="qemu-img snapshot -c"),
    Protocol("resize-grow", "resize-small-clusters", ("qemu-img", "resize", "--image-opts", "{nbd}", "8M"),
             ("resize-grow-checked",), description="qemu-img resize 1M -> 8M (with a bitmap)"),
    Protocol("resize-shrink", "resize-small-clusters", ("qemu-img", "resize", "--shrink", "--image-opts", "{nbd}",
                                                        "512k"),
             ("resize-shrink",), description="qemu-img resize --shrink 1M -> 512k (with a bitmap)"),
    Protocol("amend-lazy-refcounts", "standard", ("qemu-img", "amend", "-o", "lazy_refcounts=on", "--image-opts",
                                                  "{nbd}"),
             ("amend-lazy-refcounts",), description="qemu-img amend -o lazy_refcounts=on"),
    Protocol("commit", "standard", COMMIT,
             ("commit",),
             setup=(("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", IMG, "-F", "qcow2",
                     "top.qcow2"),
                    ("qemu-io", "-f", "qcow2", "-c", "write -P 0xc1 0 8k", "-c", f"write -P 0xc2 {5 * MiB} 12k",
                     "-c", f"write -z {10 * MiB} 4k", "top.qcow2")),
             description="qemu-img commit -d of an overlay into the recorded image (its backing node over NBD)"),
)
BY_NAME = {p.name: p for p in PROTOCOLS}


def record_protocol(p: Protocol, trace: str | Path, spare: int = 64 * MiB, timeout: float = 120.0) -> RecordResult:
    """Build ``p``'s base, run its setup, and record its command into ``trace``."""
    with tempfile.TemporaryDirectory(prefix="crashsim-protocol-") as d:
        base = os.path.join(d, IMG)
        with open(base, "wb") as f:
            f.write(BASES[p.base].build())
        for cmd in p.setup:
            res = subprocess.run(list(cmd), cwd=d, capture_output=True, text=True)
            if res.returncode:
                raise RecordError(f"{p.name}: setup {' '.join(cmd)}: exit {res.returncode}: "
                                  f"{(res.stderr.strip().splitlines() or [''])[0]}")
        command = [a.replace("{dir}", d) for a in p.command]
        return record(base, command, trace, spare=spare, timeout=timeout)


def select(names: Sequence[str]) -> list[Protocol]:
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise KeyError(f"unknown protocol(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    return [BY_NAME[n] for n in names] if names else list(PROTOCOLS)

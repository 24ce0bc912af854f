"""Readers that share the image (``-U``) while a writer commits transactions.

The writer (a separate process) runs ``TRANSACTIONS`` transactions; transaction ``k``
writes the byte ``k`` over guest clusters 0 and 1 (an overwrite of allocated clusters:
under an enabled bitmap it goes in place after the commit's steps, write/data.py) and
replaces the bitmap ``t{k-1}`` by ``t{k}``. So every state that a commit leaves says which
transaction made it, and a mix is visible.

Readers, each run in a loop while the writer runs:

* ``qjournal.api.Image(path, "r", take_locks=False)`` (what the CLI's ``-U`` opens),
  reading the bitmap names and both clusters in one open;
* ``qjournal read -U --output-file`` of both clusters, ``qjournal info -U``, and
  ``qjournal bitmap --dump -U``, in-process through ``qjournal.cli.main``;
* ``qemu-io -r -U`` reading both clusters and ``qemu-img info -U`` (readers that ignore
  the journal).

Rules asserted. A ``-U`` reader takes no lock, and the image is memory-mapped and
changed in place by the writer's apply steps, so a reader is not isolated from the
writer: it sees each structure as of some moment between its open and its read, and
a journaled overwrite being applied can tear under it. What it sees is still bounded
by the ordering rule (README, "Tests"), and that is what is asserted:

1. every byte a reader gets at an offset is one that a transaction wrote there
   (``0 .. TRANSACTIONS``), never anything else (no freed or foreign cluster read);
2. a qjournal reader lists exactly one bitmap ``t{k}``; a reader that ignores the
   journal (``qemu-img info -U``) lists one, or none while the autoclear bit is clear;
3. no reader fails with anything but a one-line error, and the final state is the
   last transaction's, clean for ``qemu-img check``;
4. bits before data (the ordering rule for a guest write under an enabled bitmap): a
   bitmap listing made after a read saw data of transaction ``k`` lists ``t{j}`` with
   ``j >= k`` (or, for QEMU, none). Data of a transaction never shows before the
   bitmap change of the same transaction.

The test counts the reads that saw two transactions at once (the clusters or the
bitmap and the data from different transactions, or a torn cluster) and prints them.

Oracle: the patterns themselves, and ``qemu-img check`` on the final image.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import qemu
from qjournal.api import Image
from qjournal.cli import main
from qjournal.errors import QcowError

CLUSTER = 65536
TRANSACTIONS = 150
HEXDUMP = re.compile(r"^[0-9a-f]{8}:  ((?:[0-9a-f]{2} ){15}[0-9a-f]{2})  ")
WRITER = """
import sys, time
from qjournal.api import Image
path, n = sys.argv[1], int(sys.argv[2])
with Image(path, "r+") as img:
    for k in range(1, n + 1):
        with img.transaction("step"):
            img.write(0, bytes([k]) * (2 * %d))
            img.bitmaps.remove(f"t{k - 1}")
            img.bitmaps.add(f"t{k}", granularity=65536)
        time.sleep(0.01)
""" % CLUSTER


def qj(*args: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def ks(data: bytes) -> set[int]:
    """The transactions whose bytes a read of both clusters returned (rule 1)."""
    assert len(data) == 2 * CLUSTER
    seen = set(data)
    assert max(seen) <= TRANSACTIONS, f"bytes {sorted(seen)} that no transaction wrote"
    return seen


def one_bitmap(names: list[str], may_drop: bool = False) -> int | None:
    if not names and may_drop:
        return None
    assert len(names) == 1 and names[0].startswith("t"), names
    return int(names[0][1:])


def test_force_share_readers_see_what_the_ordering_rule_allows(tmp_path: Path) -> None:
    img = qemu.create(tmp_path / "c.qcow2", "4M", "cluster_size=65536")
    assert qj("write", img, 0, "-P", 0, 2 * CLUSTER)[0] == 0
    assert qj("bitmap", "--add", img, "t0")[0] == 0
    out = tmp_path / "out.bin"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(img), str(TRANSACTIONS)],
                              stderr=subprocess.PIPE, text=True)
    mixed = {"api": 0, "cli read": 0, "qemu-io": 0}
    rounds = 0
    deadline = time.monotonic() + 120
    try:
        while writer.poll() is None and time.monotonic() < deadline:
            rounds += 1
            # qjournal's own -U reader: one open, the bitmap list and both clusters.
            with Image(img, "r", take_locks=False) as r:
                names = list(r.bitmaps)
                data = ks(r.read(0, 2 * CLUSTER))
            mixed["api"] += data != {one_bitmap(names)}
            # Rule 4: bits before data. A bitmap listing opened after a read saw data k shows t{j}, j >= k.
            with Image(img, "r", take_locks=False) as r:
                after = one_bitmap(list(r.bitmaps))
            assert after is not None and after >= max(data), f"data of {sorted(data)} before its bitmap t{after}"
            code, _, err = qj("read", "-U", "--output-file", out, img, 0, 2 * CLUSTER)
            assert (code, err) == (0, "")
            data = ks(out.read_bytes())
            mixed["cli read"] += len(data) > 1
            if rounds % 2:
                code, text, err = qj("info", "-U", "--output=json", img)
                assert (code, err) == (0, ""), err
                after = one_bitmap([b["name"] for b in json.loads(text)["format-specific"]["data"].get("bitmaps", [])])
                assert after is not None and after >= max(data), f"data of {sorted(data)} before its bitmap t{after}"
            if rounds % 3 == 0:
                code, _, err = qj("bitmap", "--dump", "-U", img, names[0])
                # the bitmap may be gone by now (a later transaction replaced it): one line, exit 1
                assert code == 0 or (code == 1 and err.count("\n") == 1), err
            if rounds % 4 == 0:
                res = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-U", "-c", f"read -v 0 {2 * CLUSTER}",
                                      str(img)], capture_output=True, text=True)
                data = set()
                if res.returncode == 0 and "error" not in res.stdout.lower():
                    data = ks(_hexdump(res.stdout))
                    mixed["qemu-io"] += len(data) > 1
                res = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(img)],
                                     capture_output=True, text=True)
                if res.returncode == 0:
                    bms = json.loads(res.stdout)["format-specific"]["data"].get("bitmaps", [])
                    after = one_bitmap([b["name"] for b in bms], may_drop=True)
                    assert after is None or after >= max(data, default=0), (sorted(data), after)
    except QcowError as e:
        raise AssertionError(f"a -U reader failed: {e}") from e
    finally:
        if writer.poll() is None:
            writer.kill()
        _, werr = writer.communicate()
    print(f"{rounds} rounds; reads that saw two transactions at once: {mixed}")
    assert writer.returncode == 0, werr
    assert rounds >= 10, rounds  # the readers overlapped the writer
    with Image(img, "r") as r:
        assert ks(r.read(0, 2 * CLUSTER)) == {TRANSACTIONS} and list(r.bitmaps) == [f"t{TRANSACTIONS}"]
    qemu.assert_clean(img)


def _hexdump(text: str) -> bytes:
    """The bytes of qemu-io ``read -v`` output."""
    data = bytearray()
    for line in text.splitlines():
        m = HEXDUMP.match(line)
        if m:
            data += bytes.fromhex(m.group(1))
    return bytes(data)

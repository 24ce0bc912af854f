"""The demo behind ``./dev demo``: edit a real image through the journal, then crash-test the edit.

1. qemu-img makes a 1 GiB image with a bitmap; qemu-io writes to it, which dirties it.
2. qjournal adds a second bitmap and merges the first into it, in one transaction.
3. qemu-img check and info, and qemu-nbd's export of the bitmap, agree with qjournal.
4. The same transaction is recorded write by write (journal and image), and the files
   are "crashed" after every write: qjournal's recovery must give exactly the old or
   the new state, and qemu-img, which ignores the journal, must find no corruption.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from qjournal import Image
from qjournal.storage.medium import MemoryMedium

from .cli import main as crashsim_main
from .recorder import IMAGE, JOURNAL, Recording, RecordingMedium


def sh(*cmd: str) -> str:
    print("$", " ".join(cmd))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return out


def bitmaps_of(path: str) -> list[dict[str, object]]:
    info = json.loads(sh("qemu-img", "info", "--output=json", "-U", path))
    return info["format-specific"]["data"].get("bitmaps", [])


def workload(img: Image) -> None:
    with img.transaction("demo: add backup-1 and merge backup-0 into it"):
        img.bitmaps.add("backup-1", 65536, disabled=True)
        img.bitmaps.merge("backup-1", "backup-0")
        img.bitmaps.clear("backup-0")


def state_of(img: Image) -> list[tuple[object, ...]]:
    return [(n, img.bitmaps[n].entry.flags, tuple(img.bitmaps[n].dirty_extents())) for n in img.bitmaps]


def main() -> int:
    d = tempfile.mkdtemp(prefix="qjournal-demo-")
    try:
        path = os.path.join(d, "disk.qcow2")
        print("== 1. QEMU makes an image and dirties a bitmap")
        sh("qemu-img", "create", "-q", "-f", "qcow2", path, "1G")
        sh("qemu-img", "bitmap", "--add", path, "backup-0")
        sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 192k", "-c", "write 700M 64k", path)
        base = open(path, "rb").read()

        print("\n== 2. qjournal edits it through the journal")
        with Image(path, "r+") as img:
            workload(img)
            for name in img.bitmaps:
                print(f"   {name}: dirty extents {list(img.bitmaps[name].dirty_extents())}")
        print("   " + json.dumps(bitmaps_of(path)))
        print(sh("qemu-img", "check", path).strip().replace("\n", "\n   "))
        print(sh("qjournal", "journal", path).strip())

        print("\n== 3. crash after every write of the same transaction")
        rec = Recording({IMAGE: base, JOURNAL: b""})
        with Image("recorded", "r+", medium=RecordingMedium(rec, IMAGE),
                   journal_medium=RecordingMedium(rec, JOURNAL)) as img:
            old = state_of(img)
            workload(img)
        final = rec.state(len(rec.entries))
        with Image("final", "r", medium=MemoryMedium(final[IMAGE]), journal_medium=MemoryMedium(final[JOURNAL])) as img:
            new = state_of(img)
        cuts = [0] + [i + 1 for i in rec.writes()]
        counts = {"old": 0, "new": 0, "qemu clean": 0, "qemu leaks only": 0}
        bad = 0
        state_path = os.path.join(d, "crashed.qcow2")
        for cut in cuts:
            files = rec.state(cut)
            with Image("crashed", "r+", medium=MemoryMedium(files[IMAGE]),
                       journal_medium=MemoryMedium(files[JOURNAL])) as img:
                got = state_of(img)
            outcome = "old" if got == old else "new" if got == new else "NEITHER"
            with open(state_path, "wb") as f:
                f.write(files[IMAGE])
            res = subprocess.run(["qemu-img", "check", "--output=json", state_path], capture_output=True, text=True)
            qemu = {0: "qemu clean", 3: "qemu leaks only"}.get(res.returncode, f"qemu exit {res.returncode}")
            last = rec.entries[cut - 1] if cut else None
            if last is None:
                where = "before anything"
            elif last.kind == "resize":
                where = f"{last.file} resize to {last.size:#x} ({last.site})"
            else:
                where = f"{last.file} write {len(last.data)} B @{last.off:#x} ({last.site})"
            print(f"   cut {cut:3d} after {where:70.70s} -> qjournal: {outcome:4s}  {qemu}")
            if outcome == "NEITHER" or qemu not in counts:
                bad += 1
            else:
                counts[outcome] += 1
                counts[qemu] += 1
        print(f"\n   {len(cuts)} crash points: {counts}; failures: {bad}")

        print("\n== 4. crashsim: every crash state (reorderings, torn sectors, crashes during recovery)")
        report = os.path.join(tempfile.gettempdir(), "qjournal-demo-report.html")
        real = crashsim_main(["run", "transaction", "guest-write-mixed", "--k", "2", "--report", report])
        print(f"   report: {report}")
        print("   and a negative control, which must fail: the seed protocol in the wrong order")
        control = crashsim_main(["run", "control-seed-wrong-order", "-q"])
        ok = not bad and real == 0 and control == 1
        print("\n== " + ("every check passed" if ok else "SOMETHING FAILED"))
        return 0 if ok else 1
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

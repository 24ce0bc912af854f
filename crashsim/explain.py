"""Explaining a failing state in a few words: which writes, which header fields, what readers saw."""
from __future__ import annotations

import re
import struct

from qjournal.format.bitmaps import EXT_FIELDS as BITMAPS_FIELDS, EXT_SIZE as BITMAPS_SIZE
from qjournal.format.extensions import EXT_BITMAPS, EXT_END, EXT_HEADER, padded
from qjournal.format.geometry import SECTOR
from qjournal.format.header import FIELDS

from .model import EntryInfo, Fate


def header_fields(c0: bytes) -> dict[str, tuple[int, int]]:
    """Header fields and bitmaps-extension fields of ``c0``: name -> (value, byte offset).

    Reads what it can: a torn or garbled header still yields the fields that lie in it.
    """
    out: dict[str, tuple[int, int]] = {}
    for name, code, off, _ in FIELDS:
        size = struct.calcsize(">" + code)
        if off + size <= len(c0):
            out[name] = (struct.unpack_from(">" + code, c0, off)[0], off)
    hl = out.get("header_length", (0, 0))[0]
    off = hl if 0 < hl < len(c0) else 0
    seen = 0
    while off and off + EXT_HEADER.size <= len(c0) and seen < 64:
        etype, length = EXT_HEADER.unpack_from(c0, off)
        if etype == EXT_END:
            break
        data = off + EXT_HEADER.size
        if etype == EXT_BITMAPS and data + BITMAPS_SIZE <= len(c0):
            for field, code, at in BITMAPS_FIELDS:
                if field != "reserved":
                    out[f"bitmaps.{field}"] = (struct.unpack_from(">" + code, c0, data + at)[0], data + at)
        off = data + padded(length)
        seen += 1
    return out


def provenance(cur: bytes, old: bytes, new: bytes) -> str:
    """For each header field the operation changes: its value here, and whether old or new."""
    c, o, n = header_fields(cur), header_fields(old), header_fields(new)
    parts = []
    for name in n:
        if name not in o or o[name][0] == n[name][0]:
            continue
        val, off = c.get(name, (None, n[name][1]))
        which = "new" if val == n[name][0] else "old" if val == o[name][0] else "neither"
        shown = "?" if val is None else f"{val:#x}"
        parts.append(f"{name}={shown} ({which}, sector {off // SECTOR})")
    return ", ".join(parts)


def entry_text(e: EntryInfo, step: str) -> str:
    what = {"write": f"write of {e.length} B at {e.offset:#x}", "resize": f"resize to {e.length:#x}"}.get(e.kind, e.kind)
    at = f" in step {step}" if step else ""
    return f"entry {e.index} ({e.file} {what}{at}, {e.site})"


def fate_text(f: Fate, entries: tuple[EntryInfo, ...], steps: dict[int, str]) -> str:
    """One fate in words, e.g. "image page 0x5000 holds entry 12 (...)"."""
    last = entries[f.entries[-1]] if f.entries else None
    src = entry_text(last, steps.get(last.index, "")) if last is not None else "?"
    if f.unit == "size":
        verb = "keeps" if f.fate == "persisted" else "loses"
        return f"{f.file} size {verb} the change of {src} (holds {f.offset:#x})"
    where = f"{f.file} page {f.offset:#x}"
    if f.fate == "persisted":
        return f"{where} holds {src}"
    if f.fate == "torn":
        sectors = ",".join(map(str, f.new_sectors))
        return f"{where} is torn: {f.sector_size}-byte sector(s) {sectors} hold {src}, the others the durable bytes"
    return f"{where} lost {src}"


_LONG = re.compile(r"[^\s,;:()'\"\[\]]{41,}")


def shorten(text: str) -> str:
    """Shorten every very long word (1000-character bitmap names) to its head and length."""
    return _LONG.sub(lambda m: f"{m.group(0)[:16]}...({len(m.group(0))} chars)", text)

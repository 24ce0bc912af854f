"""The trace file of ``crashsim record``, and its conversion into a crashsim :class:`Recording`.

A trace holds everything needed to rebuild every crash state of one recorded command:
the image's bytes before the command, and every request the command sent to the NBD
export, in the one order the (single-threaded) server received them.

File format (version 1)
=======================

All integers little-endian. A trace is one file, read front to back:

======================  =========================================================
bytes                   meaning
======================  =========================================================
``CRASHSIM-TRACE 1\\n``  magic (16 bytes), the version in ASCII
JSON line               the *header*: a JSON object on one line ending in ``\\n``
                        (keys below)
u64 ``n``, ``n`` bytes  the image before the command, compressed with zlib
records                 until the end record
======================  =========================================================

Header keys: ``image`` (the path recorded), ``size`` (the image's size in bytes before
the command), ``spare`` (bytes of zeros added at the end of the export), ``command`` (the
argv as run, ``{nbd}`` replaced), ``template`` (the argv as given, with ``{nbd}``), ``initial_sha256`` (of the uncompressed initial bytes).

Each record is a 17-byte head ``<cQQ`` (kind, offset, length), then, for a write, its
``length`` bytes of data:

=====  ==================  ==============================================================
kind   name                meaning
=====  ==================  ==============================================================
``W``  write               ``length`` bytes of data at ``offset``
``U``  FUA write           a write, then a barrier over its range (NBD_CMD_FLAG_FUA)
``F``  flush               a barrier: over the whole file when ``length`` is 0 (NBD_CMD_FLUSH),
                           over ``[offset, offset + length)`` otherwise (a FUA trim or zero)
``T``  trim                ``length`` bytes at ``offset`` read zeros afterwards (a discard,
                           NBD_CMD_TRIM); it never extends the file
``Z``  zero                ``length`` bytes of zeros at ``offset`` (NBD_CMD_WRITE_ZEROES)
``O``  open                a client connected (offset and length 0)
``E``  end                 the last record: ``length`` bytes of a JSON object follow
=====  ==================  ==============================================================

End keys: ``exit`` (the command's exit status), ``seconds`` (its wall time), ``used_size``
(see below), ``final_sha256`` (of the image after the command, cut at ``used_size``),
``stderr`` (the command's standard error, at most 4 KiB).

The size the image really uses
------------------------------

An NBD export cannot grow, so the image is exported with ``spare`` bytes of zeros at its
end. QEMU's qcow2 driver allocates by refcount, not by file size, so the spare room
changes nothing it does; it reads zeros there as it would past the end of a file. A file
on a POSIX file system is extended by a write past its end (QEMU's file-posix driver does
``pwrite``; a write-zeroes past the end extends too) and never by a discard, so the
*used size* is the larger of the original size and the end of the highest write or zero
request, not rounded further (QEMU writes whole sectors or clusters there already). Crash
states are cut at the size each crash keeps, which the page model derives from the same
writes. What the trace cannot show: a truncation QEMU would do on a file (``qemu-img
resize --shrink`` truncating the file, for one) does not reach an NBD export, so the
trace's image never shrinks.

Conversion
==========

:func:`to_recording` turns a trace into crashsim's own :class:`Recording` of one file,
``image``: a write is a ``write`` entry; a FUA write a ``write`` then a ``barrier`` over
its range; a flush a ``barrier`` over the whole file as it stands (``(0, size)``); a trim
or a zero a ``write`` of zeros (a trim clipped to the file's size); an open a ``mark``
named ``nbd-open``. :class:`crashsim.states.Timeline` and
:class:`crashsim.states.Generator` work on it unchanged.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import attrs

from .recorder import IMAGE, Entry, Recording

MAGIC = b"CRASHSIM-TRACE 1\n"
HEAD = struct.Struct("<cQQ")
U64 = struct.Struct("<Q")
WRITE, FUA_WRITE, FLUSH, TRIM, ZERO, OPEN, END = (b"W", b"U", b"F", b"T", b"Z", b"O", b"E")
KINDS = {WRITE: "write", FUA_WRITE: "fua-write", FLUSH: "flush", TRIM: "trim", ZERO: "zero", OPEN: "open"}


class TraceError(ValueError):
    """A file that is not a complete trace."""


@attrs.frozen
class Record:
    kind: str                   # write | fua-write | flush | trim | zero | open
    offset: int
    length: int
    data: bytes = b""


@attrs.frozen
class Trace:
    header: dict[str, Any]
    initial: bytes
    records: tuple[Record, ...]
    end: dict[str, Any]

    @property
    def used_size(self) -> int:
        return int(self.end["used_size"])

    def counts(self) -> dict[str, int]:
        """Records by kind."""
        out: dict[str, int] = {}
        for r in self.records:
            out[r.kind] = out.get(r.kind, 0) + 1
        return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_start(f: BinaryIO, header: dict[str, Any], initial: bytes) -> None:
    """The magic, the header line and the compressed initial image: what precedes the records."""
    packed = zlib.compress(initial, 1)
    f.write(MAGIC)
    f.write(json.dumps(header, sort_keys=True).encode() + b"\n")
    f.write(U64.pack(len(packed)))
    f.write(packed)


def append_end(path: str | Path, end: dict[str, Any]) -> None:
    body = json.dumps(end, sort_keys=True).encode()
    with open(path, "ab") as f:
        f.write(HEAD.pack(END, 0, len(body)) + body)


def scan(path: str | Path, data: bool = True) -> Iterator[tuple[bytes, int, int, bytes]]:
    """The raw records after the initial image: (kind, offset, length, data), the end record last.
    ``data=False`` skips a write's data (``b""`` in its place) and costs no reading of it."""
    with open(path, "rb") as f:
        _read_start(f, str(path))
        while True:
            head = f.read(HEAD.size)
            if not head:
                return
            if len(head) < HEAD.size:
                raise TraceError(f"{path}: trace record at byte {f.tell() - len(head):#x} is cut short "
                                 f"(the recording did not finish)")
            kind, off, n = HEAD.unpack(head)
            body = b""
            if kind in (WRITE, FUA_WRITE, END):
                if data or kind == END:
                    body = f.read(n)
                    got = len(body)
                else:
                    at = f.tell()
                    got = min(n, f.seek(0, os.SEEK_END) - at)
                    f.seek(at + got)
                if got < n:
                    raise TraceError(f"{path}: trace record {kind!r} at offset {off:#x} holds {got} of its "
                                     f"{n} bytes (the recording did not finish)")
            yield kind, off, n, body


def _read_start(f: BinaryIO, path: str) -> tuple[dict[str, Any], bytes]:
    if f.read(len(MAGIC)) != MAGIC:
        raise TraceError(f"{path}: not a crashsim trace (its first {len(MAGIC)} bytes are not {MAGIC!r})")
    try:
        header = json.loads(f.readline())
        (n,) = U64.unpack(f.read(U64.size))
        initial = zlib.decompress(f.read(n))
    except (ValueError, struct.error, zlib.error) as e:
        raise TraceError(f"{path}: trace header or initial image unreadable ({e})") from None
    if sha256(initial) != header.get("initial_sha256"):
        raise TraceError(f"{path}: trace's initial image does not match its header's initial_sha256")
    return header, initial


def load(path: str | Path) -> Trace:
    """Read a whole trace; :class:`TraceError` when it is not one or is incomplete."""
    with open(path, "rb") as f:
        header, initial = _read_start(f, str(path))
    records: list[Record] = []
    end: dict[str, Any] | None = None
    for kind, off, n, data in scan(path):
        if end is not None:
            raise TraceError(f"{path}: trace record {kind!r} after the end record")
        if kind == END:
            end = json.loads(data)
        elif kind in KINDS:
            records.append(Record(KINDS[kind], off, n, data))
        else:
            raise TraceError(f"{path}: trace record of unknown kind {kind!r} at offset {off:#x}")
    if end is None:
        raise TraceError(f"{path}: trace has no end record (the recording did not finish)")
    return Trace(header, initial, tuple(records), end)


@attrs.frozen
class Summary:
    connected: bool            # an open record: a client connected
    used_size: int             # the original size, or the end of the highest write or zero
    counts: dict[str, int]     # records by kind


def summarize(path: str | Path, size: int) -> Summary:
    """One pass over the records (without their data) of a trace whose image had ``size`` bytes."""
    top, counts = size, dict[str, int]()
    for kind, off, n, _ in scan(path, data=False):
        if kind in (WRITE, FUA_WRITE, ZERO):
            top = max(top, off + n)
        if kind in KINDS:
            counts[KINDS[kind]] = counts.get(KINDS[kind], 0) + 1
    return Summary(counts.get("open", 0) > 0, top, counts)


def to_recording(trace: Trace) -> Recording:
    """The trace as a crashsim recording of the one file ``image`` (see the module docstring)."""
    rec = Recording({IMAGE: trace.initial})
    add = rec.entries.append
    size = len(trace.initial)
    for i, r in enumerate(trace.records):
        site = f"nbd request {i} ({r.kind} {r.offset:#x}+{r.length:#x})"
        if r.kind in ("write", "fua-write"):
            add(Entry("write", IMAGE, r.offset, r.data, site=site))
            size = max(size, r.offset + r.length)
            if r.kind == "fua-write":
                add(Entry("barrier", IMAGE, ranges=((r.offset, r.length),), site=site))
        elif r.kind == "flush":
            ranges = ((r.offset, r.length),) if r.length else ((0, size),)
            add(Entry("barrier", IMAGE, ranges=ranges, site=site))
        elif r.kind == "zero":
            add(Entry("write", IMAGE, r.offset, bytes(r.length), site=site))
            size = max(size, r.offset + r.length)
        elif r.kind == "trim":
            n = max(0, min(r.length, size - r.offset))
            if n:
                add(Entry("write", IMAGE, r.offset, bytes(n), site=site))
        else:
            add(Entry("mark", IMAGE, name="nbd-open", site=site))
    return rec


def final_image(trace: Trace) -> bytes:
    """The image after the command: every request applied, cut at the used size."""
    rec = to_recording(trace)
    return rec.state(len(rec.entries))[IMAGE][:trace.used_size]

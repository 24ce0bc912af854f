"""Recording media: every write (with its data), barrier, resize and mark, in one global order.

The image and its journal each get a :class:`RecordingMedium` that shares one
:class:`Recording`, so the order of writes across the two files is kept. Each entry
carries the call site that caused it: the innermost frame outside the media, which is
qjournal's code for a journaled operation and the workload's own for one that writes
through ``img.medium`` directly.

A barrier entry keeps the ranges it was given: ``flush()`` without ranges is recorded
as the whole file, ``flush([])`` as no range at all (it covers nothing).
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Iterable

import attrs
import numpy as np

from qjournal.storage.medium import MemoryMedium, Range

if TYPE_CHECKING:
    from qjournal.core.image import Image

IMAGE = "image"
JOURNAL = "journal"


@attrs.frozen
class Entry:
    kind: str  # write | barrier | resize | mark
    file: str
    off: int = 0
    data: bytes = b""
    ranges: tuple[Range, ...] = ()
    size: int = 0
    name: str = ""
    site: str = ""


_MEDIA = frozenset({__name__, "qjournal.storage.medium", "qjournal.storage.overlay", "crashsim.realmedium"})


def call_site() -> str:
    """The innermost frame outside the media (qjournal's, or a workload's own)."""
    f = sys._getframe(2)
    while f is not None:
        mod = f.f_globals.get("__name__", "")
        if mod not in _MEDIA:
            return f"{mod}:{f.f_lineno} {f.f_code.co_name}"
        f = f.f_back  # type: ignore[assignment]
    return "?"


@attrs.define
class Recording:
    initial: dict[str, bytes]
    entries: list[Entry] = attrs.Factory(list)

    def state(self, upto: int) -> dict[str, bytes]:
        """The files after the first ``upto`` entries, every write landing in order."""
        files = {k: bytearray(v) for k, v in self.initial.items()}
        for e in self.entries[:upto]:
            apply_entry(files, e)
        return {k: bytes(v) for k, v in files.items()}

    def writes(self) -> list[int]:
        return [i for i, e in enumerate(self.entries) if e.kind in ("write", "resize")]

    def mark(self, name: str, file: str = IMAGE) -> None:
        """A named point in the global order, made by the recorder's user (not by a medium)."""
        self.entries.append(Entry("mark", file, name=name, site=call_site()))


def apply_entry(files: dict[str, bytearray], e: Entry) -> None:
    buf = files[e.file]
    if e.kind == "write":
        end = e.off + len(e.data)
        if end > len(buf):
            buf.extend(bytes(end - len(buf)))
        buf[e.off:end] = e.data
    elif e.kind == "resize":
        if e.size < len(buf):
            del buf[e.size:]
        else:
            buf.extend(bytes(e.size - len(buf)))


class RecordingMedium(MemoryMedium):
    """A memory medium that logs what is done to it into a shared :class:`Recording`.

    At each barrier it compares its bytes with a shadow copy built from the log alone,
    so a change that bypassed :meth:`write` is caught where it happened.
    """

    def __init__(self, recording: Recording, file: str) -> None:
        super().__init__(recording.initial[file])
        self.rec = recording
        self.file = file
        self.shadow = bytearray(recording.initial[file])

    def write(self, off: int, data: bytes) -> None:
        self.rec.entries.append(Entry("write", self.file, off, bytes(data), site=call_site()))
        apply_entry({self.file: self.shadow}, self.rec.entries[-1])
        super().write(off, data)

    def resize(self, n: int) -> None:
        self.rec.entries.append(Entry("resize", self.file, size=n, site=call_site()))
        apply_entry({self.file: self.shadow}, self.rec.entries[-1])
        super().resize(n)

    def flush(self, ranges: Iterable[Range] | None = None) -> None:
        if self.buf != self.shadow:
            a = np.frombuffer(bytes(self.buf[:len(self.shadow)]), dtype=np.uint8)
            b = np.frombuffer(bytes(self.shadow[:len(self.buf)]), dtype=np.uint8)
            where = np.nonzero(a != b)[0]
            at = int(where[0]) if len(where) else min(len(self.buf), len(self.shadow))
            raise AssertionError(f"{self.file}: byte {at:#x} changed without a write through the medium "
                                 f"(caught at the barrier from {call_site()})")
        rs = tuple(ranges) if ranges is not None else ((0, len(self.buf)),)
        self.rec.entries.append(Entry("barrier", self.file, ranges=rs, site=call_site()))

    def mark(self, name: str) -> None:
        self.rec.entries.append(Entry("mark", self.file, name=name, site=call_site()))


def bracket_transactions(img: "Image", rec: Recording) -> list[str]:
    """Mark each transaction of ``img`` with ``tx-begin``/``tx-end`` in ``rec``, through the
    image's commit observer; returns the list their descriptions are appended to, in order."""
    descriptions: list[str] = []

    def observe(event: str, description: str) -> None:
        if event == "begin":
            descriptions.append(description)
            rec.mark("tx-begin")
        else:
            rec.mark("tx-end")

    img.observe_commits(observe)
    return descriptions

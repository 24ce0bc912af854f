"""Planning the writes that change cluster 0 (header, extensions, backing file name).

QEMU rewrites the whole header cluster in one write, so a torn write can corrupt the
header. We do it in steps, each safe to crash after for a reader that ignores our
journal (a disk sector of 512 bytes is the unit that cannot tear):

1. ``autoclear-cleared``: when the bitmaps extension changes in more than one sector,
   clear autoclear bit 0 first. A crash from here on leaves bitmaps that QEMU drops
   (allowed), never bitmaps that claim to be consistent and are not.
2. ``header-tail-written``: bytes no reader of the old layout looks at (past the end
   marker, away from the backing file name). A crash here changes nothing visible.
3. ``backing-name-moved``: when the extension list grows into the backing file name,
   the name was copied in step 2; one write in sector 0 points the header at the copy.
4. ``header-switched``: the rest of the visible change, one sector per write, sector 0
   (with the autoclear bit set again) last. In the common cases this is one write.
5. ``header-cleanup``: zero what the new layout no longer looks at.
"""
from __future__ import annotations

import attrs

from ..format.lazy import np
from ..errors import UsageError
from ..format.extensions import EXT_BITMAPS, Extension, padded, pack_extensions, parse_extensions
from ..format.geometry import SECTOR
from ..format.header import AUTOCLEAR_BITMAPS, FIELD_OFFSET, TAIL_OFFSET, Header, field_span, pack_field, read_field

Write = tuple[int, bytes]


@attrs.frozen
class Cluster0:
    """The visible content of cluster 0: header, extensions, backing file name."""

    header: Header
    extensions: tuple[Extension, ...]
    backing_name: bytes | None
    header_tail: bytes = b""  # bytes TAIL_OFFSET..header_length we do not interpret, kept as is

    @property
    def ext_end(self) -> int:
        return self.header.length + sum(e.packed_size for e in self.extensions) + 8

    def visible(self) -> list[tuple[int, int]]:
        ranges = [(0, self.ext_end)]
        if self.backing_name:
            ranges.append((self.header.backing_file_offset, len(self.backing_name)))
        return ranges

    def place(self, old_backing: tuple[int, int] | None) -> "Cluster0":
        """Choose where the backing name lives: where it was if it still fits."""
        if not self.backing_name:
            return attrs.evolve(self, header=self.header.replace(backing_file_offset=0, backing_file_size=0))
        n = len(self.backing_name)
        if old_backing and old_backing[0] >= self.ext_end and old_backing[1] == n:
            off = old_backing[0]
        elif old_backing:
            off = padded(max(self.ext_end, old_backing[0] + old_backing[1]))
        else:
            off = self.ext_end
        if off + n > self.header.cluster_size:
            off = self.ext_end
            if off + n > self.header.cluster_size:
                raise UsageError(f"header extensions and backing file name do not fit in the "
                                 f"{self.header.cluster_size}-byte header cluster")
        return attrs.evolve(self, header=self.header.replace(backing_file_offset=off, backing_file_size=n))

    def render(self, length: int) -> bytes:
        buf = bytearray(length)
        packed = self.header.pack()
        buf[:len(packed)] = packed
        if self.header_tail:
            buf[TAIL_OFFSET:TAIL_OFFSET + len(self.header_tail)] = self.header_tail
        exts = pack_extensions(self.extensions)
        buf[self.header.length:self.header.length + len(exts)] = exts
        if self.backing_name:
            o = self.header.backing_file_offset
            buf[o:o + len(self.backing_name)] = self.backing_name
        return bytes(buf)


def _mask(length: int, ranges: list[tuple[int, int]]) -> np.ndarray:
    m = np.zeros(length, dtype=bool)
    for o, n in ranges:
        m[o:o + n] = True
    return m


def _runs(new: bytes, where: np.ndarray) -> list[Write]:
    """Coalesce the byte positions marked in ``where`` into writes of ``new``."""
    idx = np.nonzero(where)[0]
    if not len(idx):
        return []
    breaks = np.nonzero(np.diff(idx) != 1)[0]
    starts = np.concatenate(([idx[0]], idx[breaks + 1])).tolist()
    ends = np.concatenate((idx[breaks], [idx[-1]])).tolist()
    return [(s, bytes(new[s:e + 1])) for s, e in zip(starts, ends)]


def plan(old_bytes: bytes, old: Cluster0, new: Cluster0, guard_bitmaps: bool) -> list[tuple[str, list[Write]]]:
    """Steps that take cluster 0 from ``old_bytes`` (laid out as ``old``) to ``new``."""
    length = max(len(old_bytes), new.ext_end,
                 (new.header.backing_file_offset + len(new.backing_name or b"")))
    cur = bytearray(old_bytes) + bytearray(max(0, length - len(old_bytes)))
    target = new.render(len(cur))
    tgt = np.frombuffer(target, dtype=np.uint8)

    def differs() -> np.ndarray:
        return np.frombuffer(bytes(cur), dtype=np.uint8) != tgt

    diff = np.nonzero(differs())[0]
    if not len(diff):
        return []
    if diff[-1] // SECTOR == diff[0] // SECTOR:
        return [("header-switched", _runs(target, differs()))]

    steps: list[tuple[str, list[Write]]] = []

    def emit(name: str, writes: list[Write]) -> None:
        if writes:
            for off, data in writes:
                cur[off:off + len(data)] = data
            steps.append((name, writes))

    old_ac = read_field(cur, "autoclear_features")
    if guard_bitmaps and old_ac & AUTOCLEAR_BITMAPS:
        emit("autoclear-cleared", [(FIELD_OFFSET["autoclear_features"],
                                    pack_field("autoclear_features", old_ac & ~AUTOCLEAR_BITMAPS))])
    emit("header-tail-written", _runs(target, differs() & ~_mask(len(cur), old.visible())))
    if old.backing_name and new.backing_name and \
            old.header.backing_file_offset != new.header.backing_file_offset:
        # backing_file_offset and backing_file_size are adjacent: one write switches both.
        bf, end = field_span("backing_file_offset")[0], field_span("backing_file_size")[1]
        emit("backing-name-moved", [(bf, target[bf:end])])
    rest = differs() & _mask(len(cur), new.visible())
    # One write per sector, the last sector first (O(changed bytes) beyond the masks: a
    # per-byte sector index would cost 8 bytes per byte of a 2 MiB cluster 0).
    for s in np.unique(np.nonzero(rest)[0] // SECTOR)[::-1].tolist():
        one = np.zeros_like(rest)
        one[s * SECTOR:(s + 1) * SECTOR] = rest[s * SECTOR:(s + 1) * SECTOR]
        emit("header-switched", _runs(target, one))
    emit("header-cleanup", _runs(target, differs()))
    return steps


def unsafe_boundary(old_bytes: bytes, old: Cluster0, new: Cluster0,
                    steps: list[tuple[str, list[Write]]]) -> str | None:
    """Why a reader that ignores the journal would find cluster 0 broken after some step
    of ``steps`` (None when every step boundary is safe).

    At every boundary the extension list must parse, every extension that both layouts
    hold must be there with its data intact, the backing file name must be the old or
    the new one, and a bitmaps extension declared consistent (autoclear bit 0) must be
    the old or the new one.
    """
    cs = len(old_bytes)
    cur = bytearray(old_bytes)
    keep = {(e.type, e.data) for e in old.extensions} & {(e.type, e.data) for e in new.extensions}
    names = {old.backing_name or b"", new.backing_name or b""}
    bm_ok = {e.data for e in old.extensions + new.extensions if e.type == EXT_BITMAPS}
    for name, writes in steps:
        for off, data in writes:
            if off < cs:
                cur[off:off + len(data)] = data[:cs - off]
        # The extensions start after the header as it now reads: a version change
        # (amend compat) moves them with the switch of sector 0.
        start = old.header.length if read_field(cur, "version") == old.header.version else new.header.length
        try:
            exts = parse_extensions(bytes(cur), start, cs)
        except Exception as e:  # noqa: BLE001 - any parse failure is the answer
            return f"after step {name} the header extensions do not parse ({e})"
        have = {(e.type, e.data) for e in exts}
        if not keep <= have:
            return f"after step {name} an extension kept by both layouts is damaged"
        bo = read_field(cur, "backing_file_offset")
        bn = read_field(cur, "backing_file_size")
        got = bytes(cur[bo:bo + bn]) if bo else b""
        if got not in names:
            return f"after step {name} the backing file name is neither the old nor the new one"
        ac = read_field(cur, "autoclear_features")
        bme = next((e.data for e in exts if e.type == EXT_BITMAPS), None)
        if ac & AUTOCLEAR_BITMAPS and bme is not None and bme not in bm_ok:
            return f"after step {name} the bitmaps extension is a mix of old and new"
    return None

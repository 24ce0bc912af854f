"""The internal snapshot table (``nb_snapshots`` entries at ``snapshots_offset``).

Entry, padded to 8 bytes::

    0   u64 l1_table_offset
    8   u32 l1_size
    12  u16 id_str_size
    14  u16 name_size
    16  u32 date_sec
    20  u32 date_nsec
    24  u64 vm_clock_nsec
    32  u32 vm_state_size
    36  u32 extra_data_size
    40  extra data (u64 vm_state_size_large, u64 disk_size, u64 icount), id, name
"""
from __future__ import annotations

import struct

import attrs

from ..errors import FormatError

FIXED = 40
MAX_SNAPSHOTS = 65536  # QEMU's QCOW_MAX_SNAPSHOTS
MAX_EXTRA = 1024
MAX_TABLE_BYTES = 1024 * MAX_SNAPSHOTS  # QEMU's QCOW_MAX_SNAPSHOTS_SIZE: 64 MiB
# A version 3 entry's extra data holds at least vm_state_size_large and disk_size;
# QEMU's check reports a shorter one as "incomplete" and -r all fills it in.
MIN_EXTRA_V3 = 16


@attrs.frozen
class Snapshot:
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None
    icount: int | None
    extra: bytes
    offset: int
    # The id and name as the table holds them: written back unchanged even where they
    # are not UTF-8 (``id`` and ``name`` show them with replacement characters).
    raw_id: bytes | None = None
    raw_name: bytes | None = None

    def pack(self) -> bytes:
        idb = self.raw_id if self.raw_id is not None else self.id.encode()
        nameb = self.raw_name if self.raw_name is not None else self.name.encode()
        raw = struct.pack(">QIHHIIQII", self.l1_table_offset, self.l1_size, len(idb), len(nameb),
                          self.date_sec, self.date_nsec, self.vm_clock_nsec, self.vm_state_size,
                          len(self.extra)) + self.extra + idb + nameb
        return raw + bytes(-len(raw) % 8)


def completed(s: Snapshot, disk_size: int) -> Snapshot:
    """``s`` with extra data of at least :data:`MIN_EXTRA_V3` bytes, as QEMU's repair
    writes it: a missing vm_state_size_large is the 32-bit vm_state_size, a missing
    disk_size the image's virtual size; extra bytes already there are kept.

    >>> s = Snapshot(0x30000, 2, "1", "s1", 0, 0, 0, 7, None, None, b"", 0)
    >>> c = completed(s, 1 << 24)
    >>> c.extra.hex(), c.disk_size
    ('00000000000000070000000001000000', 16777216)
    """
    if len(s.extra) >= MIN_EXTRA_V3:
        return s
    head = s.extra[:8] if len(s.extra) >= 8 else struct.pack(">Q", s.vm_state_size)
    extra = head + struct.pack(">Q", disk_size)
    return attrs.evolve(s, extra=extra, disk_size=disk_size)


class MoreNeeded(Exception):
    """``buf`` ends before the table does, and the file holds more: read ``needed`` bytes
    (at least) of the table and parse again."""

    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


def parse_snapshots(buf: bytes, offset: int, nb: int, cluster_size: int, file_size: int,
                    available: int | None = None) -> tuple[Snapshot, ...]:
    """The ``nb`` entries of the table at ``offset``, from ``buf`` (its first bytes).

    ``available`` is how many bytes of the table the file could hold (``len(buf)`` when
    left out): an entry that runs past ``buf`` but not past ``available`` raises
    :class:`MoreNeeded`, so that a reader can start with a short read instead of QEMU's
    64 MiB limit (an open after a snapshot read 64 MiB of the file to parse two entries).

    >>> e = Snapshot(0x30000, 2, "1", "s1", 0, 0, 0, 0, None, None, b"", 0x20000).pack()
    >>> [s.name for s in parse_snapshots(e + e, 0x20000, 2, 0x10000, 1 << 20)]
    ['s1', 's1']
    >>> parse_snapshots(e, 0x20000, 2, 0x10000, 1 << 20, available=4096)
    Traceback (most recent call last):
    qjournal.format.snapshots.MoreNeeded: 88
    """
    out: list[Snapshot] = []
    pos = 0
    short = available is not None and available > len(buf)
    for i in range(nb):
        at = offset + pos
        if pos + FIXED > len(buf):
            if short:
                raise MoreNeeded(pos + FIXED)
            raise FormatError("snapshot table", at, f"entry {i} runs past the end of the file")
        (l1off, l1size, idsz, namesz, dsec, dnsec, vmclk, vmsz, extrasz) = struct.unpack_from(">QIHHIIQII", buf, pos)
        if extrasz > MAX_EXTRA:
            raise FormatError("snapshot table", at + 36, f"entry {i} extra data of {extrasz} bytes exceeds {MAX_EXTRA}")
        end = pos + FIXED + extrasz + idsz + namesz
        if end > MAX_TABLE_BYTES:
            raise FormatError("snapshot table", at, f"entry {i} ends {end} bytes into the table, past QEMU's "
                              f"limit of {MAX_TABLE_BYTES}")
        if end > len(buf):
            if short:
                raise MoreNeeded(end)
            raise FormatError("snapshot table", at, f"entry {i} runs past the end of the file")
        if l1off % cluster_size:
            raise FormatError("snapshot table", at, f"entry {i} L1 offset {l1off:#x} is not cluster aligned")
        if l1off + 8 * l1size > file_size:
            raise FormatError("snapshot table", at, f"entry {i} L1 table lies past the end of the file")
        extra = bytes(buf[pos + FIXED:pos + FIXED + extrasz])
        disk_size = struct.unpack_from(">Q", extra, 8)[0] if extrasz >= 16 else None
        icount = struct.unpack_from(">Q", extra, 16)[0] if extrasz >= 24 else None
        p = pos + FIXED + extrasz
        raw_id, raw_name = bytes(buf[p:p + idsz]), bytes(buf[p + idsz:p + idsz + namesz])
        out.append(Snapshot(l1off, l1size, raw_id.decode("utf-8", "replace"), raw_name.decode("utf-8", "replace"),
                            dsec, dnsec, vmclk, vmsz, disk_size, icount, extra, at, raw_id, raw_name))
        pos = (end + 7) & ~7
    return tuple(out)

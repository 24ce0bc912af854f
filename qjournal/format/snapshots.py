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

    def pack(self) -> bytes:
        idb, nameb = self.id.encode(), self.name.encode()
        raw = struct.pack(">QIHHIIQII", self.l1_table_offset, self.l1_size, len(idb), len(nameb),
                          self.date_sec, self.date_nsec, self.vm_clock_nsec, self.vm_state_size,
                          len(self.extra)) + self.extra + idb + nameb
        return raw + bytes(-len(raw) % 8)


def parse_snapshots(buf: bytes, offset: int, nb: int, cluster_size: int, file_size: int) -> tuple[Snapshot, ...]:
    out: list[Snapshot] = []
    pos = 0
    for i in range(nb):
        at = offset + pos
        if pos + FIXED > len(buf):
            raise FormatError("snapshot table", at, f"entry {i} runs past the end of the file")
        (l1off, l1size, idsz, namesz, dsec, dnsec, vmclk, vmsz, extrasz) = struct.unpack_from(">QIHHIIQII", buf, pos)
        if extrasz > MAX_EXTRA:
            raise FormatError("snapshot table", at + 36, f"entry {i} extra data of {extrasz} bytes exceeds {MAX_EXTRA}")
        end = pos + FIXED + extrasz + idsz + namesz
        if end > len(buf):
            raise FormatError("snapshot table", at, f"entry {i} runs past the end of the file")
        if l1off % cluster_size:
            raise FormatError("snapshot table", at, f"entry {i} L1 offset {l1off:#x} is not cluster aligned")
        if l1off + 8 * l1size > file_size:
            raise FormatError("snapshot table", at, f"entry {i} L1 table lies past the end of the file")
        extra = bytes(buf[pos + FIXED:pos + FIXED + extrasz])
        disk_size = struct.unpack_from(">Q", extra, 8)[0] if extrasz >= 16 else None
        icount = struct.unpack_from(">Q", extra, 16)[0] if extrasz >= 24 else None
        p = pos + FIXED + extrasz
        sid = bytes(buf[p:p + idsz]).decode("utf-8", "replace")
        name = bytes(buf[p + idsz:p + idsz + namesz]).decode("utf-8", "replace")
        out.append(Snapshot(l1off, l1size, sid, name, dsec, dnsec, vmclk, vmsz, disk_size, icount, extra, at))
        pos = (end + 7) & ~7
    return tuple(out)

"""The LUKS1 header of a qcow2 image encrypted with ``encrypt.format=luks``.

It lives in clusters named by the full disk encryption header extension (u64 offset,
u64 length). Layout (big-endian)::

    0    6   magic "LUKS\\xba\\xbe"        104  u32 payload offset (512-byte sectors)
    6    u16 version (1)                 108  u32 key bytes
    8    32  cipher name                 164  u32 master key digest iterations
    40   32  cipher mode                 168  40  UUID
    72   32  hash spec                   208  8 key slots of 48 bytes:
                                              u32 active, u32 iterations, 32 salt,
                                              u32 key material offset (sectors), u32 stripes
"""
from __future__ import annotations

import struct
from typing import Any

from ..errors import FormatError
from .geometry import SECTOR

MAGIC = b"LUKS\xba\xbe"
SLOT_ACTIVE = 0x00AC71F3
HEADER_SIZE = 208 + 8 * 48


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def luks_info(buf: bytes, offset: int) -> dict[str, Any]:
    """What qemu-img info reports as ``format-specific.data.encrypt`` for a LUKS header."""
    if len(buf) < HEADER_SIZE or buf[:6] != MAGIC:
        raise FormatError("LUKS header", offset, "bad magic or header shorter than 592 bytes")
    cipher, mode, hash_spec = _text(buf[8:40]), _text(buf[40:72]), _text(buf[72:104])
    payload, key_bytes = struct.unpack_from(">II", buf, 104)
    mk_iters = struct.unpack_from(">I", buf, 164)[0]
    uuid = _text(buf[168:208])
    mode_name, _, ivgen = mode.partition("-")
    ivgen_alg, _, ivgen_hash = ivgen.partition(":")
    bits = (key_bytes // 2 if mode_name == "xts" else key_bytes) * 8
    out: dict[str, Any] = {"ivgen-alg": ivgen_alg}
    if ivgen_hash:
        out["ivgen-hash-alg"] = ivgen_hash
    out.update({"hash-alg": hash_spec, "cipher-alg": f"{cipher}-{bits}", "uuid": uuid, "format": "luks",
                "cipher-mode": mode_name})
    slots = []
    for i in range(8):
        active, iters = struct.unpack_from(">II", buf, 208 + 48 * i)
        key_off, stripes = struct.unpack_from(">II", buf, 208 + 48 * i + 40)
        if active == SLOT_ACTIVE:
            slots.append({"active": True, "iters": iters, "key-offset": key_off * SECTOR, "stripes": stripes})
        else:
            slots.append({"active": False, "key-offset": key_off * SECTOR})
    out.update({"slots": slots, "payload-offset": payload * SECTOR, "master-key-iters": mk_iters})
    return out

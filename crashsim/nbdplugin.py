"""The nbdkit Python plugin (API v2) behind ``crashsim record``: serve a file, log every request.

Loaded by nbdkit, not imported by crashsim::

    nbdkit -f -U SOCK python crashsim/nbdplugin.py file=EXPORT log=TRACE

``file`` is the exported file (a private copy of the image with spare room at its end);
``log`` is the trace file, opened for appending: each connection, ``pwrite``, ``flush``, ``trim`` and
``zero`` appends one record in the binary layout of :mod:`crashsim.trace` (a 17-byte
``<cQQ`` head: kind, offset, length; a write's data follows its head). The records are
appended in the order nbdkit hands the requests over: the plugin is single-threaded
(``THREAD_MODEL_SERIALIZE_ALL_REQUESTS``) so that order is total. Nothing is fsynced: the
log is buffered and flushed at each NBD flush and when the connection closes; the
exported file only needs to serve reads back.

This module imports only the standard library and ``nbdkit`` (which exists only inside
nbdkit), so nbdkit's embedded interpreter loads it without crashsim on its path.
"""
import builtins
import os
import struct
from typing import Any

import nbdkit

API_VERSION = 2

HEAD = struct.Struct("<cQQ")          # kept equal to crashsim.trace.HEAD (tested)
WRITE, FUA_WRITE, FLUSH, TRIM, ZERO, OPEN = b"W", b"U", b"F", b"T", b"Z", b"O"

Handle = dict[str, Any]

config_: dict[str, str] = {}
state: dict[str, Any] = {}


def config(key: str, value: str) -> None:
    if key not in ("file", "log"):
        raise RuntimeError(f"unknown parameter {key}")
    config_[key] = value


def config_complete() -> None:
    missing = [k for k in ("file", "log") if k not in config_]
    if missing:
        raise RuntimeError(f"missing parameter(s) {', '.join(missing)}=")


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS)


def open(readonly: bool) -> Handle:
    fd = os.open(config_["file"], os.O_RDWR)
    log = state.get("log")
    if log is None:
        log = state["log"] = builtins.open(config_["log"], "ab", buffering=1 << 20)
    log.write(HEAD.pack(OPEN, 0, 0))
    return {"fd": fd, "size": os.fstat(fd).st_size, "log": log}


def close(h: Handle) -> None:
    h["log"].flush()
    os.close(h["fd"])


def get_size(h: Handle) -> int:
    return int(h["size"])


def can_write(h: Handle) -> bool:
    return True


def can_flush(h: Handle) -> bool:
    return True


def can_trim(h: Handle) -> bool:
    return True


def can_zero(h: Handle) -> bool:
    return True


def can_fast_zero(h: Handle) -> bool:
    return False


def can_fua(h: Handle) -> int:
    return int(nbdkit.FUA_NATIVE)


def can_multi_conn(h: Handle) -> bool:
    return False


def pread(h: Handle, buf: Any, offset: int, flags: int) -> None:
    n = os.preadv(h["fd"], [buf], offset)
    if n < len(buf):
        buf[n:] = bytes(len(buf) - n)


def pwrite(h: Handle, buf: Any, offset: int, flags: int) -> None:
    os.pwrite(h["fd"], buf, offset)
    kind = FUA_WRITE if flags & nbdkit.FLAG_FUA else WRITE
    log = h["log"]
    log.write(HEAD.pack(kind, offset, len(buf)))
    log.write(buf)


def flush(h: Handle, flags: int) -> None:
    h["log"].write(HEAD.pack(FLUSH, 0, 0))
    h["log"].flush()


def trim(h: Handle, count: int, offset: int, flags: int) -> None:
    _zero_range(h, offset, count)
    h["log"].write(HEAD.pack(TRIM, offset, count))
    if flags & nbdkit.FLAG_FUA:
        h["log"].write(HEAD.pack(FLUSH, offset, count))


def zero(h: Handle, count: int, offset: int, flags: int) -> None:
    _zero_range(h, offset, count)
    h["log"].write(HEAD.pack(ZERO, offset, count))
    if flags & nbdkit.FLAG_FUA:
        h["log"].write(HEAD.pack(FLUSH, offset, count))


def _zero_range(h: Handle, offset: int, count: int) -> None:
    chunk = bytes(min(count, 1 << 20))
    end = offset + count
    while offset < end:
        n = min(len(chunk), end - offset)
        os.pwrite(h["fd"], chunk[:n], offset)
        offset += n

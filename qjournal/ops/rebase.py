"""Change an image's backing file, as ``qemu-img rebase`` does (qemu-img.c ``img_rebase``).

``rebase -u`` (unsafe) changes only the header: the backing file name and the backing
format extension, in one journaled header switch (``Transaction.set_backing``; the
ordering planner places a new name after the old one and switches the header's offset
and size to it in one sector write).

Safe mode keeps what the guest sees: for every range where the image has no data of
its own (unallocated in it), the old backing chain and the new one are read and
compared, one cluster at a time; every piece where they differ gets the old chain's
bytes written into the image. Then the header switches. The copies go in journaled
transactions of at most :data:`BATCH` bytes, the last of which also switches the
header: a crash before that leaves the old backing file and guest data unchanged
(the copies hold what the old chain held there).

Refused, before anything is written, with one line: a new backing file whose chain
leads back to the image (a loop), a missing ``-F`` (as qemu-img 7.2 requires), and in
safe mode a new backing file that cannot be opened.
"""
from __future__ import annotations

import os
from typing import Callable

from ..core.image import Image
from ..errors import UsageError
from ..read.guest import UNALLOCATED, GuestReader, Layer, RawFile, reader, resolve
from ..write import data
from .commit import chain

BATCH = 64 << 20
"""Bytes copied into the image per journaled transaction."""


def _check_loop(img: Image, path: str, fmt: str) -> None:
    """Refuse a new backing file whose chain contains ``img``."""
    me = os.path.realpath(img.path)
    if os.path.realpath(path) == me:
        raise UsageError(f"{img.path}: cannot be its own backing file")
    if fmt != "qcow2" or not os.path.exists(path):
        return
    below = Image(path, "r", take_locks=False)
    try:
        for p, _ in chain(below):
            if os.path.realpath(p) == me:
                raise UsageError(f"{img.path}: rebasing onto {path!r} would make a backing chain loop "
                                 f"({path!r} already has {img.path!r} in its chain)")
    finally:
        below.close()


def _open(path: str, fmt: str) -> tuple[Layer, Image | None]:
    if fmt == "raw":
        return RawFile(path), None
    if fmt != "qcow2":
        raise UsageError(f"-F {fmt}: qjournal reads qcow2 and raw backing files only")
    try:
        im = Image(path, "r")
    except FileNotFoundError:
        raise UsageError(f"could not open new backing file {path!r}: no such file") from None
    return GuestReader(im), im


def _read(layer: Layer | None, off: int, n: int) -> bytes:
    """``n`` bytes of a backing chain at ``off``; zeros past its end, or without one."""
    buf = bytearray(n)
    if layer is not None:
        avail = max(0, min(n, layer.size - off))
        if avail:
            layer.readinto(off, memoryview(buf)[:avail])
    return bytes(buf)


def differences(img: Image, new: Layer | None) -> list[tuple[int, int]]:
    """The pieces (offset, length) where ``img`` has no data of its own and the old and
    the new backing chains differ, at most one cluster each."""
    r = reader(img)
    old = r.backing
    cs = img.header.cluster_size
    out: list[tuple[int, int]] = []
    for g, n, kind, _ in r.runs(0, img.header.size):
        if kind != UNALLOCATED:
            continue
        off = g
        while off < g + n:
            stop = min(g + n, (off // cs + 1) * cs)
            if _read(old, off, stop - off) != _read(new, off, stop - off):
                out.append((off, stop - off))
            off = stop
    return out


def rebase(img: Image, backing: str, fmt: str | None, unsafe: bool = False,
           progress: Callable[[int, int], None] | None = None) -> int:
    """``qemu-img rebase [-u] -b BACKING -F FMT``; ``backing`` "" removes the backing file.
    Returns the bytes copied into ``img``."""
    if not img.writable:
        raise UsageError(f"{img.path}: open the image writable to rebase it")
    name = backing.encode("utf-8", "surrogateescape") if backing else None
    if name is not None and fmt is None:
        raise UsageError(f"could not change the backing file to {backing!r}: backing format must be "
                         "specified (-F)")
    if name is None and fmt is not None:
        raise UsageError("-F without a backing file (-b \"\" removes the backing file)")
    path = resolve(img.path, backing) if backing else None
    if path is not None:
        assert fmt is not None
        _check_loop(img, path, fmt)
    pieces: list[tuple[int, int]] = []
    new_image: Image | None = None
    if not unsafe:
        new: Layer | None = None
        if path is not None:
            assert fmt is not None
            new, new_image = _open(path, fmt)
        try:
            pieces = differences(img, new)
        finally:
            if new is not None:
                new.close()
            if new_image is not None:
                new_image.close()
    total = sum(n for _, n in pieces)
    done = 0
    i = 0
    while True:
        with img.transaction(f"rebase onto {backing!r}") as tx:
            batch = 0
            old = reader(img).backing     # made anew after each commit (the header reloads)
            while i < len(pieces) and batch < BATCH:
                off, n = pieces[i]
                # The old chain's bytes, where the new chain would show others.
                data.write(img, off, _read(old, off, n))
                batch += n
                i += 1
            done += batch
            if i == len(pieces):
                tx.set_backing(name, fmt)
        if progress is not None:
            progress(done, total)
        if i == len(pieces):
            return done

"""QEMU's image locks, so that qjournal and a running QEMU never write one image at once.

QEMU (block/file-posix.c) takes OFD byte-range read locks on byte ``100 + bit`` for
each permission it uses and on byte ``200 + bit`` for each permission it does not
share with others. Before it takes them it checks the opposite bytes: someone
using a permission we do not share, or not sharing one we use, is a conflict. We
take the same bytes with the same meaning, so QEMU refuses us and we refuse QEMU.
"""
from __future__ import annotations

import fcntl
import os
import struct

from ..errors import LockError

PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
PERM_NAMES = {PERM_CONSISTENT_READ: "consistent read", PERM_WRITE: "write",
              PERM_WRITE_UNCHANGED: "write unchanged", PERM_RESIZE: "resize"}
ALL_PERMS = tuple(PERM_NAMES)
LOCK_BASE_PERM = 100
LOCK_BASE_SHARED = 200
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = "hhqqi4x"  # struct flock on Linux x86_64/aarch64: type, whence, start, len, pid


def _lock(fd: int, byte: int) -> bool:
    req = struct.pack(_FLOCK, fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0)
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, req)
    except OSError:
        return False
    return True


def _held_by_other(fd: int, byte: int) -> bool:
    req = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
    res = fcntl.fcntl(fd, _F_OFD_GETLK, req)
    return struct.unpack(_FLOCK, res)[0] != fcntl.F_UNLCK


def writer_present(path: str) -> bool:
    """Whether another process holds ``path`` open for writing (QEMU's write permission
    byte). A query that takes no lock, so it cannot make a QEMU starting beside it fail."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _held_by_other(fd, LOCK_BASE_PERM + PERM_WRITE)
    finally:
        os.close(fd)


def acquire(fd: int, path: str, writable: bool) -> None:
    """Take QEMU's locks for a reader (``writable=False``) or a writer.

    A reader uses consistent read and shares everything but write, as ``qemu-img
    info`` does; a writer uses read, write and resize and shares none of them.
    """
    used = {PERM_CONSISTENT_READ} | ({PERM_WRITE, PERM_RESIZE} if writable else set())
    unshared = {PERM_WRITE, PERM_RESIZE} if writable else {PERM_WRITE}
    # Take first, then check, as block/file-posix.c does (raw_apply_lock_bytes, then
    # raw_check_lock_bytes): two processes that start together each see the other's
    # lock in the check, so at most one of them goes on. Checking first would let both
    # pass their checks before either holds anything.
    for byte in sorted({LOCK_BASE_PERM + p for p in used} | {LOCK_BASE_SHARED + p for p in unshared}):
        if not _lock(fd, byte):
            raise LockError(f"{path}: could not lock byte {byte}", structure="image lock", offset=byte,
                            rule="lock byte could not be taken", path=path)
    for perm in sorted(used):
        if _held_by_other(fd, LOCK_BASE_SHARED + perm):
            raise LockError(f"{path}: failed to get \"{PERM_NAMES[perm]}\" lock: another process "
                            "(QEMU?) has the image open and does not share it", structure="image lock",
                            offset=LOCK_BASE_SHARED + perm, rule="permission not shared by another holder",
                            path=path)
    for perm in sorted(unshared):
        if _held_by_other(fd, LOCK_BASE_PERM + perm):
            raise LockError(f"{path}: failed to get shared \"{PERM_NAMES[perm]}\" lock: another "
                            "process (QEMU?) is using the image", structure="image lock",
                            offset=LOCK_BASE_PERM + perm, rule="permission used by another holder", path=path)

"""Copy a range of the guest disk into a regular file, as ``qemu-img convert -O raw`` writes it.

The range is walked by runs of the allocation map (:meth:`GuestReader.runs`):

- data clusters of the image file itself go over with ``copy_file_range``, from the
  image's file to the output's, without passing through this process;
- zero clusters, and unallocated ranges of an image without a backing file, are left as
  holes (the output is cut to its full length at the end, so they read as zeros);
- everything else (compressed clusters, a backing chain, an external data file) is read
  through the guest reader and written with ``pwrite``, a window at a time.

A file system without ``copy_file_range`` for these two files (or an older kernel)
falls back to ``pread``/``pwrite``. Memory stays bounded by one window.
"""
from __future__ import annotations

import errno
import os

from ..core.image import Image
from ..storage.medium import pwrite_all
from .guest import DATA, UNALLOCATED, ZERO, reader

WINDOW = 8 << 20
"""Bytes copied per system call (and the most read into memory at once)."""


def copy_out(img: Image, offset: int, length: int, fd: int) -> None:
    """Write the guest bytes ``[offset, offset + length)`` of ``img`` into the regular file
    ``fd`` at ``0 .. length`` (its old contents past that cut away). O(runs + bytes of data)."""
    r = reader(img)
    src = getattr(img.medium, "fd", None)
    direct = src is not None and not r.encrypted and not r.has_data_file
    holes_read_zero = img.backing_name is None
    if os.fstat(fd).st_size:
        # Only a file with old contents: ext4 (auto_da_alloc) writes back on close a file
        # that was cut to 0 bytes, half a second per GiB copied, which qemu-img's fresh
        # output does not pay. A file opened with O_TRUNC is empty already.
        os.ftruncate(fd, 0)
    for g, n, kind, host in r.runs(offset, offset + length):
        dst = g - offset
        if kind == ZERO or (kind == UNALLOCATED and holes_read_zero):
            continue
        if kind == DATA and direct:
            assert src is not None
            _copy_range(src, fd, host, dst, n)
            continue
        for pos in range(g, g + n, WINDOW):
            data = r.read(pos, min(WINDOW, g + n - pos))
            pwrite_all(fd, data, pos - offset)
    os.ftruncate(fd, length)


def _copy_range(src: int, dst: int, src_off: int, dst_off: int, n: int) -> None:
    done = 0
    while done < n:
        want = min(WINDOW, n - done)
        try:
            got = os.copy_file_range(src, dst, want, src_off + done, dst_off + done)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            got = 0
        if got <= 0:
            # No copy_file_range here (or the source ended early): copy by hand.
            data = os.pread(src, want, src_off + done)
            if len(data) < want:
                data += bytes(want - len(data))        # past the image's end: zeros, as the guest reads
            pwrite_all(dst, data, dst_off + done)
            got = want
        done += got

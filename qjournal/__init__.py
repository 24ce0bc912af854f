"""qjournal: a pure-Python qcow2 editor whose metadata changes go through a write-ahead journal.

    import qjournal
    with qjournal.open("disk.qcow2", "r+") as img:
        img.bitmaps.add("backup-1", granularity=65536)
        with img.transaction():           # several operations, one atomic unit
            img.bitmaps.clear("backup-0")
            img.bitmaps.enable("backup-1")
"""
from __future__ import annotations

import os
from typing import Any

from .errors import (BitmapError, FormatError, JournalError, LockError, QcowError, UnsupportedError,
                     UsageError)
from .api import Image, ImageInfo
from .ops.create import CreateOptions, create_image

__all__ = ["open", "create", "Image", "ImageInfo", "QcowError", "FormatError", "UsageError", "BitmapError",
           "LockError", "JournalError", "UnsupportedError"]
__version__ = "0.1.0"


def open(path: str | os.PathLike[str], mode: str = "r") -> Image:  # noqa: A001 - mirrors builtins.open
    """Open an image: ``mode`` is ``"r"`` (read-only) or ``"r+"`` (read-write).

    A writable open takes QEMU's image locks and first recovers the journal.
    Use it as a context manager.
    """
    return Image(path, mode)


def create(path: str | os.PathLike[str], size: int | None, **options: Any) -> Image:
    """Create an image as ``qemu-img create -f qcow2 -o ...`` does and open it read-write.

    ``options`` are the fields of :class:`qjournal.create.CreateOptions`
    (compat, cluster_size, refcount_bits, lazy_refcounts, extended_l2,
    compression_type, backing_file, backing_fmt, data_file, data_file_raw).
    """
    create_image(os.fspath(path), size, CreateOptions(**options))
    return Image(path, "r+")

"""qjournal: a pure-Python qcow2 editor whose metadata changes go through a write-ahead journal.

    import qjournal
    with qjournal.open("disk.qcow2", "r+") as img:
        img.bitmaps.add("backup-1", granularity=65536)
        with img.transaction():           # several operations, one atomic unit
            img.bitmaps.clear("backup-0")
            img.bitmaps.enable("backup-1")
"""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from .errors import (BitmapError, FormatError, JournalError, LockError, QcowError, UnsupportedError,
                     UsageError)

if TYPE_CHECKING:
    from .api import Image, ImageInfo
    from .ops.create import CreateOptions

_FACADE = {"Image": "api", "ImageInfo": "api", "CreateOptions": "ops.create"}
"""What the package names from its layers, and the module each comes from. They are
imported when first named (PEP 562), not when the package is: ``qjournal COMMAND``
imports the package first, and a command loads only the layers it uses (``info`` never
needs the operations). ``qjournal.Image`` and ``from qjournal import Image`` work as
before."""


def __getattr__(name: str) -> Any:
    if name not in _FACADE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_FACADE[name]}"), name)
    globals()[name] = value
    return value

__all__ = ["open", "create", "Image", "ImageInfo", "CreateOptions", "QcowError", "FormatError", "UsageError", "BitmapError",
           "LockError", "JournalError", "UnsupportedError"]
__version__ = "0.1.0"


def open(path: str | os.PathLike[str], mode: str = "r") -> Image:  # noqa: A001 - mirrors builtins.open
    """Open an image: ``mode`` is ``"r"`` (read-only) or ``"r+"`` (read-write).

    A writable open takes QEMU's image locks and first recovers the journal.
    Use it as a context manager.
    """
    image: type[Image] = __getattr__("Image")
    return image(path, mode)


def create(path: str | os.PathLike[str], size: int | None, **options: Any) -> Image:
    """Create an image as ``qemu-img create -f qcow2 -o ...`` does and open it read-write.

    ``options`` are the fields of :class:`qjournal.CreateOptions`
    (compat, cluster_size, refcount_bits, lazy_refcounts, extended_l2,
    compression_type, backing_file, backing_fmt, data_file, data_file_raw).
    """
    ops = importlib.import_module(f"{__name__}.ops.create")
    ops.create_image(os.fspath(path), size, ops.CreateOptions(**options))
    return open(path, "r+")

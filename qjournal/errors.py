"""One hierarchy of errors, rooted at :class:`QcowError`.

Every error names what it found broken, both in its one-line message (which the
command line prints) and in structured fields a program can test:

=============  ==============================================================
``structure``  the on-disk structure (``"L2 table"``, ``"journal record"``), or None
``offset``     the byte offset of the structure or the broken field, or None
``rule``       the rule broken, in words, or None
``path``       the file concerned, or None
=============  ==============================================================

>>> e = FormatError("L1 table", 0x30000, "entry 3 is unaligned", path="disk.qcow2")
>>> str(e), e.structure, hex(e.offset), e.path
('L1 table at offset 0x30000: entry 3 is unaligned', 'L1 table', '0x30000', 'disk.qcow2')
"""
from __future__ import annotations


class QcowError(Exception):
    """Base of every error qjournal raises."""

    exit_code = 1

    def __init__(self, message: str = "", *, structure: str | None = None, offset: int | None = None,
                 rule: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.structure = structure
        self.offset = offset
        self.rule = rule if rule is not None else (message or None)
        self.path = path

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in (("structure", self.structure), ("offset", self.offset),
                                                     ("path", self.path)) if v is not None)
        return f"{type(self).__name__}({str(self)!r}{', ' if fields else ''}{fields})"


class FormatError(QcowError, ValueError):
    """An on-disk structure breaks a rule of the qcow2 specification."""

    def __init__(self, structure: str, offset: int | None, rule: str, *, path: str | None = None) -> None:
        where = f" at offset {offset:#x}" if offset is not None else ""
        super().__init__(f"{structure}{where}: {rule}", structure=structure, offset=offset, rule=rule, path=path)


class UnsupportedError(QcowError):
    """A valid image uses something qjournal does not handle (yet)."""


class UsageError(QcowError, ValueError):
    """A request that cannot be carried out on this image as asked."""


class ImageNotFoundError(UsageError, FileNotFoundError):
    """The image (or a file it names) does not exist."""


class BitmapError(UsageError):
    """A bitmap operation was refused (name, granularity, limits, state)."""


class LockError(QcowError):
    """Another process (QEMU or qjournal) holds the image."""


class JournalError(QcowError):
    """The sidecar journal cannot be trusted for this image."""


class StaleJournalWarning(UserWarning):
    """A read-only open found a journal that no longer matches the image (the binding
    check failed): the image is shown as it stands on disk."""

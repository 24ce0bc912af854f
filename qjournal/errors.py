"""One hierarchy of errors, rooted at :class:`QcowError`.

Every error names the structure, the offset and the rule it found broken, so that
the command line can print it as one line and exit non-zero.
"""
from __future__ import annotations


class QcowError(Exception):
    """Base of every error qjournal raises."""

    exit_code = 1


class FormatError(QcowError, ValueError):
    """An on-disk structure breaks a rule of the qcow2 specification."""

    def __init__(self, structure: str, offset: int | None, rule: str) -> None:
        self.structure = structure
        self.offset = offset
        self.rule = rule
        where = f" at offset {offset:#x}" if offset is not None else ""
        super().__init__(f"{structure}{where}: {rule}")


class UnsupportedError(QcowError):
    """A valid image uses something qjournal does not handle (yet)."""


class UsageError(QcowError, ValueError):
    """A request that cannot be carried out on this image as asked."""


class BitmapError(UsageError):
    """A bitmap operation was refused (name, granularity, limits, state)."""


class LockError(QcowError):
    """Another process (QEMU or qjournal) holds the image."""


class JournalError(QcowError):
    """The sidecar journal cannot be trusted for this image."""

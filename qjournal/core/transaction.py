"""The public transaction: what one atomic change of an image declares before it commits.

``with img.transaction() as tx:`` opens one (nested calls join it). Operations never
write the image themselves: they declare, and the commit orders what they declared
(:mod:`qjournal.core.ordering`) and hands it to the journal.

What a transaction holds, and who fills it:

==================  =================================================================
``alloc``           the allocator: new clusters (``alloc.alloc``), refcount changes
                    and frees, turned into the refcount phases at commit
``entries``         the bitmap directory as staged (a list of
                    :class:`~qjournal.format.bitmaps.DirectoryEntry`)
``write_new``       bytes for clusters this transaction allocated; made durable
                    before the commit (ordered mode) and invisible until it
``stage``           metadata writes of one declared phase (L2/L1 entries, bitmap
                    bits, COPIED flags, the tail of a shrink)
``set_header``      header fields the header switch changes (size, L1 table, ...)
``set_backing``     a new backing file name and format (or none), switched with the
                    header (rebase)
``clear_incompatible``  incompatible feature bits the commit clears (dirty, corrupt)
``rewrite_directory_in_place``  ask for the seed protocol even if nothing else changed
``guest``           the staged guest mapping, set by the write layer (or None)
``atomic_data``     True (the default, a user's ``with img.transaction():``): guest
                    data is all-or-nothing too, overwrites go into new clusters.
                    False for the write layer's own transaction of one write or of
                    a ``GuestDisk`` batch: overwrites go in place, as in QEMU
==================  =================================================================

An exception inside the ``with`` block commits nothing: the image keeps its old
state, and clusters written past the old end of the file are given back.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from ..format.lazy import np
from ..format import bitmaps as bm
from ..storage.medium import Medium
from ..storage.overlay import OverlayMedium
from .allocator import Allocator
from .ordering import DECLARED, Phase

Write = tuple[int, bytes]
CommitObserver = Callable[[str, str], None]
"""Called as ``observer(event, description)`` with event ``"begin"`` before a commit
writes anything and ``"end"`` after it (applied, or failed)."""


class Transaction:
    """One atomic change being declared. Made by :meth:`Image.transaction`, not directly."""

    def __init__(self, medium: Medium, alloc: Allocator, entries: list[bm.DirectoryEntry],
                 description: str) -> None:
        self.medium = medium
        self.alloc = alloc
        self.entries = entries
        self.descriptions = [description]
        self.new_writes: list[tuple[int, Any]] = []   # (offset, bytes or uint8 array)
        self.header_fields: dict[str, int] = {}
        self.backing: tuple[bytes | None, str | None] | None = None
        self.incompatible_cleared = 0
        self.in_place_directory = False
        self.guest: Any = None
        self.atomic_data = True
        self.committed = False
        self.repairing = False      # check -r: may write where a damaged structure makes a bogus claim
        self._declared: dict[Phase, list[Write]] = {}

    def __repr__(self) -> str:
        return (f"<qjournal Transaction {self.description!r}: {len(self.new_writes)} new writes, "
                f"{sum(map(len, self._declared.values()))} staged writes, committed={self.committed}>")

    @property
    def description(self) -> str:
        """What the transaction does, as the journal records it."""
        return "; ".join(self.descriptions)

    def write_new(self, off: int, data: Any) -> None:
        """Stage bytes for clusters this transaction allocated (``alloc.alloc``).

        Nothing reaches the file before commit, so a refused transaction leaves the
        image byte-identical; :attr:`reader` sees the staged bytes.
        """
        if not isinstance(data, (bytes, np.ndarray)):
            data = bytes(data)
        self.new_writes.append((off, data))

    def stage(self, phase: Phase, writes: Iterable[Write]) -> None:
        """Add metadata writes (after-images) to one of the declared phases."""
        if phase not in DECLARED:
            raise ValueError(f"phase {phase.value} is derived by the planner, not declared")
        self._declared.setdefault(phase, []).extend(writes)

    def declared(self) -> dict[Phase, list[Write]]:
        """The writes staged per declared phase so far."""
        return self._declared

    def set_header(self, **fields: int) -> None:
        """Header fields (names of :class:`~qjournal.format.header.Header`) the commit switches."""
        self.header_fields.update(fields)

    def set_backing(self, name: bytes | None, fmt: str | None) -> None:
        """A new backing file name and format (None: no backing file, or no format
        extension), switched in by the header write (see :func:`qjournal.core.ordering.plan`)."""
        if name is None and fmt is not None:
            raise ValueError("a backing format without a backing file")
        self.backing = (name, fmt)

    def clear_incompatible(self, bits: int) -> None:
        """Incompatible feature bits (dirty, corrupt) the header switch clears."""
        self.incompatible_cleared |= bits

    def rewrite_directory_in_place(self) -> None:
        """Rewrite the bitmap directory under the seed protocol even if no entry changed."""
        self.in_place_directory = True

    @property
    def reader(self) -> Medium:
        """The image as this transaction sees it: the file plus the staged new clusters."""
        return OverlayMedium(self.medium, self.new_writes) if self.new_writes else self.medium

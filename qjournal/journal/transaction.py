"""Transactions: what a caller builds, and what the journal reads back.

A :class:`Transaction` is a builder: ordered *steps*, each a set of byte-range writes
(after-images). The journal applies the steps in order with a write barrier between
them; inside a step the writes may reach the disk in any order.
"""
from __future__ import annotations

from typing import Union

import attrs

Buffer = Union[bytes, bytearray, memoryview]


@attrs.frozen
class Step:
    """One step of a transaction: its name (a mark in the write sequence) and its
    writes, sorted by offset and pairwise disjoint and non-adjacent."""

    name: str
    writes: list[tuple[int, bytes]]


@attrs.frozen(eq=False)
class PendingTransaction:
    """A transaction as read back from the journal (or just committed to it).

    ``steps`` hold the after-images as the journal recorded them: each write covers
    whole 512-byte pieces of the image (see the package docstring).
    ``checksums[i][j]`` are the before-image CRC32Cs of ``steps[i].writes[j]``, one
    per 512-byte piece.
    """

    txid: int
    description: str
    steps: list[Step]
    checksums: list[list[tuple[int, ...]]]

    @property
    def writes(self) -> list[tuple[int, bytes]]:
        """Every after-image in apply order."""
        return [w for step in self.steps for w in step.writes]


class Transaction:
    """A builder of ordered steps of writes.

    >>> tx = Transaction("demo")
    >>> tx.step("first")
    >>> tx.write(0, b"ab"); tx.write(2, b"cd"); tx.write(1, b"X")
    >>> tx.steps
    [Step(name='first', writes=[(0, b'aXcd')])]
    """

    def __init__(self, description: str = "") -> None:
        self.description = description
        self._steps: list[tuple[str, list[tuple[int, bytes]]]] = []

    def step(self, name: str) -> None:
        """Start a new step; the writes that follow belong to it. O(1)."""
        self._steps.append((name, []))

    def write(self, off: int, data: Buffer) -> None:
        """Add an after-image to the current step. O(1); ``data`` is copied.

        Writes of one step that overlap or touch are merged (the later write wins
        where they overlap).
        """
        if not self._steps:
            raise ValueError("call tx.step(name) before tx.write(off, data)")
        if off < 0:
            raise ValueError(f"write at negative offset {off}")
        if len(data):
            self._steps[-1][1].append((off, bytes(data)))

    @property
    def steps(self) -> list[Step]:
        """The steps with their writes merged and sorted. O(w log w) for w writes."""
        return [Step(name, _merge(writes)) for name, writes in self._steps]

    @property
    def empty(self) -> bool:
        """True when no step writes anything (committing it does nothing). O(steps)."""
        return not any(writes for _, writes in self._steps)


def _merge(writes: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """Sorted writes, overlapping or adjacent ones merged, later data winning."""
    order = sorted(range(len(writes)), key=lambda i: writes[i][0])
    groups: list[list[int]] = []
    end = -1
    for i in order:
        off, data = writes[i]
        if groups and off <= end:
            groups[-1].append(i)
            end = max(end, off + len(data))
        else:
            groups.append([i])
            end = off + len(data)
    out = []
    for g in groups:
        if len(g) == 1:
            out.append(writes[g[0]])
            continue
        start = writes[g[0]][0]
        buf = bytearray(max(writes[i][0] + len(writes[i][1]) for i in g) - start)
        for i in sorted(g):           # call order: the later write wins
            off, data = writes[i]
            buf[off - start:off - start + len(data)] = data
        out.append((start, bytes(buf)))
    return out

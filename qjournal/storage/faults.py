"""Fault injection: a medium that fails the Nth write, flush or resize of a named event.

QEMU's ``blkdebug`` driver fails the I/O that follows a named event (``l2_update``,
``refblock_alloc``, ``flush_to_disk``, ...). :class:`FaultMedium` does the same for
qjournal: it wraps a :class:`~qjournal.storage.medium.Medium` (the image, or the
journal file) and raises :class:`~qjournal.storage.medium.MediumError` with EIO, ENOSPC
or any errno, as the operating system would, at the operation a :class:`Fault` names.
Nothing is written by the operation that fails. It serves tests (``tests/test_faults.py``
fails every operation of every event of every image operation) and anyone who wants to
see what their tool does when the disk fails::

    faults = Injector([Fault("l1_update", errno=errno.ENOSPC)])
    image = faults.medium(MmapMedium(path, True))
    journal = faults.medium(FileMedium(path + ".qjournal", True, create=True), flush_event=JOURNAL_SYNC)
    with qjournal.api.Image(path, "r+", medium=image, journal_medium=journal) as img:
        img.resize(8 << 30)        # raises MediumError at the L1 update

**Which operation belongs to which event.** Code that writes announces what follows
with ``medium.event(name)`` (see :mod:`qjournal.storage.medium`): the journal announces
each step by its name (a :class:`qjournal.core.ordering.Phase` value, turned into an
event by :data:`STEP_EVENTS`) and its own records (``journal_write``, ``checkpoint``);
the core image announces the new clusters it writes before a commit
(``cluster_alloc``). A write or resize belongs to the event its medium announced last,
until that medium's next flush; one with no event announced since (guest data written
while a transaction is open, in-place data after the commit) belongs to ``write_aio``.
A flush belongs to the medium's flush event: ``flush_to_disk`` for the image,
``journal_sync`` for the journal file (``flush_event=``). Reads never fail here.

**QEMU's events** (``BlkdebugEvent`` in ``qapi/block-core.json``) and where each lands:

===========================  ====================================================  ==========================
QEMU event                   what qjournal does there                              qjournal event
===========================  ====================================================  ==========================
l1_update                    L1 entries in place: step ``l1-updated``              l1_update
l1_grow_alloc_table          clusters for a new L1 table: staged, no I/O; their    refblock_update
                             refcounts go up in ``refcounts-increased``
l1_grow_write_table          the new L1 table into new clusters, before commit     cluster_alloc
l1_grow_activate_table       the header switch to it: ``header-switched``          header_update
l1_shrink_write_table        L1 entries past a shrunk end: ``tail-l1-cleared``     l1_shrink_write_table
l1_shrink_free_l2_clusters   the L2 tables past it lose their refcount:            cluster_free
                             ``clusters-freed``
l2_update                    L2 entries in place: ``l2-updated``,                  l2_update
                             ``copied-cleared``, ``copied-set``,
                             ``tail-l2-cleared``
l2_alloc_write               a new L2 table into a new cluster, before commit      cluster_alloc
reftable_grow                a larger refcount table into new clusters             cluster_alloc
refblock_alloc,              new refcount blocks (and table) into new clusters     cluster_alloc
refblock_alloc_write,
refblock_alloc_write_blocks,
refblock_alloc_write_table
refblock_alloc_hookup,       refcount table entries for new blocks:                refblock_alloc_hookup
reftable_update              ``refcount-blocks-hooked``
refblock_alloc_switch_table  the header names the new refcount table:              refblock_alloc_switch_table
                             ``refcount-table-switched``
refblock_update,             refcounts up in place: ``refcounts-increased``        refblock_update
refblock_update_part
cluster_alloc                every cluster the transaction allocated, written      cluster_alloc
                             whole and synced before the commit
cluster_alloc_space          the file grows by those writes (pwrite past the end)  cluster_alloc, write_aio
cluster_free                 refcounts down, last: ``clusters-freed``              cluster_free
write_aio, cow_write         guest data (copy-on-write included) outside the       write_aio
                             journal, into new clusters or in place
flush_to_disk, flush_to_os   every barrier of the image (msync, fsync): there is   flush_to_disk
                             no cache of our own, so both are one
l2_load, l2_alloc_cow_read,  reads: not injected                                   --
read_aio, read_backing_aio,
read_compressed, cow_read,
reftable_load, refblock_load
l2_update_compressed,        compressed clusters, VM state, copy-on-read,          --
write_compressed,            qemu-img's make-empty, the block layer's
cluster_alloc_bytes,         read-modify-write and blkdebug's own ``none``:
vmstate_load, vmstate_save,  qjournal has none of them (each write is one
cor_write, pwritev*,         pwrite of the event it belongs to)
empty_image_prepare, none
===========================  ====================================================  ==========================

qjournal's own events, which QEMU has no name for: ``bitmap_update`` (bits of
enabled bitmaps, ``bitmap-bits-set``), ``bitmap_directory_update`` (the seed protocol's
in-place directory, ``directory-written``), ``header_update`` (every sector write of
cluster 0: ``autoclear-cleared``, ``header-tail-written``, ``backing-name-moved``,
``header-switched``, ``autoclear-set``, ``header-cleanup``), and the journal's
``journal_write`` (the records of a transaction, up to its commit), ``journal_sync``
(the commit point; also the sync that ends recovery or closes the journal) and
``checkpoint`` (the record that marks a transaction applied).
"""
from __future__ import annotations

import errno as errno_codes
import os
from typing import Iterable

import attrs

from ..format.lazy import np
from .medium import Medium, MediumError, Range

WRITE_AIO = "write_aio"
FLUSH_TO_DISK = "flush_to_disk"
JOURNAL_SYNC = "journal_sync"

#: Journal step names (the values of :class:`qjournal.core.ordering.Phase`) -> event.
STEP_EVENTS: dict[str, str] = {
    "copied-cleared": "l2_update",
    "refcounts-increased": "refblock_update",
    "refcount-blocks-hooked": "refblock_alloc_hookup",
    "refcount-table-switched": "refblock_alloc_switch_table",
    "bitmap-bits-set": "bitmap_update",
    "l2-updated": "l2_update",
    "l1-updated": "l1_update",
    "autoclear-cleared": "header_update",
    "directory-written": "bitmap_directory_update",
    "header-tail-written": "header_update",
    "backing-name-moved": "header_update",
    "header-switched": "header_update",
    "autoclear-set": "header_update",
    "header-cleanup": "header_update",
    "tail-l2-cleared": "l2_update",
    "tail-l1-cleared": "l1_shrink_write_table",
    "clusters-freed": "cluster_free",
    "copied-set": "l2_update",
}

#: Every event an operation can belong to.
EVENTS: frozenset[str] = frozenset(STEP_EVENTS.values()) | {
    "cluster_alloc", WRITE_AIO, FLUSH_TO_DISK, "journal_write", JOURNAL_SYNC, "checkpoint"}

#: QEMU's names for what lands in one of :data:`EVENTS` under another name (module table).
ALIASES: dict[str, str] = {
    "l1_grow_alloc_table": "refblock_update", "l1_grow_write_table": "cluster_alloc",
    "l1_grow_activate_table": "header_update", "l1_shrink_free_l2_clusters": "cluster_free",
    "l2_alloc_write": "cluster_alloc", "reftable_grow": "cluster_alloc", "refblock_alloc": "cluster_alloc",
    "refblock_alloc_write": "cluster_alloc", "refblock_alloc_write_blocks": "cluster_alloc",
    "refblock_alloc_write_table": "cluster_alloc", "reftable_update": "refblock_alloc_hookup",
    "refblock_update_part": "refblock_update", "cluster_alloc_space": "cluster_alloc", "cow_write": WRITE_AIO,
    "flush_to_os": FLUSH_TO_DISK,
}


def canonical(name: str) -> str:
    """The event ``name`` (a qjournal event, a QEMU alias or a journal step name) lands in.

    >>> canonical("l2_alloc_write"), canonical("l1-updated"), canonical("journal_sync")
    ('cluster_alloc', 'l1_update', 'journal_sync')
    """
    ev = STEP_EVENTS.get(name, ALIASES.get(name, name))
    if ev not in EVENTS:
        raise ValueError(f"fault event {name!r} is not one qjournal writes at; one of {', '.join(sorted(EVENTS))}")
    return ev


@attrs.frozen
class Fault:
    """Fail the ``nth`` operation (write, flush or resize; 1 = the first) that belongs to
    ``event`` with ``errno``. ``sticky``: from then on every write, flush and resize of
    every medium of the injector fails too (a disk that died), not only that one."""

    event: str = attrs.field(converter=canonical)
    nth: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    errno: int = errno_codes.EIO
    sticky: bool = False


@attrs.frozen
class Operation:
    """One operation a :class:`FaultMedium` saw (the injector's trace)."""

    event: str
    kind: str       # write | flush | resize
    file: str
    offset: int | None
    length: int
    failed: bool


class Injector:
    """The faults to inject and what happened: shared by the media it wraps (image and
    journal), which count each event's operations together.

    ``trace`` lists every write, flush and resize in order; a run without faults gives
    the operations a test can then fail one by one (:meth:`counts`). O(1) per operation.
    """

    def __init__(self, faults: Iterable[Fault] = ()) -> None:
        self.faults = list(faults)
        self.seen: dict[str, int] = {}
        self.trace: list[Operation] = []
        self.fired: list[Fault] = []
        self.dead: Fault | None = None

    def medium(self, inner: Medium, *, flush_event: str = FLUSH_TO_DISK, name: str | None = None) -> "FaultMedium":
        """``inner`` wrapped: its writes, flushes and resizes may fail as the faults say."""
        return FaultMedium(inner, self, flush_event=flush_event, name=name)

    def counts(self) -> dict[str, int]:
        """Operations seen per event so far."""
        return dict(self.seen)

    def check(self, event: str, kind: str, file: str, offset: int | None, length: int) -> None:
        """Count one operation of ``event``; raise MediumError if a fault names it."""
        n = self.seen[event] = self.seen.get(event, 0) + 1
        hit = self.dead or next((f for f in self.faults if f.event == event and f.nth == n), None)
        self.trace.append(Operation(event, kind, file, offset, length, hit is not None))
        if hit is None:
            return
        if hit is not self.dead:
            self.fired.append(hit)
            if hit.sticky:
                self.dead = hit
        what = f"{kind} of {length:#x} bytes" if kind == "write" else (
            f"resize to {length:#x} bytes" if kind == "resize" else "flush")
        raise MediumError(file, what, offset, hit.errno,
                          f"{os.strerror(hit.errno)} (injected at {hit.event} #{hit.nth})")


class FaultMedium:
    """A medium that passes everything to ``inner`` except the operations a fault fails
    (see the module docstring for which event an operation belongs to)."""

    def __init__(self, inner: Medium, injector: Injector, *, flush_event: str = FLUSH_TO_DISK,
                 name: str | None = None) -> None:
        self.inner = inner
        self.injector = injector
        self.flush_event = canonical(flush_event)
        self.name = name or str(getattr(inner, "path", type(inner).__name__))
        self.current: str | None = None      # the event announced last, until the next flush
        self.closed = False

    @property
    def size(self) -> int:
        return self.inner.size

    def read(self, off: int, n: int) -> bytes:
        return self.inner.read(off, n)

    def array(self, off: int, count: int, dtype: str) -> np.ndarray:
        return self.inner.array(off, count, dtype)

    def write(self, off: int, data: bytes) -> None:
        self.injector.check(self.current or WRITE_AIO, "write", self.name, off, len(data))
        self.inner.write(off, data)

    def flush(self, ranges: Iterable[Range] | None = None) -> None:
        self.current = None
        self.injector.check(self.flush_event, "flush", self.name, None, 0)
        self.inner.flush(ranges)

    def resize(self, n: int) -> None:
        self.injector.check(self.current or WRITE_AIO, "resize", self.name, None, n)
        self.inner.resize(n)

    def mark(self, name: str) -> None:
        self.inner.mark(name)

    def event(self, name: str) -> None:
        """What the next writes are: a step name, a qjournal event or a QEMU alias."""
        self.current = STEP_EVENTS.get(name, ALIASES.get(name, name))
        self.inner.event(name)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.inner.close()

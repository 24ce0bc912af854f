"""Recording the real medium: what ``MmapMedium`` and ``FileMedium`` ask of the system.

In the default mode crashsim replaces the medium with a :class:`~crashsim.recorder.RecordingMedium`,
so the real medium's own code (which ranges its ``flush`` msyncs, when it fsyncs, how it
grows a file) never runs. In this mode (``crashsim run --medium real``) the workload runs
on real files through the unmodified media, and a :class:`RecordingSystem` stands at the
seam they call the system through (:class:`qjournal.storage.medium.System`):

==============  ==========================================================
system call     recorded as
==============  ==========================================================
pwrite          a write of those bytes
msync           a barrier on that range
fsync           a barrier on the whole file
fdatasync       a barrier on the whole file
ftruncate       a resize
fallocate       a resize, when it grows the file
==============  ==========================================================

The recording is then the same as in the default mode, and goes through the same state
generation and checks. A medium whose flush syncs too little now leaves crash states
without the writes it failed to sync, and the writes still unsynced when the image was
closed fail the run (``WorkloadResult.unsynced``).
"""
from __future__ import annotations

import mmap
import os

from qjournal.storage.medium import FileMedium, MmapMedium, System

from .recorder import Entry, Recording, call_site

class RecordingSystem(System):
    """The real system calls, each also logged into ``rec`` for the file its fd belongs to."""

    def __init__(self, rec: Recording) -> None:
        self.rec = rec
        self.files: dict[int, str] = {}       # fd -> IMAGE or JOURNAL

    def _size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, off: int) -> None:
        super().pwrite(fd, data, off)
        self.rec.entries.append(Entry("write", self.files[fd], off, bytes(data), site=call_site()))

    def msync(self, fd: int, mapping: mmap.mmap, off: int, n: int) -> None:
        super().msync(fd, mapping, off, n)
        self.rec.entries.append(Entry("barrier", self.files[fd], ranges=((off, n),), site=call_site()))

    def fsync(self, fd: int) -> None:
        super().fsync(fd)
        self.rec.entries.append(Entry("barrier", self.files[fd], ranges=((0, self._size(fd)),), site=call_site()))

    def fdatasync(self, fd: int) -> None:
        super().fdatasync(fd)
        self.rec.entries.append(Entry("barrier", self.files[fd], ranges=((0, self._size(fd)),), site=call_site()))

    def ftruncate(self, fd: int, n: int) -> None:
        super().ftruncate(fd, n)
        self.rec.entries.append(Entry("resize", self.files[fd], size=n, site=call_site()))

    def fallocate(self, fd: int, off: int, n: int) -> None:
        size = self._size(fd)
        super().fallocate(fd, off, n)
        if off + n > size:
            self.rec.entries.append(Entry("resize", self.files[fd], size=off + n, site=call_site()))


class _Marks:
    """Named points (the journal's ``commit`` and step names) kept in the recording: marks
    are not I/O, so keeping them changes nothing of the real media's code."""

    fd: int

    def _attach(self, system: RecordingSystem, file: str) -> None:
        system.files[self.fd] = file
        self.rec, self.file = system.rec, file

    def mark(self, name: str) -> None:
        self.rec.entries.append(Entry("mark", self.file, name=name, site=call_site()))


class MarkingMmapMedium(_Marks, MmapMedium):
    """The real image medium, recorded through ``system``."""

    def __init__(self, path: str, system: RecordingSystem, file: str) -> None:
        MmapMedium.__init__(self, path, True, system=system)
        self._attach(system, file)


class MarkingFileMedium(_Marks, FileMedium):
    """The real journal medium, recorded through ``system``."""

    def __init__(self, path: str, system: RecordingSystem, file: str) -> None:
        FileMedium.__init__(self, path, True, system=system)
        self._attach(system, file)

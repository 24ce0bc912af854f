"""The units sizes and offsets are counted in, below and around every qcow2 structure.

``SECTOR`` is QEMU's ``BDRV_SECTOR_SIZE``, 512 bytes. It is the unit of

- the virtual disk size: ``qemu-img create`` rounds it up to a whole sector and
  ``qemu-img resize`` refuses any other; a backing file reads as its length rounded up;
- the size field of a compressed L2 entry (additional sectors, see :mod:`.tables`) and
  the sector counts of a LUKS header (see :mod:`.luks`);
- a write that cannot tear: a disk writes a sector whole or not at all, so a header
  change confined to one sector is atomic (QEMU's assumption, and the journal's: its
  binding checksums cover one sector each).

``STAT_BLOCK`` is the unit of ``st_blocks`` in :func:`os.stat`: 512 bytes on Linux
whatever the file system's block size (QEMU's ``raw_get_allocated_file_size`` counts
the same way).
"""
from __future__ import annotations

SECTOR = 512
STAT_BLOCK = 512

"""CRC-32C: the journal's checksum, in GB/s on 64 MiB held in memory.

- ``crc32c-whole``: :func:`qjournal.journal.crc32c.crc32c` over the whole 64 MiB in one call
  (the journal checksums records and before-images with it). Goal: at least 4 GB/s.
- ``crc32c-blocks``: :func:`qjournal.journal.crc32c.crc32c_blocks` over the same bytes
  in 512-byte pieces (131,072 checksums: the binding check's pieces). Goal: at least
  1 GB/s; the numpy implementation it replaced ran at 0.16 GB/s on this machine.

Both are declared with a ``rate``: there is no peer program, the peer column is the
time the goal allows. The bytes are seeded random, made once per process outside the
timed call. ``verify`` checks the first round's results against the CRCs of the same
bytes computed piece by piece and chained.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from qjournal.journal.records import PIECE

from .harness import Benchmark, Fixtures, benchmark

SIZE = 64 << 20
SEED = 32


class _Crc(Benchmark):
    _data: ClassVar[bytes | None] = None

    @classmethod
    def data(cls) -> bytes:
        """The 64 MiB of seeded random bytes, made on first use (not timed)."""
        if _Crc._data is None:
            _Crc._data = np.random.default_rng(SEED).bytes(SIZE)
        return _Crc._data

    def template(self, fx: Fixtures) -> Path:
        self.data()

        def build(path: Path) -> None:
            path.write_bytes(b"")       # the bytes are in memory: nothing to copy per round
        return fx.image("empty-file", build)


@benchmark("crc32c-whole", rate=4e9, nbytes=SIZE)
class Crc32c(_Crc):
    """crc32c() of 64 MiB in one call"""

    result: int | None = None

    def ours(self, image: Path) -> None:
        from qjournal.journal.crc32c import crc32c
        self.result = crc32c(self.data())

    def verify(self, ours_image: Path, peer_image: Path) -> None:
        from qjournal.journal.crc32c import crc32c
        data, crc = memoryview(self.data()), 0
        for i in range(0, SIZE, 1 << 20):
            crc = crc32c(data[i:i + (1 << 20)], crc)
        assert self.result == crc, f"crc32c: {self.result} in one call, {crc} chained over 1 MiB pieces"


@benchmark("crc32c-blocks", rate=1e9, nbytes=SIZE)
class Crc32cBlocks(_Crc):
    """crc32c_blocks() of 64 MiB in 512-byte pieces"""

    result: np.ndarray | None = None

    def ours(self, image: Path) -> None:
        from qjournal.journal.crc32c import crc32c_blocks
        self.result = crc32c_blocks(self.data(), PIECE)

    def verify(self, ours_image: Path, peer_image: Path) -> None:
        from qjournal.journal.crc32c import crc32c
        data = memoryview(self.data())
        assert self.result is not None and len(self.result) == SIZE // PIECE
        for k in np.random.default_rng(SEED).integers(0, SIZE // PIECE, 1000).tolist():
            got = int(self.result[k])
            want = crc32c(data[k * PIECE:(k + 1) * PIECE])
            assert got == want, f"crc32c_blocks: piece {k} gave {got:#x}, crc32c of it {want:#x}"

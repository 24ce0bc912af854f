"""CRC-32C against a bitwise reference (the oracle: the polynomial, one bit at a time)."""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, strategies as st

from qjournal.journal.crc32c import crc32c, crc32c_blocks


def reference(data: bytes, crc: int = 0) -> int:
    """The textbook bitwise CRC-32C."""
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


# Lengths around the word and block sizes, and around the 32 KiB where the package releases the GIL.
EDGE_LENGTHS = [0, 1, 3, 7, 8, 9, 15, 16, 17, 63, 64, 65, 511, 512, 513, 1023, 1024, 1025, 1536,
                2047, 2048, 2049, 4095, 4096, 4097, 5000, 12345, 32767, 32768, 32769, 65535, 65536, 65537]


class TestKnownValues:
    def test_check_value(self) -> None:
        assert crc32c(b"123456789") == 0xE3069283

    def test_empty(self) -> None:
        assert crc32c(b"") == 0
        assert crc32c(b"", 0x12345678) == 0x12345678

    def test_rfc3720_vectors(self) -> None:
        # iSCSI (RFC 3720, B.4) test patterns.
        assert crc32c(bytes(32)) == 0x8A9136AA
        assert crc32c(b"\xff" * 32) == 0x62A8AB43
        assert crc32c(bytes(range(32))) == 0x46DD794E
        assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C


class TestAgainstReference:
    @pytest.mark.parametrize("n", EDGE_LENGTHS)
    def test_edge_lengths(self, n: int) -> None:
        data = random.Random(n).randbytes(n)
        assert crc32c(data) == reference(data)

    @given(st.binary(max_size=3000), st.integers(0, 0xFFFFFFFF))
    def test_random(self, data: bytes, seed: int) -> None:
        assert crc32c(data, seed) == reference(data, seed)

    @pytest.mark.parametrize("n", [(1 << 20) + 13, 3 << 19, (5 << 20) + 1])
    def test_large_equals_chained_small(self, n: int) -> None:
        # 1000-byte pieces (each checked against the reference above) chained, against one call.
        data = random.Random(n).randbytes(n)
        crc = 0
        for i in range(0, n, 1000):
            crc = crc32c(data[i:i + 1000], crc)
        assert crc32c(data) == crc


class TestChaining:
    @given(st.binary(max_size=5000), st.binary(max_size=5000))
    def test_concatenation(self, a: bytes, b: bytes) -> None:
        assert crc32c(b, crc32c(a)) == crc32c(a + b)

    def test_buffer_types(self) -> None:
        data = random.Random(1).randbytes(10000)
        expected = crc32c(data)
        assert crc32c(bytearray(data)) == expected
        assert crc32c(memoryview(data)) == expected
        assert crc32c(memoryview(data)[7:5000]) == crc32c(data[7:5000])
        assert crc32c(memoryview(bytearray(data)).cast("I")) == expected


class TestBlocks:
    @pytest.mark.parametrize("n", [0, 1, 511, 512, 513, 1024, 2048, 512 * 7 + 100, 512 * 64, 512 * 2049 + 5])
    @pytest.mark.parametrize("block", [64, 512, 4096])
    def test_each_block(self, n: int, block: int) -> None:
        data = random.Random(n * block).randbytes(n)
        expected = [crc32c(data[i:i + block]) for i in range(0, n, block)]
        assert crc32c_blocks(data, block).tolist() == expected

    @given(st.binary(max_size=3000), st.sampled_from([64, 128, 512, 1024]))
    def test_against_reference(self, data: bytes, block: int) -> None:
        expected = [reference(data[i:i + block]) for i in range(0, len(data), block)]
        got = crc32c_blocks(data, block)
        assert got.dtype == np.uint32
        assert got.tolist() == expected

    def test_bad_block(self) -> None:
        with pytest.raises(ValueError):
            crc32c_blocks(b"x" * 100, 100)

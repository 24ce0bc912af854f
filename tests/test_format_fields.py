"""Reading and patching single fields by the names qjournal/format/ declares.

Oracle: qemu-img. It makes the images and reads them back after a field was patched
in place; the offsets come from qjournal.format alone (no literal offset here).
"""
from __future__ import annotations

from pathlib import Path

import pytest

import qemu
from qjournal.format.bitmaps import EXT_FIELD_OFFSET, EXT_SIZE, BitmapsExtension
from qjournal.format.extensions import EXT_BITMAPS, EXT_CRYPTO, EXT_HEADER, crypto_header_span, parse_extensions
from qjournal.format.geometry import SECTOR
from qjournal.format.header import FIELDS, FIELD_OFFSET, Header, field_span, pack_field, read_field
from qjournal.format.luks import MAGIC as LUKS_MAGIC


def cluster0(path: Path) -> bytearray:
    return bytearray(path.read_bytes()[:1 << 16])


class TestHeaderFields:
    def test_read_field_agrees_with_qemu_img(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "a.qcow2", "3G", "cluster_size=4k", "refcount_bits=64", "lazy_refcounts=on")
        c0 = cluster0(img)
        info = qemu.info(img)
        assert 1 << read_field(c0, "cluster_bits") == info["cluster-size"] == 4096
        assert read_field(c0, "size") == info["virtual-size"] == 3 << 30
        assert 1 << read_field(c0, "refcount_order") == info["format-specific"]["data"]["refcount-bits"] == 64
        assert read_field(c0, "compatible_features") == 1     # lazy refcounts, bit 0
        assert read_field(c0, "version") == 3
        assert read_field(c0, "header_length") == 112         # what QEMU writes

    def test_spans_tile_the_v3_header(self) -> None:
        spans = sorted(field_span(name) for name, _, _, _ in FIELDS)
        assert spans[0][0] == 4                                # after the magic
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), spans
        assert spans[-1][1] == 104

    def test_pack_field_patches_what_qemu_reads(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "a.qcow2", "1G")
        c0 = cluster0(img)
        off, end = field_span("size")
        c0[off:end] = pack_field("size", 512 << 20)      # smaller: the L1 table still covers it
        with open(img, "r+b") as f:
            f.write(c0[:SECTOR])
        assert qemu.info(img)["virtual-size"] == 512 << 20
        assert Header.parse(bytes(c0)).size == 512 << 20

    def test_pack_field_refuses_a_value_too_wide(self) -> None:
        with pytest.raises(OverflowError):
            pack_field("header_length", 1 << 32)

    def test_autoclear_bit_cleared_by_name_drops_the_bitmaps_for_qemu(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "a.qcow2", "64M")
        qemu.qemu_img("bitmap", "--add", str(img), "b0")
        c0 = cluster0(img)
        off, end = field_span("autoclear_features")
        assert read_field(c0, "autoclear_features") & 1
        c0[off:end] = pack_field("autoclear_features", 0)
        with open(img, "r+b") as f:
            f.write(c0[:SECTOR])
        # The bitmaps extension is there, but QEMU must treat it as inconsistent.
        assert qemu.bitmaps(img) == []
        assert FIELD_OFFSET["autoclear_features"] // SECTOR == 0


class TestExtensionLayouts:
    def test_bitmaps_extension_fields(self, tmp_path: Path) -> None:
        img = qemu.create(tmp_path / "a.qcow2", "64M")
        for name in ("b0", "b1", "b2"):
            qemu.qemu_img("bitmap", "--add", str(img), name)
        c0 = bytes(cluster0(img))
        (ext,) = [e for e in parse_extensions(c0, read_field(c0, "header_length"), len(c0)) if e.type == EXT_BITMAPS]
        assert len(ext.data) == EXT_SIZE
        data = ext.offset + EXT_HEADER.size
        nb_at = data + EXT_FIELD_OFFSET["nb_bitmaps"]
        assert int.from_bytes(c0[nb_at:nb_at + 4], "big") == 3
        parsed = BitmapsExtension.parse(ext.data, ext.offset, 1 << 16, img.stat().st_size)
        dir_at = data + EXT_FIELD_OFFSET["directory_offset"]
        assert int.from_bytes(c0[dir_at:dir_at + 8], "big") == parsed.directory_offset
        assert parsed.pack() == ext.data

    def test_crypto_header_span_names_the_luks_header(self, tmp_path: Path) -> None:
        img = tmp_path / "e.qcow2"
        qemu.create_encrypted(img, "16M")
        raw = img.read_bytes()
        (ext,) = [e for e in parse_extensions(raw, read_field(raw, "header_length"), 1 << 16) if e.type == EXT_CRYPTO]
        span = crypto_header_span(ext.data)
        assert span is not None
        offset, length = span
        assert offset % (1 << 16) == 0 and length > 0 and offset + length <= len(raw)
        assert raw[offset:offset + len(LUKS_MAGIC)] == LUKS_MAGIC
        assert crypto_header_span(ext.data[:15]) is None

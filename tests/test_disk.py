"""`qjournal.disk.GuestDisk`: the guest disk as a read-only Python file.

Oracle: `qemu-img convert -O raw` (QEMU's read of every byte), on the matrix of
test_guest_read.py; the file protocol is checked against what `io` promises for a
raw, seekable, read-only stream.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path

import pytest

import qemu
import qjournal
from qjournal.write.disk import GuestDisk
from test_guest_read import CASES

MiB = 1 << 20




class TestCopy:
    @pytest.mark.parametrize("name", CASES)
    def test_copyfileobj_equals_qemu_img_convert(self, name: str, images: dict[str, Path],
                                                 converted: dict[str, bytes], tmp_path: Path) -> None:
        out = tmp_path / "copy.raw"
        with qjournal.open(images[name]) as img, GuestDisk(img) as disk, open(out, "wb") as f:
            shutil.copyfileobj(disk, f)
        assert out.read_bytes() == converted[name]

    def test_buffered_and_large_chunks(self, images: dict[str, Path], converted: dict[str, bytes]) -> None:
        ref = converted["cluster-2m"]
        with qjournal.open(images["cluster-2m"]) as img:
            with io.BufferedReader(GuestDisk(img), buffer_size=1 << 16) as f:
                assert f.read(100) == ref[:100]
                assert f.seek(-5000, os.SEEK_END) == len(ref) - 5000
                assert f.read() == ref[-5000:]
            h = hashlib.sha256()
            buf = memoryview(bytearray(8 * MiB))
            with GuestDisk(img) as disk:
                while n := disk.readinto(buf):
                    h.update(buf[:n])
            assert h.digest() == hashlib.sha256(ref).digest()


class TestFileProtocol:
    def test_read_seek_tell(self, images: dict[str, Path], converted: dict[str, bytes]) -> None:
        ref = converted["backing-raw-shorter"]
        with qjournal.open(images["backing-raw-shorter"]) as img:
            disk = GuestDisk(img)
            assert (disk.readable(), disk.seekable(), disk.writable()) == (True, True, False)
            assert disk.size == len(ref)
            assert disk.read(10) == ref[:10] and disk.tell() == 10
            assert disk.seek(5 * MiB + 999) == 5 * MiB + 999
            assert disk.read(3) == ref[5 * MiB + 999:5 * MiB + 1002]
            assert disk.seek(-3, os.SEEK_CUR) == 5 * MiB + 999
            assert disk.seek(-1, os.SEEK_END) == len(ref) - 1
            assert disk.read(100) == ref[-1:]
            assert disk.read(100) == b"" and disk.readinto(bytearray(10)) == 0
            assert disk.seek(len(ref) + 10) == len(ref) + 10 and disk.read() == b""
            disk.seek(len(ref) - 7)
            assert disk.read() == disk.readall() + ref[-7:] and disk.tell() == len(ref)
            buf = bytearray(9)
            disk.seek(4 * MiB - 4)
            assert disk.readinto(buf) == 9 and bytes(buf) == ref[4 * MiB - 4:4 * MiB + 5]
            with pytest.raises(ValueError, match="negative"):
                disk.seek(-1)
            with pytest.raises(ValueError, match="whence"):
                disk.seek(0, 3)

    def test_read_only(self, images: dict[str, Path]) -> None:
        with qjournal.open(images["cluster-4k"]) as img:
            disk = GuestDisk(img)
            assert not disk.writable()
            for call in (lambda: disk.write(b"x"), disk.fileno):
                with pytest.raises(io.UnsupportedOperation):
                    call()
            with pytest.raises(OSError, match="fixed size"):
                disk.truncate(0)


class TestWrite:
    def test_copy_a_raw_file_into_the_disk(self, tmp_path: Path) -> None:
        """shutil.copyfileobj into img.disk(): qemu-img compare sees the raw file."""
        raw = tmp_path / "src.raw"
        raw.write_bytes(os.urandom(3 << 20) + bytes(1 << 20) + b"\x7f" * (4 << 20))
        img = qemu.create(tmp_path / "dst.qcow2", "8M", "cluster_size=65536")
        qemu.qemu_img("bitmap", "--add", str(img), "b0")
        with qjournal.open(img, "r+") as q, q.disk() as disk, open(raw, "rb") as src:
            assert disk.writable()
            shutil.copyfileobj(src, disk, 1 << 20)
            assert disk.tell() == disk.size
            with pytest.raises(OSError, match="past the end"):
                disk.write(b"x")
            assert disk.truncate(disk.size) == disk.size
        res = qemu.qemu_img("compare", "-f", "qcow2", "-F", "raw", str(img), str(raw), check=False)
        assert res.returncode == 0, res.stdout
        qemu.assert_clean(img)
        assert qemu.nbd_dirty_extents(img, "b0") == [(0, 8 << 20)]

    def test_close_leaves_the_image_open(self, images: dict[str, Path], converted: dict[str, bytes]) -> None:
        with qjournal.open(images["cluster-4k"]) as img:
            with GuestDisk(img) as disk:
                disk.read(1)
            assert disk.closed
            for call in (disk.read, disk.tell, disk.readable, lambda: disk.seek(0)):
                with pytest.raises(ValueError, match="closed"):
                    call()
            assert GuestDisk(img).read(4096) == converted["cluster-4k"][:4096]

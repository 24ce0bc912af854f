"""Convert a disk image, as ``qemu-img convert`` does: raw or qcow2 in, raw or qcow2 out.

What is copied: the guest disk of the source as QEMU reads it (a qcow2 backing chain
flattened), in windows of at most 8 MiB, so memory stays bounded whatever the size.
Runs the source reports as zeros or unallocated (holes of a raw file, zero and
unallocated clusters) are never read; what is read is scanned for zeros:

- raw target: every ``-S`` block (default 4 KiB, aligned on the disk) that is all zeros
  stays a hole; ``-S 0`` allocates the whole file (data written, what the source
  reports as zeros ``posix_fallocate``-d), as qemu-img's ``-S 0`` does;
- qcow2 target: a cluster of zeros stays unallocated (``-S 0``: every cluster is
  written). With ``-B BACKING`` only clusters that differ from the backing file are
  written, zeros over non-zero backing data as zero clusters (v3) or zero data (v2);
- ``-c``: clusters are compressed (zlib raw deflate with a 4 KiB window, or zstd with
  ``compression_type=zstd``, as QEMU's ``qcow2_co_compress``) by a thread pool of ``-m``
  workers (all cores by default: zlib and zstandard release the GIL) and packed byte
  after byte, as QEMU packs them; a cluster that does not shrink is written as is.

**The data path.** A window is read (a qcow2 source's host runs and a raw source in
shares on the reader threads), scanned for zeros with numpy, and its data runs handed
to a :class:`~qjournal.write.stream.DataSink` that writes them from a thread of its own
while the next window is read (three page-aligned windows rotate); whole aligned pages
go to the new file with ``O_DIRECT``. Writing the copy through the page cache and then
fsyncing it cost more here (filling the cache, then writing it back) than writing it to
the device once; ``os.copy_file_range`` was slower still on ext4 (it copies through
the cache too).

**Crash safety: a temporary name, then a rename.** A new target (raw or qcow2) is
built in a file ``.DST.XXXXXXXX.tmp`` beside DST (the qcow2 one made by
:func:`~qjournal.ops.create.create_image` and filled by
:class:`~qjournal.write.stream.StreamWriter`: data, L2 tables, L1, refcounts, then
one header write), fsynced, and only then renamed over DST, after the old DST's
journal is removed; the directory is fsynced last. A crash therefore leaves the old DST
(or none) or the complete new one, never a partial image that QEMU would open as
complete; at worst a stray temporary file remains. The other choice, a journaled
transaction over a target in place, would have to journal (or order) every L2 table and
refcount block of the whole disk, and a half-written target would still be visible
under its name: the rename costs one fsync and makes the whole conversion atomic.

``-n`` writes into an existing target instead: a raw one with ``pwrite`` (zeros only
where the target holds data), a qcow2 one through the journaled guest write path (one
transaction per window, zero ranges through ``write_zeroes``), so that a crash there
leaves the target consistent with part of the data copied, as qemu-img does.
"""
from __future__ import annotations

import errno
import mmap
import os
import threading
import zlib
from typing import Callable, Iterator

import attrs

from ..format.lazy import futures, np
from ..core.image import Image
from ..errors import QcowError, UnsupportedError, UsageError
from ..format.geometry import SECTOR
from ..format.header import MAGIC
from ..format.tables import SUBCLUSTERS
from ..journal.journal import SUFFIX as JOURNAL_SUFFIX
from ..progress import Progress
from ..read.guest import UNALLOCATED, ZERO, GuestReader, reader, release, run_preads
from ..read.mapping import extents
from ..storage.medium import fsync_directory, pwrite_all
from ..write import data as guest_write
from ..write.stream import DataSink, StreamWriter
from .bitmaps import Bitmaps
from .create import CreateOptions, check_not_in_use, create_image

WINDOW = 8 << 20           # guest bytes read, scanned and written at a time
_BUFFERS = 3               # windows: one being read while the sink writes the others
MAX_SPARSE = 16 << 20      # qemu-img's largest -S (32768 sectors)
FORMATS = ("raw", "qcow2")
_MIB = 1 << 20


@attrs.frozen
class ConvertOptions:
    """What ``qemu-img convert`` takes, by its flags."""

    out_format: str = "qcow2"                 # -O
    src_format: str | None = None             # -f (None: detected, qcow2 by its magic)
    create: CreateOptions = CreateOptions()   # -o (and -B/-F as backing_file/backing_fmt)
    compress: bool = False                    # -c
    no_create: bool = False                   # -n
    sparse_size: int = 4096                   # -S
    bitmaps: bool = False                     # --bitmaps
    workers: int | None = None                # -m (compression threads; None: every core)
    progress: bool = False                    # -p


class Source:
    """The guest disk to copy: a raw file, or a qcow2 image with its backing chain."""

    def __init__(self, path: str, fmt: str | None) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                magic = f.read(len(MAGIC))
        except OSError as e:
            raise UsageError(f"could not open {path!r}: {e.strerror}") from None
        if fmt is None:
            fmt = "qcow2" if magic == MAGIC else "raw"
        if fmt not in FORMATS:
            raise UsageError(f"-f {fmt!r}: unknown or unsupported format: expected raw or qcow2")
        self.format = fmt
        self.img: Image | None = None
        self.reader: GuestReader | None = None
        self.fd = -1
        if fmt == "qcow2":
            self.img = Image(path, "r")
            try:
                self.reader = reader(self.img)
                if self.reader.encrypted:
                    raise UnsupportedError(f"{path}: the image is encrypted; qjournal cannot decrypt guest data")
                self.reader.backing   # opens the chain now: a loop or a missing file is refused up front
            except BaseException:
                self.close()
                raise
            self.size = self.img.header.size
        else:
            self.fd = os.open(path, os.O_RDONLY)
            self.size = os.lseek(self.fd, 0, os.SEEK_END)

    def extents(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """``(guest, length, reads_as_zeros)`` covering ``[start, end)``."""
        if self.reader is None:
            for g, n, is_data in extents(self.fd, self.size, start, end):
                yield g, n, not is_data
            return
        no_backing = self.reader.backing is None
        for g, n, kind, _ in self.reader.runs(start, end):
            yield g, n, kind == ZERO or (kind == UNALLOCATED and no_backing)

    def readinto(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the guest bytes at ``offset``; past the end of the disk, zeros."""
        n = max(0, min(len(view), self.size - offset))
        if n < len(view):
            np.frombuffer(view, dtype=np.uint8)[n:] = 0
        if not n:
            return
        if self.reader is None:
            run_preads([(self.fd, offset, view[:n])])
        else:
            self.reader.readinto(offset, view[:n])

    def close(self) -> None:
        if self.img is not None:
            release(self.img)
            self.img.close()
            self.img = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --------------------------------------------------------------------------- compression

class _Compressor:
    """Per-thread compressors for one cluster size, as QEMU compresses (block/qcow2-threads.c)."""

    def __init__(self, cluster_size: int, zstd: bool) -> None:
        self.cs = cluster_size
        self.zstd = zstd
        self.local = threading.local()

    def __call__(self, data: bytes) -> bytes | None:
        """The compressed cluster, or None when it does not come out shorter than a cluster."""
        if self.zstd:
            c = getattr(self.local, "zstd", None)
            if c is None:
                import zstandard
                c = self.local.zstd = zstandard.ZstdCompressor()
            out: bytes = c.compress(data)
        else:
            z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
            out = z.compress(data) + z.flush()
        return out if len(out) < self.cs else None


# --------------------------------------------------------------------------- helpers

def _temporary(target: str) -> str:
    """A new, unused name beside ``target`` (created empty, so nobody else takes it)."""
    directory = os.path.dirname(target)
    while True:
        tmp = os.path.join(directory, f".{os.path.basename(target)}.{os.urandom(4).hex()}.tmp")
        try:
            os.close(os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644))
            return tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise UsageError(f"could not create {target!r}: {e.strerror}") from None


def _rename_into_place(tmp: str, target: str) -> None:
    """Barriers: the temporary file is already fsynced; the old target's journal is
    unlinked and its directory fsynced (a crash here leaves the old target, consistent
    for QEMU by the ordering rule); the rename; the directory fsynced."""
    for name in dict.fromkeys((target + JOURNAL_SUFFIX,)):
        try:
            os.unlink(name)
            fsync_directory(name)
        except FileNotFoundError:
            pass
    os.rename(tmp, target)
    fsync_directory(target)


def _windows(src: Source, unit: int, end: int, whole: bool) -> Iterator[tuple[int, int]]:
    """Guest ranges ``[a, b)`` to read, aligned to ``unit``, merged, within ``[0, end)``:
    what the source does not report as zeros (everything when ``whole``)."""
    if whole:
        if end:
            yield 0, end
        return
    cur: list[int] | None = None
    for g, n, zero in src.extents(0, min(end, src.size)):
        if zero:
            continue
        a, b = g - g % unit, min(end, -(-(g + n) // unit) * unit)
        if cur is not None and a <= cur[1]:
            cur[1] = max(cur[1], b)
            continue
        if cur is not None:
            yield cur[0], cur[1]
        cur = [a, b]
    if cur is not None:
        yield cur[0], cur[1]


def _pieces(a: int, b: int) -> Iterator[tuple[int, int]]:
    while a < b:
        yield a, min(b, a + WINDOW)
        a += WINDOW


def _runs(mask: np.ndarray) -> Iterator[tuple[int, int]]:
    """``(first, stop)`` index runs where ``mask`` is true."""
    if not len(mask):
        return
    m = np.concatenate(([False], mask, [False]))
    d = np.flatnonzero(m[1:] != m[:-1])
    for i in range(0, len(d), 2):
        yield int(d[i]), int(d[i + 1])


def _window() -> memoryview:
    """A window buffer, page-aligned (an anonymous map) so that it can feed ``O_DIRECT`` writes."""
    return memoryview(mmap.mmap(-1, WINDOW))


def _nonzero_blocks(view: memoryview, unit: int) -> np.ndarray:
    """Per ``unit``-byte block of ``view`` (its length a multiple of ``unit``): not all zeros."""
    words = np.frombuffer(view, dtype=np.uint64)
    return np.asarray(words.reshape(-1, unit // 8).any(axis=1))


# --------------------------------------------------------------------------- targets

def _to_raw(src: Source, sink: DataSink, size: int, opts: ConvertOptions, bar: Progress, existing: bool) -> None:
    fd = sink.fd
    s = opts.sparse_size
    bufs = [_window() for _ in range(_BUFFERS)]
    marks = [0] * _BUFFERS   # each buffer is reused once the sink has written what came from it
    turn = 0
    unit = s or SECTOR
    pos = 0

    def zero_gap(a: int, b: int) -> None:
        # -n: what reads as zeros in the source must read as zeros in the target.
        if not existing or a >= b:
            return
        zeros = bytes(min(WINDOW, b - a))
        for g, n, is_data in extents(fd, os.fstat(fd).st_size, a, b):
            if is_data:
                for x, y in _pieces(g, g + n):
                    pwrite_all(fd, zeros[:y - x], x)

    for a, b in _windows(src, unit, size, whole=s == 0):
        zero_gap(pos, a)
        for x, y in _pieces(a, b):
            sink.wait(marks[turn])
            view = bufs[turn][:-(-(y - x) // unit) * unit]
            if s == 0 and not existing:   # into an existing file, fallocate would keep its old bytes
                _allocate_window(src, sink, x, y, view)
            else:
                src.readinto(x, view)
                mask = _nonzero_blocks(view, unit) if s else np.ones(len(view) // unit, dtype=bool)
                for i, j in _runs(mask):
                    lo, hi = x + i * unit, min(y, x + j * unit)
                    sink.write(view[i * unit:i * unit + hi - lo], lo)
                if existing:
                    for i, j in _runs(~mask):
                        zero_gap(x + i * unit, min(y, x + j * unit))
            marks[turn] = sink.mark()
            turn = (turn + 1) % _BUFFERS
            bar.update((y - x) // _MIB)
        pos = b
    zero_gap(pos, size)
    sink.wait()


def _allocate_window(src: Source, sink: DataSink, x: int, y: int, view: memoryview) -> None:
    """``-S 0`` into a new raw file: ``[x, y)`` all allocated. What the source reports as
    zeros is ``posix_fallocate``-d (nothing read, nothing written); the rest is read into
    ``view`` (the window's buffer) and written through the sink. (``os.copy_file_range``
    was 5x slower than this on ext4: it copies through the page cache.)"""
    for g, n, zero in list(src.extents(x, y)):
        if zero:
            os.posix_fallocate(sink.fd, g, n)
            continue
        piece = view[g - x:g - x + n]
        src.readinto(g, piece)
        sink.write(piece, g)


def _to_qcow2(src: Source, w: StreamWriter, size: int, opts: ConvertOptions, bar: Progress,
              backing: Source | None, pool: futures.ThreadPoolExecutor | None,
              compress: Callable[[bytes], bytes | None] | None) -> None:
    cs = w.cs
    bufs = [_window() for _ in range(_BUFFERS)]
    marks = [0] * _BUFFERS   # each buffer is reused once the sink has written what came from it
    back_buf = bytearray(WINDOW) if backing is not None else None
    # One window in flight: its buffer, its clusters in guest order, each a zero (None) or a compression job.
    pending: list[tuple[int, int, memoryview, list[tuple[int, futures.Future[bytes | None] | None]]]] = []
    zero_clusters = w.header.version >= 3

    def drain() -> None:
        for t, x, view, jobs in pending:
            for i, fut in jobs:
                piece = view[i * cs:(i + 1) * cs]
                if fut is None:
                    _put_zero(w, x + i * cs, piece, zero_clusters)
                    continue
                blob = fut.result()
                if blob is None:
                    w.put_data(x + i * cs, piece)
                else:
                    w.put_compressed(x + i * cs, blob)
            marks[t] = w.sink.mark()
        pending.clear()

    # Extended L2, as qemu-img: only the subclusters that hold data are allocated.
    per_subcluster = w.extended and backing is None and opts.sparse_size > 0
    turn = 0
    whole = opts.sparse_size == 0 or backing is not None
    for a, b in _windows(src, cs, size, whole):
        for x, y in _pieces(a, b):
            w.sink.wait(marks[turn])
            view = bufs[turn][:-(-(y - x) // cs) * cs]
            src.readinto(x, view)
            nonzero = _nonzero_blocks(view, cs)
            if backing is not None:
                assert back_buf is not None
                bview = memoryview(back_buf)[:len(view)]
                backing.readinto(x, bview)
                differ = (np.frombuffer(view, dtype=np.uint64) != np.frombuffer(bview, dtype=np.uint64)
                          ).reshape(-1, cs // 8).any(axis=1)
                write = differ
            elif opts.sparse_size == 0:
                write = np.ones(len(nonzero), dtype=bool)
            else:
                write = nonzero
            if pool is not None and compress is not None:
                jobs: list[tuple[int, futures.Future[bytes | None] | None]] = [
                    (i, pool.submit(compress, bytes(view[i * cs:(i + 1) * cs])) if nonzero[i] else None)
                    for i in np.flatnonzero(write).tolist()]
                drain()   # the previous window is written while this one compresses
                pending.append((turn, x, view, jobs))
            else:
                for i, j in _runs(write):
                    if backing is not None and not nonzero[i:j].any():
                        for k in range(i, j):
                            _put_zero(w, x + k * cs, view[k * cs:(k + 1) * cs], zero_clusters)
                    elif per_subcluster:
                        w.put_data(x + i * cs, view[i * cs:j * cs], _subcluster_bits(view[i * cs:j * cs], cs))
                    else:
                        w.put_data(x + i * cs, view[i * cs:j * cs])
                marks[turn] = w.sink.mark()
            turn = (turn + 1) % _BUFFERS
            bar.update((y - x) // _MIB)
    drain()


def _subcluster_bits(piece: memoryview, cs: int) -> np.ndarray:
    """Each cluster's extended-L2 "allocated" bits: its subclusters that are not all zeros."""
    mask = _nonzero_blocks(piece, cs // SUBCLUSTERS).reshape(-1, SUBCLUSTERS)
    weights = np.uint64(1) << np.arange(SUBCLUSTERS, dtype=np.uint64)
    return np.asarray((mask * weights).sum(axis=1, dtype=np.uint64))


def _put_zero(w: StreamWriter, guest: int, view: memoryview, zero_clusters: bool) -> None:
    if zero_clusters:
        w.put_zero(guest)
    else:
        w.put_data(guest, view)


def _into_qcow2(src: Source, target: str, size: int, opts: ConvertOptions, bar: Progress) -> None:
    """``-n`` into an existing qcow2 image: the journaled guest write path, one
    transaction per window; zero ranges through ``write_zeroes`` (which leaves alone what
    already reads as zeros)."""
    with Image(target, "r+") as img:
        if img.header.size < size:
            raise UsageError(f"convert -n: the target {target!r} ({img.header.size} bytes) is smaller than the "
                             f"source ({size} bytes)")
        cs = img.header.cluster_size
        buf = bytearray(WINDOW)
        pos = 0
        for a, b in _windows(src, cs, size, whole=opts.sparse_size == 0):
            if a > pos:
                guest_write.write_zeroes(img, pos, a - pos)
            for x, y in _pieces(a, b):
                view = memoryview(buf)[:-(-(y - x) // cs) * cs]
                src.readinto(x, view)
                mask = _nonzero_blocks(view, cs) if opts.sparse_size else np.ones(len(view) // cs, dtype=bool)
                with img.transaction("convert"):
                    for i, j in _runs(mask):
                        lo, hi = x + i * cs, min(y, x + j * cs)
                        guest_write.write(img, lo, view[i * cs:i * cs + hi - lo])
                    for i, j in _runs(~mask):
                        lo, hi = x + i * cs, min(y, x + j * cs)
                        guest_write.write_zeroes(img, lo, hi - lo)
                bar.update((y - x) // _MIB)
            pos = b
        if pos < size:
            guest_write.write_zeroes(img, pos, size - pos)
        release(img)


def _copy_bitmaps(src: Source, target: str) -> None:
    """``--bitmaps``: each persistent bitmap of the source, with its granularity, enabled
    state and bits, as ``qemu-img convert --bitmaps`` copies them (one that is in use,
    left by a QEMU that crashed, is refused, as qemu-img refuses it)."""
    assert src.img is not None
    names = list(Bitmaps(src.img))
    if not names:
        return
    with Image(target, "r+") as img:
        theirs = Bitmaps(src.img)
        mine = Bitmaps(img)
        for name in names:
            b = theirs[name]
            if b.in_use:
                raise UsageError(f"convert --bitmaps: bitmap {name!r} of {src.path!r} is in use (inconsistent); "
                                 f"repair it (qjournal bitmap --repair) or remove it first")
            mine.add(name, b.granularity, disabled=not b.enabled)
            mine.merge(name, name, source_image=src.img)
    try:
        os.unlink(target + JOURNAL_SUFFIX)   # every transaction is checkpointed; nobody needs it
    except FileNotFoundError:
        pass


def _backing_source(target: str, opts: ConvertOptions) -> Source | None:
    name = opts.create.backing_file
    if name is None:
        return None
    full = name if os.path.isabs(name) else os.path.join(os.path.dirname(os.path.abspath(target)), name)
    if os.path.realpath(full) == os.path.realpath(target):
        raise UsageError(f"convert -B: the backing file {name!r} is the target itself (a backing loop)")
    return Source(full, opts.create.backing_fmt)


def convert(source: str, target: str, opts: ConvertOptions = ConvertOptions()) -> None:
    """Convert ``source`` into ``target`` as ``qemu-img convert`` does (see the module docstring).

    Cost: one sequential pass over what the source allocates (plus the backing file's
    bytes with ``-B``), in windows of 8 MiB; memory is bounded by three windows, one L2
    table, the L1 table and 2 bytes per host cluster of the target. Raises
    :class:`~qjournal.errors.UsageError` (one line) for a bad request.
    """
    if opts.out_format not in FORMATS:
        raise UsageError(f"-O {opts.out_format!r}: unknown or unsupported format: expected raw or qcow2")
    if opts.src_format is not None and opts.src_format not in FORMATS:
        raise UsageError(f"-f {opts.src_format!r}: unknown or unsupported format: expected raw or qcow2")
    s = opts.sparse_size
    if s < 0 or s % SECTOR or s > MAX_SPARSE:
        raise UsageError(f"-S {s}: must be a multiple of {SECTOR} between 0 and {MAX_SPARSE >> 20}M")
    raw_out = opts.out_format == "raw"
    if raw_out and (opts.compress or opts.bitmaps or opts.create.backing_file is not None):
        what = "-c" if opts.compress else "--bitmaps" if opts.bitmaps else "-B"
        raise UsageError(f"convert {what}: needs -O qcow2 (a raw target has no such structure)")
    if opts.create.data_file is not None:
        raise UnsupportedError("convert -o data_file: not supported yet (convert into the image, then "
                               "qemu-img amend)")
    if opts.no_create and not os.path.exists(target):
        raise UsageError(f"convert -n: could not open {target!r}: {os.strerror(errno.ENOENT)}")
    if not target:
        raise UsageError("convert: the target name is empty")
    if os.path.exists(target) and os.path.realpath(target) == os.path.realpath(source):
        raise UsageError(f"convert: the target {target!r} is the source")
    src = Source(source, opts.src_format)
    try:
        if opts.bitmaps and src.img is None:
            raise UsageError("convert --bitmaps: the source is raw and has no bitmaps")
        size = src.size if raw_out else -(-src.size // SECTOR) * SECTOR
        bar = Progress(-(-size // _MIB), "convert", "MiB", show=opts.progress)
        with bar:
            if opts.no_create:
                if opts.compress or opts.bitmaps:
                    raise UsageError("convert -n: -c and --bitmaps need a new target")
                if raw_out:
                    fd = os.open(target, os.O_WRONLY)
                    try:
                        _to_raw(src, DataSink(fd), size, opts, bar, existing=True)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                else:
                    _into_qcow2(src, target, size, opts, bar)
                return
            _new_target(src, target, size, opts, bar)
    finally:
        src.close()


def _new_target(src: Source, target: str, size: int, opts: ConvertOptions, bar: Progress) -> None:
    target_dir = os.path.dirname(os.path.realpath(target))
    if os.path.isdir(target) or not os.path.isdir(target_dir):
        raise UsageError(f"could not create {target!r}: "
                         f"{os.strerror(errno.EISDIR if os.path.isdir(target) else errno.ENOENT)}")
    full = os.path.join(target_dir, os.path.basename(target)) if not os.path.islink(target) \
        else os.path.realpath(target)
    check_not_in_use(full)
    backing = _backing_source(full, opts) if not opts.out_format == "raw" else None
    tmp = _temporary(full)
    pool: futures.ThreadPoolExecutor | None = None
    try:
        if opts.out_format == "raw":
            fd = os.open(tmp, os.O_RDWR)
            sink = DataSink(fd, tmp, background=True)
            try:
                os.ftruncate(fd, size)
                _to_raw(src, sink, size, opts, bar, existing=False)
                os.fsync(fd)
            finally:
                sink.close()
                os.close(fd)
        else:
            create_image(tmp, size, opts.create)
            fd = os.open(tmp, os.O_RDWR)
            sink = DataSink(fd, tmp, background=True)
            try:
                w = StreamWriter(fd, sink)
                compress = None
                if opts.compress:
                    compress = _Compressor(w.cs, opts.create.compression_type == "zstd")
                    pool = futures.ThreadPoolExecutor(max_workers=opts.workers or os.cpu_count() or 1)
                _to_qcow2(src, w, size, opts, bar, backing, pool, compress)
                w.finish()
                os.fsync(fd)
            finally:
                sink.close()
                os.close(fd)
            if opts.bitmaps:
                _copy_bitmaps(src, tmp)
        _rename_into_place(tmp, full)
    except BaseException as e:
        for name in (tmp, tmp + JOURNAL_SUFFIX):
            try:
                os.unlink(name)
            except OSError:
                pass
        if isinstance(e, OSError) and not isinstance(e, QcowError):
            raise UsageError(f"could not write {target!r}: {e.strerror or e}") from None
        raise
    finally:
        if pool is not None:
            pool.shutdown()
        if backing is not None:
            backing.close()


__all__ = ["ConvertOptions", "Source", "convert"]


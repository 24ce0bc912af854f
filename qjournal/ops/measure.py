"""How large a new image would be, as ``qemu-img measure`` computes it.

The rules, as QEMU 7.2's (block/qcow2.c ``qcow2_measure``, ``qcow2_calc_prealloc_size``,
``qcow2_refcount_metadata_size``; block/qcow2-bitmap.c
``qcow2_get_persistent_dirty_bitmap_size``; block/raw-format.c ``raw_measure``):

=================  ===============================================================
output raw         required = fully allocated = the source's length (or ``--size``
                   rounded up to a sector)
qcow2, fully       one header cluster, the L2 tables of the whole disk (a whole
allocated          number of tables), the L1 table (whole clusters), the refcount
                   blocks and table that count all of it (their fixed point), and
                   the disk rounded up to a cluster
qcow2, required    fully allocated minus the disk, plus the data the source holds:
                   every cluster with data somewhere in its chain (zero clusters and
                   unallocated ranges cost nothing); with a ``backing_file`` option
                   or ``preallocation=falloc|full``, the whole disk
bitmaps            (a qcow2 source and a v3 output only) per persistent bitmap: its
                   data in whole clusters and its table in whole clusters, plus the
                   directory in whole clusters
=================  ===============================================================
"""
from __future__ import annotations

import attrs

from ..errors import UsageError
from ..format import bitmaps as bm
from ..format.geometry import SECTOR
from ..format.refcount import metadata_clusters
from ..format.tables import EXTL2_ENTRY_SIZE, L1_ENTRY_SIZE, L2_ENTRY_SIZE
from ..core.image import Image
from .compare import S_DATA, Side
from .create import CreateOptions, parse_options
from .syntax import split_options

PREALLOCATION = ("off", "metadata", "falloc", "full")


@attrs.frozen
class Measure:
    """What ``qemu-img measure`` reports (``bitmaps`` None when it shows none)."""

    required: int
    fully_allocated: int
    bitmaps: int | None = None

    def to_json(self) -> dict[str, int]:
        """qemu-img's keys, in its order."""
        out = {"bitmaps": self.bitmaps} if self.bitmaps is not None else {}
        out.update({"required": self.required, "fully-allocated": self.fully_allocated})
        return out

    def human(self) -> list[str]:
        """qemu-img's lines."""
        lines = [f"required size: {self.required}", f"fully allocated size: {self.fully_allocated}"]
        if self.bitmaps is not None:
            lines.append(f"bitmaps size: {self.bitmaps}")
        return lines


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Bytes of refcount blocks and table that count ``clusters`` clusters and themselves
    (without the generous increase of image creation).

    >>> refcount_metadata_size(16386, 65536, 4)
    131072
    """
    return sum(metadata_clusters(clusters, cluster_size, refcount_order)) * cluster_size


def prealloc_size(size: int, cluster_size: int, refcount_order: int, extended_l2: bool) -> int:
    """A fully allocated image of ``size`` bytes (QEMU's ``qcow2_calc_prealloc_size``).

    >>> prealloc_size(1 << 30, 65536, 4, False)
    1074135040
    """
    aligned = _round_up(size, cluster_size)
    l2e = EXTL2_ENTRY_SIZE if extended_l2 else L2_ENTRY_SIZE
    meta = cluster_size
    nl2e = _round_up(aligned // cluster_size, cluster_size // l2e)
    meta += nl2e * l2e
    nl1e = _round_up(nl2e * l2e // cluster_size, cluster_size // L1_ENTRY_SIZE)
    meta += nl1e * L1_ENTRY_SIZE
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size, refcount_order)
    return meta + aligned


def split(spec: str) -> tuple[CreateOptions, str]:
    """The ``-o`` list of a qcow2 output: create options and ``preallocation``."""
    prealloc = "off"
    rest = []
    for key, value in split_options(spec):
        if key == "preallocation":
            if value not in PREALLOCATION:
                raise UsageError(f"preallocation={value}: expected one of {', '.join(PREALLOCATION)}")
            prealloc = value
        else:
            rest.append(f"{key}={value.replace(',', ',,')}")
    return parse_options(",".join(rest)), prealloc


def _allocated_bytes(side: Side, cluster_size: int) -> int:
    """Whole clusters holding data anywhere in ``side``'s chain, in bytes (the loop of
    ``qcow2_measure`` over ``bdrv_block_status_above``: a data run counts from the start
    of its first cluster to the end of its last, and each cluster once)."""
    clusters = 0
    counted = -1         # the last cluster counted
    for g, n, st in side.status(0, side.size):
        if st != S_DATA:
            continue
        first, last = g // cluster_size, (g + n - 1) // cluster_size
        first = max(first, counted + 1)
        if last >= first:
            clusters += last - first + 1
            counted = last
    return clusters * cluster_size


def measure(out_fmt: str, spec: str = "", size: int | None = None, source: str | None = None,
            source_fmt: str | None = None, force_share: bool = False) -> Measure:
    """``qemu-img measure -O OUT_FMT -o SPEC (--size SIZE | [-f SOURCE_FMT] SOURCE)``."""
    if (size is None) == (source is None):
        raise UsageError("--size N cannot be used together with a filename" if size is not None else
                         "either --size N or one filename must be specified")
    if out_fmt not in ("raw", "qcow2"):
        raise UsageError(f"-O {out_fmt}: qjournal measures qcow2 and raw output only")
    if out_fmt == "raw":
        if any(key != "preallocation" for key, _ in split_options(spec)):
            raise UsageError(f"-o {spec}: invalid options for format 'raw' (it takes preallocation only)")
        if size is not None:
            return Measure(_round_up(size, SECTOR), _round_up(size, SECTOR))
    options, prealloc = split(spec) if out_fmt == "qcow2" else (CreateOptions(), "off")
    if size is not None and size < 0:
        raise UsageError(f"--size {size}: invalid image size")
    side = Side.open(source, source_fmt, force_share) if source is not None else None
    try:
        if out_fmt == "raw":
            assert side is not None
            return Measure(side.size, side.size)
        cs = options.cluster_size
        order = options.refcount_bits.bit_length() - 1
        if side is None:
            assert size is not None
            virtual = _round_up(size, cs)
            data = virtual if prealloc in ("falloc", "full") else 0
        else:
            virtual = _round_up(side.size, cs)
            if options.backing_file is not None or prealloc in ("falloc", "full"):
                data = virtual
            else:
                data = _allocated_bytes(side, cs)
        full = prealloc_size(virtual, cs, order, options.extended_l2)
        bitmaps = None
        if side is not None and side.image is not None and options.compat != "0.10" \
                and side.image.header.version >= 3:
            bitmaps = bitmaps_size(side.image, cs)
        return Measure(full - virtual + data, full, bitmaps)
    finally:
        if side is not None:
            side.close()


def bitmaps_size(img: Image, cluster_size: int) -> int:
    """The clusters the persistent bitmaps of ``img`` need in a new image of that cluster size."""
    total = 0
    directory = 0
    for e in img.entries:
        nbytes = -(-(-(-img.header.size // e.granularity)) // 8)
        nclusters = -(-nbytes // cluster_size)
        total += nclusters * cluster_size + _round_up(nclusters * bm.TABLE_ENTRY_SIZE, cluster_size)
        directory += e.packed_size
    return total + _round_up(directory, cluster_size)


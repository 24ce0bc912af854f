"""Create a qcow2 image the way ``qemu-img create -f qcow2`` (QEMU 7.2) does.

The result is byte for byte the image QEMU makes with the same options: same header,
same header extensions in the same order, same refcount structures, same L1 (and, with
``data_file_raw``, L2) tables at the same offsets, same file length.

What QEMU does, and so what the layout below reproduces (block/qcow2.c
``qcow2_co_create``, block/qcow2-refcount.c):

1. Cluster 0 gets a bare header; cluster 1 a one-cluster refcount table whose entry 0
   points at cluster 2; cluster 2 an empty refcount block.
2. The image is opened and clusters 0-2 are allocated through the normal allocator.
3. The header is rewritten whole, with its extensions in this order: backing format,
   external data file name, feature name table (v3 and clusters above 4 KiB only),
   end marker, then the backing file name.
4. The image is grown to its size: the L1 table (exactly ``ceil(size / (L2 entries
   * cluster size))`` entries) is one allocation of ``l1_size * 8`` bytes, written
   with exactly that many bytes, so a fresh image ends at the last byte of its L1.
5. With ``data_file_raw``, metadata is preallocated: one L2 table per L1 entry,
   allocated in guest order, mapping each guest cluster to the same offset in the data
   file (entry = offset | COPIED; the extended-L2 bitmap stays 0).

Where each table lands is decided by QEMU's allocator: a first-fit scan from
``free_cluster_index``; a missing refcount block is placed at the next free cluster
(self-describing when it falls in its own range, otherwise counted by another block)
and the allocation restarts; a refcount table that is too small is replaced by a
self-covering area of new blocks and a new table at the next refcount-block boundary,
and the old table's clusters are freed (their bytes stay on disk). :class:`_QemuAllocator`
follows those steps one for one, because a block placed one cluster elsewhere moves
every later offset.

Writing is all-or-nothing: the image (and the external data file) is written to a new
file in the target's directory, fsynced and renamed over the target, then the directory
is fsynced. A crash leaves the old file (or none) or the complete new image, never a
partial one. Only a stray temporary file ``.NAME.XXXXXXXX.tmp`` may remain.
"""
from __future__ import annotations

import errno
import os
import stat
import struct
from typing import Iterable, Iterator, Sequence

import attrs

from ..format.lazy import np
from ..errors import FormatError, UsageError
from ..format.extensions import (EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_FEATURE_TABLE,
                                FEATURE_TABLE_MIN_CLUSTER_SIZE, Extension, pack_extensions, pack_feature_table)
from ..format.geometry import SECTOR
from ..format.header import (AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, COMPRESSION_ZLIB,
                            COMPRESSION_ZSTD, CRYPT_NONE, DEFAULT_CLUSTER_BITS, DEFAULT_REFCOUNT_ORDER,
                            INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE, INCOMPAT_EXTL2, INCOMPAT_KNOWN, MAGIC,
                            MAX_BACKING_FILE_NAME, MAX_CLUSTER_BITS, MAX_L1_ENTRIES, MAX_REFCOUNT_ORDER, MAX_SIZE,
                            MIN_CLUSTER_BITS, MIN_CLUSTER_BITS_EXTL2, QEMU_V3_LENGTH, REFCOUNT_ORDER_V2,
                            V2_LENGTH, Header)
from ..format.refcount import RT_ENTRY_SIZE, metadata_clusters, pack_block
from ..format.tables import L1_ENTRY_SIZE, L2_ENTRY_SIZE, OFLAG_COPIED, SUBCLUSTERS, l2_entries, size_to_l1
from ..journal.journal import SUFFIX as JOURNAL_SUFFIX
from ..storage.lock import acquire
from ..storage.medium import fsync_directory
from .syntax import split_options, strtosz, strtou64

MIN_CLUSTER_SIZE = 1 << MIN_CLUSTER_BITS
MAX_CLUSTER_SIZE = 1 << MAX_CLUSTER_BITS
MIN_EXTL2_CLUSTER_SIZE = 1 << MIN_CLUSTER_BITS_EXTL2

COMPAT_ALIASES = {"0.10": "0.10", "1.1": "1.1", "v2": "0.10", "v3": "1.1"}
COMPRESSION_TYPES = {"zlib": COMPRESSION_ZLIB, "zstd": COMPRESSION_ZSTD}
BACKING_FORMATS = ("qcow2", "raw")

# qemu-img's options for qcow2 that qjournal does not implement, with the value that
# amounts to not using them (None: refused whatever the value).
_UNSUPPORTED = {"preallocation": "off", "encryption": "off", "encrypt.format": None,
                "encrypt.key-secret": None, "encrypt.cipher-alg": None, "encrypt.cipher-mode": None,
                "encrypt.ivgen-alg": None, "encrypt.ivgen-hash-alg": None, "encrypt.hash-alg": None,
                "encrypt.iter-time": None, "nocow": "off", "extent_size_hint": None}
_BOOL_WORDS = {"on": True, "yes": True, "true": True, "y": True,
               "off": False, "no": False, "false": False, "n": False}

# What ``qemu-img create -f qcow2 -o help FILE`` lists (QEMU 7.2), in its order and words:
# (name, value type, description). ``qjournal create -o help`` prints the same table.
OPTION_HELP: tuple[tuple[str, str, str], ...] = (
    ("backing_file", "str", "File name of a base image"),
    ("backing_fmt", "str", "Image format of the base image"),
    ("cluster_size", "size", "qcow2 cluster size"),
    ("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    ("compression_type", "str", "Compression method used for image cluster compression"),
    ("data_file", "str", "File name of an external data file"),
    ("data_file_raw", "bool (on/off)", "The external data file must stay valid as a raw image"),
    ("encrypt.cipher-alg", "str", "Name of encryption cipher algorithm"),
    ("encrypt.cipher-mode", "str", "Name of encryption cipher mode"),
    ("encrypt.format", "str", "Encrypt the image, format choices: 'aes', 'luks'"),
    ("encrypt.hash-alg", "str", "Name of encryption hash algorithm"),
    ("encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds"),
    ("encrypt.ivgen-alg", "str", "Name of IV generator algorithm"),
    ("encrypt.ivgen-hash-alg", "str", "Name of IV generator hash algorithm"),
    ("encrypt.key-secret", "str", "ID of secret providing qcow AES key or LUKS passphrase"),
    ("encryption", "bool (on/off)",
     "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
    ("extended_l2", "bool (on/off)", "Extended L2 tables"),
    ("extent_size_hint", "size", "Extent size hint for the image file, 0 to disable"),
    ("lazy_refcounts", "bool (on/off)", "Postpone refcount updates"),
    ("nocow", "bool (on/off)", "Turn off copy-on-write (valid only on btrfs)"),
    ("preallocation", "str", "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    ("refcount_bits", "num", "Width of a reference count entry in bits"),
    ("size", "size", "Virtual disk size"),
)


def option_help() -> list[str]:
    """The lines of ``qjournal create -o help``: qemu-img's list of qcow2 options, each
    marked with what qjournal does with it (implemented, only its off value, refused).

    >>> option_help()[1]
    '  backing_file=<str>     - File name of a base image'
    """
    lines = ["Supported qcow2 options:"]
    for name, kind, text in OPTION_HELP:
        if name == "size":
            text += " (qjournal: give it as the SIZE argument)"
        elif name in _UNSUPPORTED:
            only = _UNSUPPORTED[name]
            text += f" (qjournal: only {only})" if only is not None else " (qjournal: not supported)"
        lines.append(f"  {f'{name}=<{kind}>':<22} - {text}")
    return lines


def _convert_compat(value: str) -> str:
    """QEMU's aliases: v2 is compat 0.10, v3 is compat 1.1."""
    return COMPAT_ALIASES.get(value, value) if isinstance(value, str) else value


@attrs.frozen
class CreateOptions:
    """The ``-o`` options of ``qemu-img create -f qcow2`` that qjournal implements.

    An instance always obeys QEMU 7.2's rules: the constructor raises
    :class:`~qjournal.errors.UsageError` naming the option and the rule otherwise.
    ``compat`` also takes QEMU's aliases ``v2`` and ``v3`` and stores ``0.10``/``1.1``.
    """

    compat: str = attrs.field(default="1.1", converter=_convert_compat)
    cluster_size: int = 1 << DEFAULT_CLUSTER_BITS
    refcount_bits: int = 1 << DEFAULT_REFCOUNT_ORDER
    lazy_refcounts: bool = False
    extended_l2: bool = False
    compression_type: str = "zlib"
    backing_file: str | None = None
    backing_fmt: str | None = None
    data_file: str | None = None
    data_file_raw: bool = False

    def __attrs_post_init__(self) -> None:
        for name, kind in (("compat", str), ("cluster_size", int), ("refcount_bits", int),
                           ("lazy_refcounts", bool), ("extended_l2", bool), ("compression_type", str),
                           ("backing_file", str), ("backing_fmt", str), ("data_file", str),
                           ("data_file_raw", bool)):
            value = getattr(self, name)
            optional = name in ("backing_file", "backing_fmt", "data_file")
            if not (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
                    or optional and value is None):
                raise UsageError(f"{name}={value!r}: must be of type {kind.__name__}")
        # The rules in the order qcow2_co_create checks them, so the first broken one
        # is the one QEMU reports.
        if self.compat not in ("0.10", "1.1"):
            raise UsageError(f"compat={self.compat}: expected 0.10 (v2) or 1.1 (v3)")
        v2 = self.compat == "0.10"
        if self.extended_l2 and v2:
            raise UsageError("extended_l2=on needs compat=1.1")
        cs = self.cluster_size
        if not (MIN_CLUSTER_SIZE <= cs <= MAX_CLUSTER_SIZE and cs & (cs - 1) == 0):
            raise UsageError(f"cluster_size={cs}: must be a power of two between {MIN_CLUSTER_SIZE} and "
                             f"{MAX_CLUSTER_SIZE >> 20}M")
        if self.extended_l2 and cs < MIN_EXTL2_CLUSTER_SIZE:
            raise UsageError(f"extended_l2=on needs cluster_size of at least {MIN_EXTL2_CLUSTER_SIZE >> 10}k, "
                             f"not {cs}")
        if self.backing_fmt is not None and self.backing_file is None:
            raise UsageError(f"backing_fmt={self.backing_fmt} given without backing_file")
        if self.lazy_refcounts and v2:
            raise UsageError("lazy_refcounts=on needs compat=1.1")
        rb = self.refcount_bits
        if not (0 < rb <= 1 << MAX_REFCOUNT_ORDER and rb & (rb - 1) == 0):
            raise UsageError(f"refcount_bits={rb}: must be a power of two no larger than {1 << MAX_REFCOUNT_ORDER}")
        if v2 and rb != 1 << REFCOUNT_ORDER_V2:
            raise UsageError(f"refcount_bits={rb} needs compat=1.1 (a compat=0.10 image has 16-bit refcounts)")
        if self.data_file_raw and self.data_file is None:
            raise UsageError("data_file_raw=on needs data_file")
        if self.data_file_raw and self.backing_file is not None:
            raise UsageError("data_file_raw=on and backing_file cannot be used together")
        if self.data_file is not None and v2:
            raise UsageError("data_file needs compat=1.1")
        if self.compression_type not in COMPRESSION_TYPES:
            raise UsageError(f"compression_type={self.compression_type}: expected zlib or zstd")
        if self.compression_type != "zlib" and v2:
            raise UsageError(f"compression_type={self.compression_type} needs compat=1.1")
        if self.backing_file == "":
            raise UsageError("backing_file is an empty string: expected a file name")
        if self.data_file == "":
            raise UsageError("data_file is an empty string: expected a file name")
        if self.backing_fmt is not None and self.backing_fmt not in BACKING_FORMATS:
            raise UsageError(f"backing_fmt={self.backing_fmt}: qjournal reads only qcow2 and raw backing files")
        for name in ("backing_file", "data_file"):
            value = getattr(self, name)
            if value is not None and _has_protocol(value):
                raise UsageError(f"{name}={value}: protocol prefixes are not supported "
                                 f"(write ./{value} for a local file)")

    @property
    def version(self) -> int:
        """The header version: 2 for compat 0.10, 3 for compat 1.1."""
        return 2 if self.compat == "0.10" else 3


def _has_protocol(name: str) -> bool:
    """QEMU's ``path_has_protocol``: a colon before any slash names a protocol."""
    return ":" in name.split("/", 1)[0]


# --------------------------------------------------------------------------- parsing

def option_lists(specs: Sequence[str], backing_file: str | None, backing_fmt: str | None) -> CreateOptions:
    """The ``-o`` lists of ``qemu-img create`` (later ones win), with ``-b``/``-F`` added last."""
    extra = [f"{key}={value.replace(',', ',,')}" for key, value in
             (("backing_file", backing_file), ("backing_fmt", backing_fmt)) if value]
    return parse_options(",".join([s for s in specs if s] + extra))


def _parse_bool(key: str, value: str) -> bool:
    if value not in _BOOL_WORDS:
        raise UsageError(f"{key}={value}: expected on or off")
    return _BOOL_WORDS[value]


def parse_options(spec: str) -> CreateOptions:
    """Parse the ``-o`` string of ``qemu-img create -f qcow2`` into :class:`CreateOptions`.

    Same syntax as qemu-img (``cluster_size=64k,lazy_refcounts=on``, ``,,`` escapes a
    comma in a value, a later duplicate wins, an empty string means all defaults) and
    the same accepted values (``compat`` 0.10/1.1/v2/v3; booleans on/off/yes/no/true/
    false/y/n; sizes with suffixes; numbers in decimal, 0x hex or 0 octal). Raises
    :class:`~qjournal.errors.UsageError` naming the option and the rule.
    """
    values: dict[str, object] = {}
    for key, value in split_options(spec):
        if key in ("help", "?"):
            raise UsageError("qcow2 create options: " + ", ".join(f.name for f in attrs.fields(CreateOptions))
                             + " (qjournal create -o help lists them all)")
        if key == "id":
            continue  # QEMU ignores it too
        if key in _UNSUPPORTED:
            if _UNSUPPORTED[key] is not None and value == _UNSUPPORTED[key]:
                continue
            raise UsageError(f"{key}={value}: not supported by qjournal create")
        if key == "size":
            raise UsageError("size: give the size as the SIZE argument, not as an option")
        if key == "cluster_size":
            try:
                values[key] = strtosz(value)
            except (ValueError, OverflowError):
                raise UsageError(f"cluster_size={value}: expected a size such as 64k") from None
        elif key == "refcount_bits":
            try:
                bits = strtou64(value)
            except (ValueError, OverflowError):
                raise UsageError(f"refcount_bits={value}: expected a number") from None
            if not (0 < bits <= 1 << MAX_REFCOUNT_ORDER and bits & (bits - 1) == 0):
                raise UsageError(f"refcount_bits={value}: must be a power of two no larger than "
                                 f"{1 << MAX_REFCOUNT_ORDER}")
            values[key] = bits
        elif key in ("lazy_refcounts", "extended_l2", "data_file_raw"):
            values[key] = _parse_bool(key, value)
        elif key == "compat":
            if value not in COMPAT_ALIASES:
                raise UsageError(f"compat={value}: expected 0.10, 1.1, v2 or v3")
            values[key] = value
        elif key in ("compression_type", "backing_file", "backing_fmt", "data_file"):
            values[key] = value
        else:
            raise UsageError(f"unknown option {key!r}: known are "
                             + ", ".join(f.name for f in attrs.fields(CreateOptions)))
    return CreateOptions(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- layout

class _Again(Exception):
    """QEMU's -EAGAIN: a refcount block was just placed; the allocation restarts."""


class _QemuAllocator:
    """QEMU 7.2's qcow2 cluster allocator, reduced to what image creation exercises.

    State: a refcount per host cluster (``rc``, dense), the refcount table (offsets of
    the blocks, 0 where none), ``free_cluster_index`` where the next first-fit search
    starts, and the extent of every byte QEMU has written (``end``). Refcount blocks
    hold exactly ``rc`` over their range, so their bytes are produced at the end.
    Freed refcount tables keep their last contents on disk: ``stale`` lists them.

    The methods mirror ``alloc_clusters_noref``, ``update_refcount``,
    ``alloc_refcount_block``, ``qcow2_refcount_area`` and ``qcow2_alloc_clusters``
    in block/qcow2-refcount.c, step for step.
    """

    def __init__(self, cluster_bits: int, refcount_order: int) -> None:
        self.cluster_bits = cluster_bits
        self.cluster_size = cs = 1 << cluster_bits
        self.refcount_order = refcount_order
        self.block_bits = cluster_bits + 3 - refcount_order
        self.block_entries = 1 << self.block_bits
        self.rc = np.zeros(1024, dtype=np.uint64)
        # The image as qcow2_co_create writes it before opening it: header cluster,
        # a one-cluster refcount table pointing at an empty block in cluster 2.
        self.reftable = [2 * cs] + [0] * (cs // RT_ENTRY_SIZE - 1)
        self.reftable_offset = cs
        self.max_reftable_index = 0
        self.free_cluster_index = 0
        self.end = 3 * cs
        self.stale: list[tuple[int, bytes]] = []

    def _grow(self, clusters: int) -> None:
        if clusters > len(self.rc):
            bigger = np.zeros(max(clusters, 2 * len(self.rc)), dtype=np.uint64)
            bigger[:len(self.rc)] = self.rc
            self.rc = bigger

    def note_write(self, offset: int, length: int) -> None:
        """QEMU wrote ``length`` bytes at ``offset``: the file reaches at least their end."""
        self.end = max(self.end, offset + length)

    def alloc_noref(self, nb_clusters: int) -> int:
        """First fit from free_cluster_index for ``nb_clusters`` clusters of refcount 0."""
        start = self.free_cluster_index
        if start < len(self.rc) and (nb_clusters > 1 or self.rc[start]):
            used = np.flatnonzero(self.rc[start:])
            starts = np.concatenate(([0], used + 1))
            gaps = np.concatenate((used, [np.iinfo(np.int64).max])) - starts
            start += int(starts[np.flatnonzero(gaps >= nb_clusters)[0]])
        self.free_cluster_index = start + nb_clusters
        return start << self.cluster_bits

    def update(self, offset: int, length: int, decrease: bool = False) -> None:
        """Add (or take) 1 to the refcount of every cluster in the byte range.

        A refcount block placed on the way raises _Again after the clusters done so
        far are put back and the free-cluster search is moved back to ``offset``, as
        QEMU's ``update_refcount`` does.
        """
        if length == 0:
            return
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        cur = first
        try:
            while cur <= last:
                self.alloc_refcount_block(cur)
                seg_end = min(last + 1, ((cur >> self.block_bits) + 1) << self.block_bits)
                self._grow(seg_end)
                seg = self.rc[cur:seg_end]
                if decrease:
                    seg -= np.uint64(1)
                else:
                    seg += np.uint64(1)
                zeros = np.flatnonzero(seg == 0)
                if len(zeros) and cur + int(zeros[0]) < self.free_cluster_index:
                    self.free_cluster_index = cur + int(zeros[0])
                cur = seg_end
        except _Again:
            # QEMU retries from the same clusters first, after undoing what it counted.
            self.free_cluster_index = min(self.free_cluster_index, first)
            self.update(offset, (cur << self.cluster_bits) - offset, not decrease)
            raise

    def alloc_refcount_block(self, cluster_index: int) -> None:
        """Make sure the refcount block covering ``cluster_index`` exists."""
        table_index = cluster_index >> self.block_bits
        if table_index < len(self.reftable) and self.reftable[table_index]:
            return
        cs = self.cluster_size
        new_block = self.alloc_noref(1)
        block_cluster = new_block >> self.cluster_bits
        if block_cluster >> self.block_bits == table_index:
            self._grow(block_cluster + 1)
            self.rc[block_cluster] = 1  # the block describes itself
        else:
            self.update(new_block, cs)  # counted by another block (may raise _Again)
        self.note_write(new_block, cs)
        if table_index < len(self.reftable):
            self.reftable[table_index] = new_block
            self.max_reftable_index = max(self.max_reftable_index, table_index)
            raise _Again
        blocks_used = -(-max(cluster_index + 1, block_cluster + 1) // self.block_entries)
        self.refcount_area(blocks_used * self.block_entries * cs, table_index, new_block)
        raise _Again

    def refcount_area(self, start_offset: int, new_index: int, new_block: int) -> None:
        """Replace the refcount table by a self-covering area at ``start_offset``:
        new blocks for every uncovered index up to the end, then the new table."""
        cs = self.cluster_size
        total = metadata_clusters(start_offset // cs, cs, self.refcount_order, generous=True)[0]
        area_index = (start_offset // cs) >> self.block_bits
        table_size = total + -(-total // 2)
        table_size += -table_size % (cs // RT_ENTRY_SIZE)
        table_clusters = table_size * RT_ENTRY_SIZE // cs
        new_table = [0] * table_size
        keep = self.max_reftable_index + 1 if table_size > self.max_reftable_index else table_size
        new_table[:keep] = self.reftable[:keep]
        if new_block:
            new_table[new_index] = new_block
        missing = sum(1 for i in range(area_index, total) if not new_table[i])
        table_offset = start_offset + missing * cs
        end_offset = table_offset + table_clusters * cs
        block_offset = start_offset
        for i in range(area_index, total):
            if not new_table[i]:
                new_table[i] = block_offset
                self.note_write(block_offset, cs)
                block_offset += cs
            first_covered = i * self.block_entries * cs
            if first_covered < end_offset:
                j = (start_offset - first_covered) // cs if first_covered < start_offset else 0
                stop = min((end_offset - first_covered) // cs, self.block_entries)
                base = i * self.block_entries
                self._grow(base + stop)
                self.rc[base + j:base + stop] = 1
        self.note_write(table_offset, table_size * RT_ENTRY_SIZE)
        old_offset, old_table = self.reftable_offset, self.reftable
        self.stale.append((old_offset, struct.pack(f">{len(old_table)}Q", *old_table)))
        self.reftable, self.reftable_offset = new_table, table_offset
        idx = len(new_table) - 1
        while idx > 0 and not new_table[idx]:
            idx -= 1
        self.max_reftable_index = idx
        self.update(old_offset, len(old_table) * RT_ENTRY_SIZE, decrease=True)

    def alloc(self, size: int) -> int:
        """``qcow2_alloc_clusters``: allocate and count enough clusters for ``size`` bytes."""
        nb = -(-size // self.cluster_size)
        while True:
            offset = self.alloc_noref(nb)
            try:
                self.update(offset, size)
            except _Again:
                continue
            return offset

    def block_bytes(self, table_index: int) -> bytes:
        """The final contents of the refcount block at ``table_index``."""
        base = table_index * self.block_entries
        counts = np.zeros(self.block_entries, dtype=np.uint64)
        have = self.rc[base:base + self.block_entries]
        counts[:len(have)] = have
        return pack_block(counts, self.refcount_order)


@attrs.frozen
class _Layout:
    """Every byte range of a new image that is not zero, and the file length."""

    length: int
    writes: tuple[tuple[int, bytes], ...]
    l2_tables: tuple[int, ...]  # offsets of the preallocated L2 tables, in guest order


def _cluster0(options: CreateOptions, size: int, alloc: _QemuAllocator, l1_size: int, l1_offset: int) -> bytes:
    """The header cluster as ``qcow2_update_header`` writes it."""
    cs = alloc.cluster_size
    incompat = ((INCOMPAT_DATA_FILE if options.data_file is not None else 0)
                | (INCOMPAT_COMPRESSION if options.compression_type != "zlib" else 0)
                | (INCOMPAT_EXTL2 if options.extended_l2 else 0))
    exts: list[Extension] = []
    if options.backing_fmt is not None:
        exts.append(Extension(EXT_BACKING_FORMAT, options.backing_fmt.encode()))
    if options.data_file is not None:
        exts.append(Extension(EXT_DATA_FILE, os.fsencode(options.data_file)))
    if options.version == 3 and cs >= FEATURE_TABLE_MIN_CLUSTER_SIZE:
        exts.append(Extension(EXT_FEATURE_TABLE, pack_feature_table()))
    header_length = V2_LENGTH if options.version == 2 else QEMU_V3_LENGTH
    tail = pack_extensions(exts)
    backing = os.fsencode(options.backing_file) if options.backing_file is not None else b""
    backing_offset = header_length + len(tail) if backing else 0
    header = Header(
        version=options.version, backing_file_offset=backing_offset, backing_file_size=len(backing),
        cluster_bits=alloc.cluster_bits, size=size, crypt_method=CRYPT_NONE, l1_size=l1_size,
        l1_table_offset=l1_offset, refcount_table_offset=alloc.reftable_offset,
        refcount_table_clusters=len(alloc.reftable) * RT_ENTRY_SIZE // cs, nb_snapshots=0, snapshots_offset=0,
        incompatible_features=incompat if options.version == 3 else 0,
        compatible_features=COMPAT_LAZY_REFCOUNTS if options.lazy_refcounts else 0,
        autoclear_features=AUTOCLEAR_DATA_FILE_RAW if options.data_file_raw else 0,
        refcount_order=options.refcount_bits.bit_length() - 1, header_length=header_length,
        compression_type=COMPRESSION_TYPES[options.compression_type])
    return header.pack() + tail + backing


def _check_cluster0_room(options: CreateOptions) -> None:
    """Refuse names that QEMU cannot fit into cluster 0 (EINVAL / ENOSPC in QEMU)."""
    backing = os.fsencode(options.backing_file) if options.backing_file is not None else b""
    if len(backing) > MAX_BACKING_FILE_NAME:
        raise UsageError(f"backing_file name is {len(backing)} bytes; qcow2 allows at most {MAX_BACKING_FILE_NAME}")
    probe = _cluster0(options, 0, _QemuAllocator(options.cluster_size.bit_length() - 1,
                                                  options.refcount_bits.bit_length() - 1), 0, 0)
    if len(probe) > options.cluster_size:
        what = " and ".join(n for n in ("backing_file", "data_file") if getattr(options, n) is not None)
        raise UsageError(f"{what} name too long: the header would take {len(probe)} bytes of a "
                         f"{options.cluster_size}-byte cluster 0; use a shorter name or larger clusters")


def _layout(size: int, options: CreateOptions) -> _Layout:
    """Where QEMU puts every structure of a new image of ``size`` bytes (a multiple of 512)."""
    cluster_bits = options.cluster_size.bit_length() - 1
    alloc = _QemuAllocator(cluster_bits, options.refcount_bits.bit_length() - 1)
    cs = alloc.cluster_size
    first = alloc.alloc(3 * cs)
    assert first == 0, "a fresh image's first three clusters are free"
    l1_size = size_to_l1(size, 1 << cluster_bits, options.extended_l2)
    l1_offset = 0
    if l1_size:
        l1_offset = alloc.alloc(l1_size * L1_ENTRY_SIZE)
        alloc.note_write(l1_offset, l1_size * L1_ENTRY_SIZE)
    l2_tables: list[int] = []
    if options.data_file_raw:
        for _ in range(l1_size):
            l2 = alloc.alloc(cs)
            alloc.note_write(l2, cs)
            l2_tables.append(l2)
    writes: list[tuple[int, bytes]] = list(alloc.stale)
    writes.append((0, _cluster0(options, size, alloc, l1_size, l1_offset)))
    table = alloc.reftable
    writes.append((alloc.reftable_offset, struct.pack(f">{len(table)}Q", *table)))
    for i, block in enumerate(table):
        if block:
            writes.append((block, alloc.block_bytes(i)))
    if l1_size:
        l1 = np.zeros(l1_size, dtype=">u8")
        if l2_tables:
            l1[:] = np.array(l2_tables, dtype=np.uint64) | np.uint64(OFLAG_COPIED)
        writes.append((l1_offset, l1.tobytes()))
    return _Layout(alloc.end, tuple(writes), tuple(l2_tables))


def _l2_table(index: int, size: int, cluster_bits: int, extended_l2: bool) -> bytes:
    """Preallocated L2 table ``index``: guest cluster n at data-file offset n (COPIED)."""
    cs = 1 << cluster_bits
    per_table = l2_entries(cs, extended_l2)
    first = index * per_table
    count = min(per_table, -(-size // cs) - first)
    offsets = (np.arange(first, first + count, dtype=np.uint64) << np.uint64(cluster_bits)) \
        | np.uint64(OFLAG_COPIED)
    stride = cs // per_table // L2_ENTRY_SIZE   # u64 words per entry: 2 with the subcluster bitmap
    words = np.zeros(cs // L2_ENTRY_SIZE, dtype=">u8")
    words[0:count * stride:stride] = offsets
    return words.tobytes()


# --------------------------------------------------------------------------- creation

def _backing_size(image: str, name: str, fmt: str | None) -> int:
    """Open the backing file ``name`` as QEMU does (relative to the image's directory)
    and return its virtual size; refuse a missing ``fmt`` as QEMU 7.2 does."""
    full = name if os.path.isabs(name) else os.path.join(os.path.dirname(image), name)
    try:
        with open(full, "rb") as f:
            head = f.read(MAX_CLUSTER_SIZE)
            file_size = f.seek(0, os.SEEK_END)
    except OSError as e:
        raise UsageError(f"could not open backing file {full!r}: {e.strerror}") from None
    detected = "qcow2" if head[:4] == MAGIC else "raw"
    if fmt is None:
        raise UsageError(f"backing_file given without backing_fmt (it looks like {detected}); "
                         f"add backing_fmt={detected}")
    if fmt == "raw":
        return file_size
    try:
        header = Header.parse(head, file_size)
    except FormatError as e:
        raise UsageError(f"backing file {full!r} is not a usable qcow2 image: {e}") from None
    unknown = header.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        raise UsageError(f"backing file {full!r} uses unknown incompatible qcow2 features {unknown:#x}")
    return header.size


def check_not_in_use(path: str) -> None:
    """Refuse a target that a running QEMU (or qjournal) holds, as qemu-img does."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    except OSError as e:
        raise UsageError(f"could not create {path!r}: {e.strerror}") from None
    try:
        acquire(fd, path, writable=True)
    finally:
        os.close(fd)  # drops the probe's locks with its open file description


def _replace_file(path: str, length: int, writes: Iterable[tuple[int, bytes]],
                  stale: Iterable[str] = ()) -> None:
    """Write a new file of ``length`` bytes holding ``writes`` (zeros elsewhere) and
    rename it over ``path``, so that the path names the old file or the whole new one.
    The files named in ``stale`` (the old image's journal) are removed before the rename.

    Barriers: the new file is fsynced; then the stale files are unlinked and their
    directory fsynced; then the rename, and the directory fsynced after it. A crash
    before the unlinks leaves the old file with its journal (and at worst a stray
    temporary file); between the unlinks and the rename, the old file without its
    journal, which a reader that ignores the journal sees consistent anyway by the
    ordering rule (and the user was replacing it); after the rename, the complete new
    file and no journal that belonged to the old one. The other order would let a
    crash leave the new image beside a journal whose binding check fails on it.
    """
    target = os.path.realpath(path)
    directory = os.path.dirname(target)
    try:
        old_mode: int | None = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        old_mode = None
    while True:
        tmp = os.path.join(directory, f".{os.path.basename(target)}.{os.urandom(4).hex()}.tmp")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise UsageError(f"could not create {path!r}: {e.strerror}") from None
    try:
        try:
            if old_mode is not None:
                os.fchmod(fd, old_mode)  # replacing a file keeps its permissions, as QEMU's truncate does
            os.ftruncate(fd, length)
            for offset, data in writes:
                os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        for name in stale:
            try:
                os.unlink(name)
            except FileNotFoundError:
                continue
            fsync_directory(name)
        os.rename(tmp, target)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise UsageError(f"could not write {path!r}: {e.strerror or e}") from None
        raise
    fsync_directory(target)


def _image_writes(layout: _Layout, size: int, options: CreateOptions) -> Iterator[tuple[int, bytes]]:
    """The layout's writes, then the preallocated L2 tables one at a time."""
    yield from layout.writes
    bits = options.cluster_size.bit_length() - 1
    for i, offset in enumerate(layout.l2_tables):
        yield offset, _l2_table(i, size, bits, options.extended_l2)


def create_image(path: str, size: int | None, options: CreateOptions) -> None:
    """Create the qcow2 image ``path`` of ``size`` bytes as ``qemu-img create -f qcow2`` does.

    ``size`` is rounded up to a multiple of 512 (as QEMU does). ``None`` takes the
    virtual size of the backing file (opened relative to the image's directory, as
    ``backing_fmt`` says). An existing file is replaced, unless QEMU holds it, and its
    journal sidecar (``path.qjournal``) is removed with it. With
    ``data_file``, that file (relative to the current directory, as QEMU creates it)
    is replaced by an empty one of the disk's size, and its name is stored as given.

    Everything is checked before anything is written; a refused request leaves no new
    file. Raises :class:`~qjournal.errors.UsageError` (or ``LockError`` for an image
    in use) with a one-line message.
    """
    path = os.fspath(path)
    if options.backing_file is not None:
        if options.backing_file == path:
            raise UsageError(f"backing_file {path!r} is the image being created")
        backing_size = _backing_size(path, options.backing_file, options.backing_fmt)
        if size is None:
            size = backing_size
    if size is None:
        raise UsageError("no size given (and no backing file to take it from)")
    if not 0 <= size <= MAX_SIZE - SECTOR + 1:
        raise UsageError(f"image size {size} is out of range: must be between 0 and {MAX_SIZE - SECTOR + 1} "
                         f"(it is rounded up to a multiple of {SECTOR})")
    size += -size % SECTOR
    bits = options.cluster_size.bit_length() - 1
    if size_to_l1(size, 1 << bits, options.extended_l2) > MAX_L1_ENTRIES:
        raise UsageError(f"image size {size} is too large for qcow2 with {options.cluster_size}-byte clusters"
                         f"{' and extended L2' if options.extended_l2 else ''} (the L1 table would exceed "
                         "32 MiB); use larger clusters")
    _check_cluster0_room(options)
    if options.data_file is not None and os.path.realpath(options.data_file) == os.path.realpath(path):
        raise UsageError(f"data_file {options.data_file!r} is the image being created")
    for target in (path, options.data_file):
        if target is not None:
            if os.path.isdir(target):
                raise UsageError(f"could not create {target!r}: {os.strerror(errno.EISDIR)}")
            if not os.path.isdir(os.path.dirname(os.path.realpath(target))):
                raise UsageError(f"could not create {target!r}: {os.strerror(errno.ENOENT)}")
            check_not_in_use(target)
    layout = _layout(size, options)
    if options.data_file is not None:
        data_size = size
        if options.data_file_raw:
            unit = options.cluster_size // (SUBCLUSTERS if options.extended_l2 else 1)
            data_size = size + -size % unit
        _replace_file(options.data_file, data_size, ())
    # The old file's journal must not survive it: its binding check would fail on the
    # new image, and every writable open would then refuse the new image.
    journals = dict.fromkeys((path + JOURNAL_SUFFIX, os.path.realpath(path) + JOURNAL_SUFFIX))
    _replace_file(path, layout.length, _image_writes(layout, size, options), journals)


__all__ = ["CreateOptions", "OPTION_HELP", "create_image", "option_help", "option_lists", "parse_options"]

"""An open qcow2 image: validation, cached metadata and journaled transactions.

Opening reads only metadata (header cluster, tables, bitmap directory) through the
memory map; nothing is read as a whole. Every cache here is derived from the image
and rebuilt after each commit or abort, never trusted across a crash.

Every change is a transaction (:meth:`Image.transaction`, a
:class:`~qjournal.core.transaction.Transaction`). Operations declare what they write
per phase (new clusters, refcount changes, tables, directory, header fields, frees)
and write new data only into clusters nothing references yet. At commit the one
ordering table (:mod:`qjournal.core.ordering`) turns the declaration into ordered
steps, and the journal makes them durable in one sync and applies them with a barrier
between steps.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Callable, Iterator

import attrs

from ..format.lazy import np
from ..storage import lock
from .allocator import Allocator
from ..errors import FormatError, ImageNotFoundError, JournalError, StaleJournalWarning, UnsupportedError, UsageError
from ..format import bitmaps as bm
from ..format.extensions import (EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE, KNOWN, crypto_header_span,
                                Extension, parse_extensions)
from ..format.header import (AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, COMPRESSION_NAMES,
                             CRYPT_AES, CRYPT_LUKS, FIELD_OFFSET, TAIL_OFFSET, INCOMPAT_CORRUPT, INCOMPAT_DIRTY,
                             INCOMPAT_KNOWN, Header)
from ..format.luks import HEADER_SIZE as LUKS_HEADER_SIZE, luks_info
from ..format.geometry import STAT_BLOCK
from ..format.snapshots import MAX_TABLE_BYTES, MoreNeeded, Snapshot, parse_snapshots
from ..format.tables import L1E_OFFSET_MASK
from .cluster0 import Cluster0
from .ordering import plan
from .overlap import OverlapMap
from .transaction import CommitObserver, Transaction
from ..journal import Journal, Transaction as JournalTransaction
from ..journal.journal import SaltSource
from ..storage.medium import Medium, MmapMedium
from ..storage.overlay import OverlayMedium

SNAPSHOT_FIRST_READ = 64 << 10
"""Bytes of the snapshot table an open reads first (about 600 entries of a short name);
a longer table is read again, twice as much each time (see ``parse_snapshots``)."""


@attrs.frozen
class BitmapInfo:
    name: str
    granularity: int
    flags: tuple[str, ...]


@attrs.frozen
class ImageInfo:
    """What ``qjournal info`` reports; ``to_json()`` uses qemu-img's keys."""

    filename: str
    virtual_size: int
    cluster_size: int
    actual_size: int
    dirty_flag: bool
    compat: str
    compression_type: str
    lazy_refcounts: bool | None
    refcount_bits: int
    corrupt: bool
    extended_l2: bool
    bitmaps: tuple[BitmapInfo, ...] | None
    backing_filename: str | None
    full_backing_filename: str | None
    backing_format: str | None
    data_file: str | None
    data_file_raw: bool | None
    snapshots: tuple[Snapshot, ...]
    unknown_extensions: tuple[tuple[int, int], ...]
    encrypted: bool
    encrypt: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"compat": self.compat}
        if self.compat == "1.1":
            data["compression-type"] = self.compression_type
            data["lazy-refcounts"] = self.lazy_refcounts
            if self.bitmaps is not None:
                data["bitmaps"] = [{"flags": list(b.flags), "name": b.name, "granularity": b.granularity}
                                   for b in self.bitmaps]
            data["refcount-bits"] = self.refcount_bits
            if self.encrypt is not None:
                data["encrypt"] = self.encrypt
            if self.data_file is not None:
                data["data-file"] = self.data_file
            if self.data_file_raw is not None:
                data["data-file-raw"] = self.data_file_raw
            data["corrupt"] = self.corrupt
            data["extended-l2"] = self.extended_l2
        else:
            data["compression-type"] = self.compression_type
            data["refcount-bits"] = self.refcount_bits
            if self.encrypt is not None:
                data["encrypt"] = self.encrypt
        out: dict[str, Any] = {}
        if self.backing_format is not None:
            out["backing-filename-format"] = self.backing_format
        if self.snapshots:
            out["snapshots"] = [snapshot_json(s) for s in self.snapshots]
        out.update({
            "virtual-size": self.virtual_size,
            "filename": self.filename,
            "cluster-size": self.cluster_size,
            "format": "qcow2",
            "actual-size": self.actual_size,
        })
        if self.encrypted:
            out["encrypted"] = True
        out["format-specific"] = {"type": "qcow2", "data": data}
        if self.backing_filename is not None:
            out["full-backing-filename"] = self.full_backing_filename
            out["backing-filename"] = self.backing_filename
        out["dirty-flag"] = self.dirty_flag
        if self.unknown_extensions:
            out["qjournal-unknown-extensions"] = [{"type": f"{t:#010x}", "length": n}
                                                  for t, n in self.unknown_extensions]
        return out


def snapshot_json(s: Snapshot) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if s.icount is not None and s.icount != (1 << 64) - 1:
        d["icount"] = s.icount
    d.update({"vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000, "name": s.name, "date-sec": s.date_sec,
              "date-nsec": s.date_nsec, "vm-clock-sec": s.vm_clock_nsec // 1_000_000_000, "id": s.id,
              "vm-state-size": s.vm_state_size})
    return d


class Image:
    """An open qcow2 image: header, extensions, bitmap directory and snapshot table,
    validated, and the transactions that change them.

    This is the core layer; :class:`qjournal.api.Image` (what :func:`qjournal.open`
    returns) adds guest reads and writes, bitmaps, resize and check on top of it.
    """

    def __init__(self, path: str | os.PathLike[str], mode: str = "r", *, medium: Medium | None = None,
                 journal_medium: Medium | None = None, take_locks: bool = True, salvage: bool = False,
                 salts: SaltSource | None = None) -> None:
        """``salts`` is the journal's salt source (see :class:`qjournal.journal.Journal`):
        crashsim passes a seeded one so that its recordings repeat."""
        if mode not in ("r", "r+"):
            raise UsageError(f"mode {mode!r} is not 'r' or 'r+'")
        self.path = os.fspath(path)
        self.writable = mode == "r+"
        self.salvage = salvage
        self.bitmaps_damage: str | None = None
        self.closed = False
        self.stale_journal: str | None = None   # why the journal was not shown (read-only opens)
        self._tx: Transaction | None = None
        # Work owed before the first transaction, run once as a transaction of its own
        # (:class:`qjournal.api.Image` defers a dirty image's refcount rebuild to here).
        self.before_first_transaction: Callable[[], object] | None = None
        self._observers: list[CommitObserver] = []
        self._overlap: OverlapMap | None = None
        if medium is None:
            try:
                medium = MmapMedium(self.path, self.writable)
            except FileNotFoundError as e:
                raise ImageNotFoundError(f"{self.path}: cannot open: {e.strerror}", path=self.path) from None
            except OSError as e:
                raise UsageError(f"{self.path}: cannot open: {e.strerror}", path=self.path) from None
            if take_locks:
                try:
                    lock.acquire(medium.fd, self.path, self.writable)
                except Exception:
                    medium.close()
                    raise
        try:
            # The header must at least be a qcow2 header before a journal is trusted.
            Header.parse(medium.read(0, min(medium.size, 4096)))
            if journal_medium is not None:
                self.journal = Journal(medium, journal_medium, salts=salts)
            else:
                self.journal = Journal.open_for(self.path, medium, self.writable, salts=salts)
            if self.writable:
                self.journal.recover()
                self.medium: Medium = medium
            elif self.journal.pending():
                # Show the committed state only if the journal still belongs to the image
                # as it stands (the binding check); a stale journal (QEMU changed the
                # image after the crash) is never shown as the image's state.
                try:
                    self.journal.check_binding()
                except JournalError as e:
                    self.stale_journal = str(e)
                    warnings.warn(StaleJournalWarning(f"{self.path}: the journal is stale, showing the image as "
                                                      f"it stands on disk ({e})"), stacklevel=2)
                    self.medium = medium
                else:
                    self.medium = OverlayMedium(medium, self.journal.overlay())
            else:
                self.medium = medium
            self.reload()
        except BaseException:
            medium.close()
            raise

    # -- loading and validation ---------------------------------------------
    def reload(self) -> None:
        """Read and validate the metadata again (after a commit, or a change made outside)."""
        m = self.medium
        size = m.size
        head = m.read(0, min(size, 4096))
        hl = 0
        v, hlo = FIELD_OFFSET["version"], FIELD_OFFSET["header_length"]
        if len(head) >= hlo + 4 and int.from_bytes(head[v:v + 4], "big") == 3:
            hl = int.from_bytes(head[hlo:hlo + 4], "big")
        if hl > len(head):
            head = m.read(0, min(size, hl))
        h = Header.parse(head, size)
        cs = h.cluster_size
        self.header = h
        if h.incompatible_features & ~INCOMPAT_KNOWN:
            raise UnsupportedError(f"qcow2 header at offset 0x48: unknown incompatible feature bits "
                                   f"{h.incompatible_features & ~INCOMPAT_KNOWN:#x}; refusing to open")
        if self.writable and h.incompatible_features & INCOMPAT_CORRUPT and not self.salvage:
            raise UsageError(f"{self.path}: the corrupt bit is set; qjournal opens it read-only only "
                             "(repair it with qjournal check -r all)")
        if self.writable and h.crypt_method:
            raise UnsupportedError(f"{self.path}: encrypted images are not supported for writing")
        c0_len = min(cs, size)
        self._cluster0 = m.read(0, c0_len)
        self.extensions = parse_extensions(self._cluster0, h.length, c0_len)
        exts = {e.type: e for e in self.extensions}
        self.backing_name: bytes | None = None
        if h.backing_file_offset:
            end = h.backing_file_offset + h.backing_file_size
            if end > c0_len:
                raise FormatError("qcow2 header", 8, "backing file name lies past the end of the file")
            self.backing_name = self._cluster0[h.backing_file_offset:end]
            ext_end = Cluster0(h, self.extensions, None).ext_end
            if h.backing_file_offset < ext_end:
                raise FormatError("qcow2 header", 8, f"backing file name at {h.backing_file_offset:#x} overlaps "
                                  f"the header extensions (which end at {ext_end:#x})")
        self.backing_format = _text(exts, EXT_BACKING_FORMAT)
        self.data_file = _text(exts, EXT_DATA_FILE)
        if h.has_data_file and self.data_file is None:
            raise UnsupportedError("qcow2 header at offset 0x48: external data file bit set without a data file "
                                   "name extension; the data file must be named at open, which qjournal "
                                   "does not support")
        if h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW and not h.has_data_file:
            # QEMU's qcow2_do_open refuses the image ("data-file-raw requires a data file").
            raise FormatError("qcow2 header", FIELD_OFFSET["autoclear_features"],
                              "the data-file-raw autoclear bit is set, but the image has no external data file")
        self.snapshots: tuple[Snapshot, ...] = ()
        if h.nb_snapshots:
            avail = min(size - h.snapshots_offset, MAX_TABLE_BYTES)
            want = min(avail, SNAPSHOT_FIRST_READ)
            while True:     # short reads, doubled until the table fits (O(log) reads)
                try:
                    self.snapshots = parse_snapshots(m.read(h.snapshots_offset, want), h.snapshots_offset,
                                                     h.nb_snapshots, cs, size, avail)
                    break
                except MoreNeeded as more:
                    want = min(avail, max(more.needed, 2 * want))
        self.entries: list[bm.DirectoryEntry] = []
        self.bitmaps_ext: bm.BitmapsExtension | None = None
        self.stale_bitmaps_ext = EXT_BITMAPS in exts and not h.bitmaps_consistent
        if EXT_BITMAPS in exts:
            if h.version < 3:
                self.stale_bitmaps_ext = True
            ext = exts[EXT_BITMAPS]
            if len(ext.data) != bm.EXT_SIZE:
                raise FormatError("bitmaps extension", ext.offset, f"length {len(ext.data)} is not {bm.EXT_SIZE}")
            if not self.stale_bitmaps_ext:
                try:
                    self._load_bitmaps(ext)
                except FormatError as err:
                    if not self.salvage:
                        raise
                    # check -r all drops what it cannot read, by the autoclear rule.
                    self.bitmaps_damage = str(err)
                    self.bitmaps_ext, self.entries, self.stale_bitmaps_ext = None, [], True
        self._check_overlaps(self.metadata_ranges())
        self._overlap = None

    def _load_bitmaps(self, ext: Extension) -> None:
        m, cs, size = self.medium, self.header.cluster_size, self.medium.size
        self.bitmaps_ext = be = bm.BitmapsExtension.parse(ext.data, ext.offset, cs, size)
        self.entries = list(bm.parse_directory(m.read(be.directory_offset, be.directory_size),
                                               be.directory_offset, be.nb_bitmaps, cs, size, self.header.size))
        tables = {e.name: self.bitmap_table(e) for e in self.entries}
        for e in self.entries:
            bm.validate_table(tables[e.name], e.name, e.table_offset, cs, size)
        self._check_overlaps(self.metadata_ranges(), tables)

    def bitmap_table(self, e: bm.DirectoryEntry) -> np.ndarray:
        """The bitmap table of ``e`` as uint64 (a copy)."""
        return self.reader.array(e.table_offset, e.table_size, ">u8").astype(np.uint64)

    def metadata_ranges(self) -> list[tuple[int, int, str]]:
        """(offset, length, what) of every metadata structure except L2 tables and refcount blocks."""
        h, cs = self.header, self.header.cluster_size
        out = [(0, cs, "header cluster"),
               (h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")]
        if h.l1_size:
            out.append((h.l1_table_offset, h.l1_size * 8, "L1 table"))
        if h.nb_snapshots:
            end = self.snapshots[-1].offset + len(self.snapshots[-1].pack()) if self.snapshots else h.snapshots_offset
            out.append((h.snapshots_offset, end - h.snapshots_offset, "snapshot table"))
        if self.bitmaps_ext:
            out.append((self.bitmaps_ext.directory_offset, self.bitmaps_ext.directory_size, "bitmap directory"))
            for e in self.entries:
                if e.table_size:
                    out.append((e.table_offset, e.table_size * 8, f"bitmap table of {e.name!r}"))
        return out

    def overlap_map(self) -> OverlapMap:
        """Every cluster a structure in use occupies (see :mod:`qjournal.core.overlap`);
        built on first use after each load."""
        if self._overlap is None:
            h = self.header
            snaps = [(s.l1_table_offset, s.l1_size, f" of snapshot {s.name!r}") for s in self.snapshots]
            ranges = self.metadata_ranges() + [(off, n * 8, f"L1 table{whose}") for off, n, whose in snaps]
            self._overlap = OverlapMap.build(
                self.medium, h.cluster_size, ranges, [(h.l1_table_offset, h.l1_size, "")] + snaps,
                (h.refcount_table_offset, h.refcount_table_clusters),
                [(self.bitmap_table(e), repr(e.name)) for e in self.entries])
        return self._overlap

    def _check_overlaps(self, ranges: list[tuple[int, int, str]],
                        tables: dict[str, np.ndarray] | None = None) -> None:
        """QEMU's overlap rule: no two structures share a cluster."""
        cs = self.header.cluster_size
        owner: dict[int, str] = {}
        for off, length, what in ranges:
            for c in range(off // cs, (off + max(length, 1) - 1) // cs + 1):
                if c in owner:
                    raise FormatError(what, off, f"overlaps the {owner[c]} in cluster {c * cs:#x}")
                owner[c] = what
        for e in self.entries if tables is not None else ():
            t = tables[e.name]  # type: ignore[index]
            offs = t & np.uint64(bm.TE_OFFSET_MASK)
            offs = offs[offs != 0] // np.uint64(cs)
            uniq, counts = np.unique(offs, return_counts=True)
            if len(uniq) and counts.max() > 1:
                c = int(uniq[np.argmax(counts)])
                raise FormatError(f"bitmap table of {e.name!r}", e.table_offset,
                                  f"data cluster {c * cs:#x} is used twice")
            for c in uniq:
                if int(c) in owner:
                    raise FormatError(f"bitmap table of {e.name!r}", e.table_offset,
                                      f"data cluster {int(c) * cs:#x} overlaps the {owner[int(c)]}")
                owner[int(c)] = f"bitmap data of {e.name!r}"

    def l1_table(self) -> np.ndarray:
        h = self.header
        return self.medium.array(h.l1_table_offset, h.l1_size, ">u8").astype(np.uint64)

    def l2_offsets(self) -> np.ndarray:
        l1 = self.l1_table() & np.uint64(L1E_OFFSET_MASK)
        return l1[l1 != 0]

    # -- info ---------------------------------------------------------------
    def info(self) -> ImageInfo:
        h = self.header
        bitmaps = None
        if h.version >= 3 and self.entries:
            bitmaps = tuple(BitmapInfo(e.name, e.granularity,
                                       tuple(f for f, on in (("in-use", e.in_use), ("auto", e.auto)) if on))
                            for e in self.entries)
        backing = self.backing_name.split(b"\0", 1)[0].decode("utf-8", "replace") if self.backing_name is not None else None
        full = None
        if backing is not None:
            full = backing if os.path.isabs(backing) or ":" in backing.split("/")[0] else \
                os.path.join(os.path.dirname(self.path), backing)
        try:
            st = os.stat(self.path)
            actual = st.st_blocks * STAT_BLOCK
        except OSError:
            actual = self.medium.size
        unknown = tuple((e.type, len(e.data)) for e in self.extensions if e.type not in KNOWN)
        encrypt: dict[str, Any] | None = None
        if h.crypt_method == CRYPT_AES:
            encrypt = {"format": "aes"}
        elif h.crypt_method == CRYPT_LUKS:
            ext = next((e for e in self.extensions if e.type == EXT_CRYPTO), None)
            span = crypto_header_span(ext.data) if ext is not None else None
            if ext is None or span is None:
                raise FormatError("qcow2 header", FIELD_OFFSET["crypt_method"],
                                  "LUKS encryption without a full disk encryption extension")
            loff = span[0]
            if loff + LUKS_HEADER_SIZE > self.medium.size:
                raise FormatError("full disk encryption extension", ext.offset,
                                  f"LUKS header at {loff:#x} runs past the end of the file")
            encrypt = luks_info(self.medium.read(loff, LUKS_HEADER_SIZE), loff)
        return ImageInfo(
            filename=self.path, virtual_size=h.size, cluster_size=h.cluster_size, actual_size=actual,
            dirty_flag=bool(h.incompatible_features & INCOMPAT_DIRTY),
            compat="1.1" if h.version >= 3 else "0.10",
            compression_type=COMPRESSION_NAMES[h.compression_type],
            lazy_refcounts=bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS) if h.version >= 3 else None,
            refcount_bits=h.refcount_bits, corrupt=bool(h.incompatible_features & INCOMPAT_CORRUPT),
            extended_l2=h.extended_l2, bitmaps=bitmaps, backing_filename=backing, full_backing_filename=full,
            backing_format=self.backing_format, data_file=self.data_file,
            data_file_raw=bool(h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW) if self.data_file is not None else None,
            snapshots=self.snapshots, unknown_extensions=unknown, encrypted=bool(h.crypt_method),
            encrypt=encrypt)

    # -- cluster 0 as it stands -----------------------------------------------
    @property
    def cluster0_bytes(self) -> bytes:
        """Cluster 0 (header, extensions, backing file name) as the file holds it."""
        return self._cluster0

    @property
    def cluster0(self) -> Cluster0:
        """The visible layout of cluster 0: header, extensions, backing name, kept tail."""
        h = self.header
        tail = self._cluster0[TAIL_OFFSET:h.header_length] if h.version >= 3 and h.header_length > TAIL_OFFSET else b""
        return Cluster0(h, self.extensions, self.backing_name, tail)

    @property
    def backing_span(self) -> tuple[int, int] | None:
        """(offset, length) of the backing file name in cluster 0, or None."""
        if self.backing_name is None:
            return None
        return self.header.backing_file_offset, self.header.backing_file_size

    # -- transactions -------------------------------------------------------
    @property
    def staged(self) -> Transaction | None:
        """The open transaction, or None outside ``with img.transaction():``."""
        return self._tx

    def require_transaction(self) -> Transaction:
        """The open transaction; RuntimeError outside ``with img.transaction():``."""
        if self._tx is None:
            raise RuntimeError("no transaction is open (use `with img.transaction():`)")
        return self._tx

    def observe_commits(self, observer: CommitObserver) -> None:
        """Call ``observer("begin", description)`` before each commit writes anything and
        ``observer("end", description)`` after it: the seam crashsim brackets transactions by."""
        self._observers.append(observer)

    def settle(self) -> None:
        """Run the work owed before the first transaction (:attr:`before_first_transaction`)
        now, if it has not run yet. Every outermost transaction begins with it."""
        if self.before_first_transaction is not None:
            owed, self.before_first_transaction = self.before_first_transaction, None
            try:
                owed()
            except BaseException:
                self.before_first_transaction = owed     # still owed: no transaction goes without it
                raise

    @contextlib.contextmanager
    def transaction(self, description: str = "transaction", *,
                    refcount_table: tuple[int, int] | None = None, refcount_order: int | None = None,
                    refcount_structure: list[tuple[int, bytes]] | None = None) -> Iterator[Transaction]:
        """Make every operation inside one atomic unit (nested calls join the outer one).

        ``refcount_table`` (offset, clusters) makes the transaction count with a new
        refcount table that its header switch puts in place: already written and synced
        (``check -r all`` rebuilding the refcount structure), or given as
        ``refcount_structure``, the (offset, bytes) of its blocks and table, staged as new
        clusters of this transaction (written and synced before the commit).
        ``refcount_order`` gives the new structure another width, switched by the same
        header write (``amend -o refcount_bits=N``).
        """
        self.ensure_open()
        if self._tx is not None:
            if refcount_table is not None:
                raise UsageError("a refcount table switch cannot join an open transaction")
            self._tx.descriptions.append(description)
            yield self._tx
            return
        if not self.writable:
            raise UsageError(f"{self.path}: the image is open read-only")
        if refcount_table is None and (refcount_order is not None or refcount_structure):
            raise ValueError("a new refcount width or structure needs its refcount_table")
        self.settle()
        h = self.header
        rt_offset, rt_clusters = refcount_table or (h.refcount_table_offset, h.refcount_table_clusters)
        order = h.refcount_order if refcount_order is None else refcount_order
        staged = list(refcount_structure or [])
        counted: Medium = OverlayMedium(self.medium, staged) if staged else self.medium
        alloc = Allocator(counted, h.cluster_bits, order, rt_offset, rt_clusters,
                          in_use=lambda: self.overlap_map().clusters)
        self._tx = tx = Transaction(self.medium, alloc, list(self.entries), description)
        for off, data in staged:
            tx.write_new(off, data)
        if refcount_table is not None:
            tx.set_header(refcount_table_offset=rt_offset, refcount_table_clusters=rt_clusters)
        if refcount_order is not None:
            tx.set_header(refcount_order=order)
        size = self.medium.size
        try:
            yield tx
            self._commit(tx)
        except BaseException:
            if not tx.committed and self.medium.size > size and not self.journal.pending():
                # Guest data went into new clusters past the old end; nothing maps them.
                self.medium.resize(size)
            raise
        finally:
            self._tx = None
            if tx.guest is not None:
                tx.guest.close()
            self.reload()

    def _commit(self, tx: Transaction) -> None:
        for observer in self._observers:
            observer("begin", tx.description)
        try:
            if tx.guest is not None:
                tx.guest.finalize()  # guest data durable; mapping staged in its phases
            steps = plan(self, tx)
            if steps:
                # Ordered mode: everything written into new clusters is durable before the
                # commit that makes anything point at it. A crash before the commit leaves
                # unreferenced clusters (and perhaps a longer file): invisible to every reader.
                overlap = self.overlap_map()
                for off, data in tx.new_writes:
                    overlap.check_write(off, len(data), "new cluster")
                # A write into a cluster two structures claim corrupts one of them. A repair
                # (check -r) writes there to drop the bad claim; still never over the header,
                # unless the other claim is a refcount block that the repair's new table drops.
                repair = tx.repairing
                new_refcounts = "refcount_table_offset" in tx.header_fields
                for name, writes in steps:
                    for off, data in writes:
                        overlap.check_shared(off, len(data), f"{name} write", only_header=repair,
                                             but_refcount_blocks=new_refcounts)
                if tx.new_writes:
                    self.medium.event("cluster_alloc")  # for fault injection: the new clusters follow
                for off, data in tx.new_writes:
                    self.medium.write(off, data)
                if tx.new_writes:
                    self.medium.flush([(off, len(data)) for off, data in tx.new_writes])
                jt = JournalTransaction(description=tx.description)
                for name, writes in steps:
                    jt.step(name)
                    for off, data in writes:
                        jt.write(off, data)
                self.journal.commit(jt)
                tx.committed = True
            if tx.guest is not None:
                tx.guest.after_commit()  # in-place data that waited for the bitmap bits
        finally:
            for observer in self._observers:
                observer("end", tx.description)

    @property
    def reader(self) -> Medium:
        """The medium as the open transaction sees it (staged new clusters included)."""
        return self._tx.reader if self._tx is not None else self.medium

    # -- lifetime -------------------------------------------------------------
    def ensure_open(self) -> None:
        """Raise ValueError (as io does) when the image was closed."""
        if self.closed:
            raise ValueError(f"I/O operation on a closed image ({self.path})")

    def close(self) -> None:
        """Release the journal, the locks and the map. Closing twice does nothing."""
        if self.closed:
            return
        self.closed = True
        if getattr(self, "journal", None) is not None:
            self.journal.close()
        self.medium.close()

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _text(exts: dict[int, Extension], etype: int) -> str | None:
    e = exts.get(etype)
    # QEMU reads the name as a C string: it ends at the first NUL byte.
    return e.data.split(b"\0", 1)[0].decode("utf-8", "replace") if e is not None else None

"""The overlap map: every cluster a structure in use occupies, built from the structures.

QEMU refuses any write that would land on metadata in use (block/qcow2-refcount.c,
``qcow2_check_metadata_overlap``). Its map is built from the structures themselves,
never from the refcounts, and so is this one: a damaged image can claim with a
refcount of 0 that its L2 table is free, and an editor that trusts that claim
allocates the table as a new cluster and overwrites it.

Structures mapped: the header cluster, the refcount table and every refcount block it
names, the active L1 table and those of the snapshots, every L2 table those name, the
snapshot table, the bitmap directory, every bitmap table and every bitmap data cluster.
Guest data clusters are not in it (QEMU's check leaves them out too; the refcounts and
the COPIED flags guard them).

Cost: O(L1 entries of the active table and every snapshot + bitmap table entries),
numpy throughout; built once per transaction, on first use.
"""
from __future__ import annotations

from typing import Iterable

from ..format.lazy import np
from ..errors import FormatError
from ..format.bitmaps import TE_OFFSET_MASK
from ..format.refcount import RT_OFFSET_MASK
from ..format.tables import L1E_OFFSET_MASK
from ..storage.medium import Medium

Range = tuple[int, int, str]


def _U(value: int) -> np.uint64:
    """``value`` as a numpy uint64 (a function, not ``np.uint64`` itself, so that importing
    this module does not import numpy: see :mod:`qjournal.format.lazy`)."""
    return np.uint64(value)


class OverlapMap:
    """Sorted cluster numbers of every structure in use, each with what it is."""

    def __init__(self, cluster_size: int, parts: Iterable[tuple[np.ndarray, str]]) -> None:
        self.cs = cluster_size
        parts = [(np.asarray(c, dtype=np.int64), name) for c, name in parts]
        self.labels = [name for _, name in parts]
        clusters = np.concatenate([c for c, _ in parts]) if parts else np.zeros(0, np.int64)
        names = np.concatenate([np.full(len(c), i) for i, (c, _) in enumerate(parts)]) if parts else \
            np.zeros(0, np.int64)
        order = np.argsort(clusters, kind="stable")
        self.clusters, self.names = clusters[order], names[order]
        # Clusters that two kinds of structure claim (L2 tables a snapshot shares are one kind).
        kinds = np.array([sorted(set(k.split(" of ")[0] for k in self.labels)).index(k.split(" of ")[0])
                          for k in self.labels] or [0], dtype=np.int64)[self.names] if len(self.names) else self.names
        same = (self.clusters[1:] == self.clusters[:-1]) & (kinds[1:] != kinds[:-1])
        self.shared = {int(self.clusters[i]): (self.labels[int(self.names[i])], self.labels[int(self.names[i + 1])])
                       for i in np.nonzero(same)[0]}

    @classmethod
    def build(cls, medium: Medium, cluster_size: int, ranges: list[Range],
              l1_tables: list[tuple[int, int, str]], reftable: tuple[int, int],
              bitmap_tables: list[tuple[np.ndarray, str]]) -> "OverlapMap":
        """The map of an image: ``ranges`` (offset, length, what) of the structures that lie
        in one run (header cluster, refcount table, L1 tables, snapshot table, bitmap
        directory and tables), ``l1_tables`` (offset, entries, whose: "" for the active
        one, " of snapshot 'x'" for the others) whose L2 tables are mapped, the refcount table (offset, clusters) whose blocks are mapped, and each
        bitmap's table (uint64 entries) whose data clusters are mapped."""
        cs = cluster_size
        parts: list[tuple[np.ndarray, str]] = []
        for off, length, what in ranges:
            parts.append((np.arange(off // cs, (off + max(length, 1) - 1) // cs + 1, dtype=np.int64), what))
        rt = medium.array(reftable[0], reftable[1] * cs // 8, ">u8").astype(np.uint64) & _U(RT_OFFSET_MASK)
        parts.append(((rt[rt != 0] // _U(cs)).astype(np.int64), "refcount block"))
        for off, n, whose in l1_tables:
            l2 = medium.array(off, n, ">u8").astype(np.uint64) & _U(L1E_OFFSET_MASK)
            parts.append(((l2[l2 != 0] // _U(cs)).astype(np.int64), f"L2 table{whose}"))
        for table, whose in bitmap_tables:
            data = table & _U(TE_OFFSET_MASK)
            parts.append(((data[data != 0] // _U(cs)).astype(np.int64), f"bitmap data of {whose}"))
        return cls(cs, parts)

    def __len__(self) -> int:
        return len(self.clusters)

    def find(self, clusters: np.ndarray) -> tuple[int, int, str] | None:
        """The first of ``clusters`` (as an index into it) that a structure uses:
        ``(index, cluster, what)``, or None."""
        if not len(self.clusters) or not len(clusters):
            return None
        c = np.asarray(clusters, dtype=np.int64)
        idx = np.minimum(np.searchsorted(self.clusters, c), len(self.clusters) - 1)
        hit = np.nonzero(self.clusters[idx] == c)[0]
        if not len(hit):
            return None
        k = int(hit[0])
        return k, int(c[k]), self.labels[int(self.names[idx[k]])]

    def check_unshared(self, what: str) -> None:
        """Refuse ``what`` (a guest write) on an image where two kinds of structure share
        a cluster: when a refcount block doubles as another structure its refcounts are
        not counts, and the allocator would hand out clusters that are in use."""
        if self.shared:
            c = min(self.shared)
            a, b = self.shared[c]
            raise FormatError(what, c * self.cs, f"cluster {c * self.cs:#x} is both the {a} and the {b}; "
                              "refusing to write (qjournal check explains the damage, check -r all repairs it)")

    def check_shared(self, offset: int, length: int, what: str, only_header: bool = False,
                     but_refcount_blocks: bool = False) -> None:
        """Refuse a write of ``what`` into a cluster that two kinds of structure claim (a
        refcount block that is also a bitmap table, say): writing one corrupts the other.
        ``only_header``: refuse only where the header cluster is one of them (a repair
        writes into the others to drop the bad claim). ``but_refcount_blocks``: the commit
        switches to a new refcount table, so a claim by an old refcount block does not count."""
        for c in range(offset // self.cs, (offset + max(length, 1) - 1) // self.cs + 1):
            if c in self.shared:
                a, b = self.shared[c]
                if (only_header and "header cluster" not in (a, b)) or \
                        (but_refcount_blocks and "refcount block" in (a, b)):
                    continue
                advice = ("a repair cannot drop a claim on the header cluster; nothing was written" if only_header
                          else "refusing to write (qjournal check explains the damage, check -r all repairs it)")
                raise FormatError(what, offset, f"cluster {c * self.cs:#x} is both the {a} and the {b}; {advice}")

    def check_write(self, offset: int, length: int, what: str) -> None:
        """Refuse a write of ``what`` over a structure in use (before anything is written)."""
        if length <= 0:
            return
        first, last = offset // self.cs, (offset + length - 1) // self.cs
        found = self.find(np.arange(first, last + 1, dtype=np.int64))
        if found is not None:
            _, c, label = found
            raise FormatError(what, offset, f"would overwrite the {label} in cluster {c * self.cs:#x}, which is "
                              "in use whatever its refcount says; refusing to write (qjournal check explains "
                              "the damage, check -r all repairs it)")

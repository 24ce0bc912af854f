"""The journal at work: commit, apply, checkpoint, binding check and recovery.

The orderings here are the ones the package docstring specifies; each place that
writes says what a crash right after it leaves.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from ..format.lazy import np
from .crc32c import crc32c, crc32c_blocks
from ..errors import JournalError
from ..storage.medium import FileMedium, Medium, fsync_directory
from .records import (BEGIN, CHECKPOINT, CHECKPOINTED, COMMIT, COMMITTED, HEADER_SIZE, INCOMPLETE, PIECE, STEP,
                      WRITE, FileHeader, Log, pack_commit, pack_record, pack_write, pieces, read_log)
from .transaction import PendingTransaction, Step, Transaction

SUFFIX = ".qjournal"

#: Where the salt of each new journal generation comes from: called once per commit (again
#: while it repeats the previous generation's salt), it returns an integer in [0, 2**64).
SaltSource = Callable[[], int]
SALT_DRAWS = 8      # draws equal to the previous salt before the source is refused
COMPACT_ABOVE = 1 << 20
"""A log longer than this (bytes), every transaction of it checkpointed, is cut back to a
bare header of a new generation when the image closes (:meth:`Journal.close`). Every open
reads the whole log, O(its size): after a snapshot of 2M clusters (41,000 records, 24 MB)
each later ``qjournal info`` took 0.8 s instead of 0.06 s. A shorter log stays, so that
``qjournal journal`` still shows the last transaction of a small operation."""


def system_salts() -> int:
    """The default salt source: 64 bits from the operating system's random source
    (``os.urandom``, as ``secrets`` uses; importing ``secrets`` costs 3 ms of hashlib)."""
    return int.from_bytes(os.urandom(8), "little")


class Journal:
    """The write-ahead journal of one image.

    ``jmedium`` is the journal file (None: there is none yet, or none may be made).
    ``on_create``, when there is no journal file, makes one at the first commit: it
    returns a new, empty, writable medium whose directory entry is already durable.
    ``salts`` gives the salt of each new generation (default :func:`system_salts`); a
    seeded source makes the journal's bytes reproducible (crashsim's runs and replays).
    It is the public attribute ``salts``, which may be replaced before the next commit.
    The journal file is read once, here; O(size of its log).
    """

    def __init__(self, image: Medium, jmedium: Medium | None,
                 on_create: Callable[[], Medium] | None = None, *, salts: SaltSource | None = None) -> None:
        self.image = image
        self.jmedium = jmedium
        self.salts: SaltSource = salts if salts is not None else system_salts
        self._on_create = on_create
        self._log = read_log(jmedium) if jmedium is not None else Log(None)
        self._unsynced = False    # a checkpoint record was written and not synced yet
        self.compact_above = COMPACT_ABOVE
        """The log length above which :meth:`close` cuts a checkpointed log back (see COMPACT_ABOVE)."""

    @classmethod
    def open_for(cls, image_path: str | os.PathLike[str], image: Medium, writable: bool, *,
                 salts: SaltSource | None = None) -> Journal:
        """The journal of the image at ``image_path``: ``IMAGE.qjournal`` beside it.

        A missing journal file is created at the first commit (writable opens only):
        created, its directory entry fsynced, then written and fsynced by the commit
        itself, all before the commit returns and anything in the image changes.
        """
        path = os.fspath(image_path) + SUFFIX
        try:
            if os.path.exists(path):
                return cls(image, FileMedium(path, writable), salts=salts)
        except OSError as e:
            raise JournalError(f"{path}: cannot open the journal: {e.strerror}") from None
        if not writable:
            return cls(image, None, salts=salts)

        def create() -> Medium:
            try:
                medium = FileMedium(path, True, create=True)
                fsync_directory(path)
            except OSError as e:
                raise JournalError(f"{path}: cannot create the journal: {e.strerror}") from None
            return medium

        return cls(image, None, on_create=create, salts=salts)

    @staticmethod
    def discard(image_path: str | os.PathLike[str]) -> bool:
        """Remove the journal of the image at ``image_path`` for good (``qjournal recover
        --discard``): the image is kept as it stands. The removal is made durable
        (fsync of the folder). Returns whether there was one. Only for a journal the
        binding check refused: a journal that still matches the image would complete
        a committed transaction."""
        path = os.fspath(image_path) + SUFFIX
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise JournalError(f"{path}: cannot remove the journal: {e.strerror}", path=path) from None
        fsync_directory(path)
        return True

    # -- what the journal holds ----------------------------------------------
    @property
    def generation(self) -> int | None:
        """The generation of the journal file's header (None: no valid header)."""
        return self._log.header.generation if self._log.header else None

    @property
    def salt(self) -> int | None:
        return self._log.header.salt if self._log.header else None

    def pending(self) -> list[PendingTransaction]:
        """Committed transactions without a checkpoint, in log order. O(transactions)."""
        return [t for t in self._log.transactions if self._log.state[t.txid] == COMMITTED]

    def overlay(self) -> list[tuple[int, bytes]]:
        """After-images of the pending transactions in apply order: laid over the
        image, later ones winning, they show the committed state. O(writes)."""
        return [w for t in self.pending() for w in t.writes]

    def describe(self) -> list[dict[str, Any]]:
        """Every transaction of the log, for ``qjournal journal FILE``. O(writes)."""
        h = self._log.header
        return [{"txid": t.txid, "description": t.description, "state": self._log.state[t.txid],
                 "generation": h.generation if h else None, "salt": h.salt if h else None,
                 "steps": [{"name": s.name, "writes": [(off, len(d)) for off, d in s.writes]}
                           for s in t.steps]}
                for t in self._log.transactions]

    # -- commit ----------------------------------------------------------------
    def commit(self, tx: Transaction) -> None:
        """Make ``tx`` durable in the journal, then apply it to the image.

        Order, and what a crash after each point leaves:

        1. Before-images are read and the records (a new generation: header, BEGIN,
           STEP and WRITE records, COMMIT) written to the journal; nothing in the image
           has changed. Crash: the journal holds no committed transaction (the
           chained checksum breaks at the first record that did not reach the disk).
        2. ``jmedium.flush()``: the commit point, the only journal sync. Crash: the
           transaction is committed; recovery applies it.
        3. Each step: its writes, then a barrier on their ranges, then its mark.
           Crash: earlier steps are durable, this one partly; recovery completes it.
        4. A CHECKPOINT record, not synced: the next commit's sync or close() makes
           it durable. Crash before that: recovery replays the transaction over its
           own after-images, which changes nothing.

        Costs one journal sync and one image barrier per step; O(bytes written).
        """
        if tx.empty:
            return
        pend = self.pending()
        if pend:
            raise JournalError(f"journal transaction {pend[0].txid} ({pend[0].description!r}) is committed "
                               "but not applied; run recover() before committing another")
        steps = tx.steps
        size = self.image.size
        for step in steps:
            for off, data in step.writes:
                if off + len(data) > size:
                    raise JournalError(f"transaction {tx.description!r}, step {step.name!r}: write at "
                                       f"{off:#x}+{len(data):#x} beyond the image end {size:#x}; grow the "
                                       "image (write the new clusters) before the commit")
        if self.jmedium is None:
            if self._on_create is None:
                raise JournalError("there is no journal file to commit to (the image is open read-only)")
            self.jmedium = self._on_create()
            self._on_create = None
        recorded = self._record(tx.description, steps)
        self.image.mark("commit")
        self._apply(recorded)
        self._checkpoint(recorded.txid)

    def _record(self, description: str, steps: list[Step]) -> PendingTransaction:
        """Steps 1 and 2 of commit: write a new generation holding the transaction, sync."""
        assert self.jmedium is not None
        # Every earlier transaction is checkpointed, so its image writes are durable
        # (each step ended with a barrier): the old records are needed no more and the
        # new generation overwrites them from the start. Until the sync below, a crash
        # leaves, sector by sector, either generation: under the new header, a prefix of
        # the new records (old ones have the old salt); under the old header, a prefix
        # of the old records, perhaps without the last CHECKPOINT, so recovery may
        # rewrite after-images the image already holds. In no case a committed
        # transaction the image lacks, or a change to it.
        old = self._log.header
        salt = self._new_salt(old.salt if old is not None else None)
        header = FileHeader(old.generation + 1 if old else 1, salt, self._log.top)
        log = Log(header, end=HEADER_SIZE, crc=header.checksum, seq=header.first_seq, top=header.first_seq)
        txid = log.seq
        steps, checksums = self._after_images(steps)
        out = [header.pack()]

        def add(rtype: int, payload: bytes) -> None:
            rec, log.crc = pack_record(rtype, log.seq, salt, txid, payload, log.crc)
            out.append(rec)
            log.seq += 1
            log.end += len(rec)

        add(BEGIN, description.encode())
        for step, crcs in zip(steps, checksums):
            add(STEP, step.name.encode())
            for (off, data), before in zip(step.writes, crcs):
                add(WRITE, pack_write(off, data, np.array(before, dtype=np.uint32)))
        add(COMMIT, pack_commit(len(steps), sum(len(s.writes) for s in steps),
                                sum(len(d) for s in steps for _, d in s.writes)))
        log.top = log.seq
        self.jmedium.event("journal_write")         # for fault injection: the records follow
        self.jmedium.write(0, b"".join(out))
        recorded = PendingTransaction(txid, description, steps, checksums)
        log.transactions.append(recorded)
        log.state[txid] = COMMITTED
        try:
            self.jmedium.flush()                    # the commit point
        except BaseException:
            # A failed sync does not say the records stayed out of the file: the next
            # open may find the transaction committed and apply it. So it counts as
            # pending here too: nothing it references (its new clusters past the old
            # end of the image) is given back, and no other commit runs before recovery.
            self._log = log
            raise
        self._log = log
        self._unsynced = False
        return recorded

    def _new_salt(self, previous: int | None) -> int:
        """A salt from :attr:`salts` for the next generation, other than ``previous``: records
        of the old generation must never pass for records of the new one."""
        for _ in range(SALT_DRAWS):
            salt = self.salts()
            if not (isinstance(salt, int) and 0 <= salt < 1 << 64):
                raise JournalError(f"journal header, offset 24 (salt): the salt source returned {salt!r}, "
                                   "not an integer in [0, 2**64)")
            if salt != previous:
                return salt
        raise JournalError(f"journal header, offset 24 (salt): the salt source returned the previous "
                           f"generation's salt {previous:#x} {SALT_DRAWS} times; each generation needs a new one")

    def _after_images(self, steps: list[Step]) -> tuple[list[Step], list[list[tuple[int, ...]]]]:
        """The steps as the journal records them: each write widened to whole 512-byte
        pieces (up to the image end) with the bytes those pieces will hold after the
        step, and the CRC32C of each piece before the step. O(bytes written).

        Whole pieces make every crash state of a piece equal to its before-image or to
        one recorded after-image, whatever steps, replays and crashes came before.
        """
        size = self.image.size
        later: dict[int, bytes] = {}   # piece offset -> content after the steps so far
        out_steps, out_crcs = [], []
        for k, step in enumerate(steps):
            spans: list[tuple[int, int, list[tuple[int, bytes]]]] = []
            for off, data in step.writes:
                start = off - off % PIECE
                end = off + len(data)
                end = min(end + -end % PIECE, size)
                if spans and start <= spans[-1][1]:
                    spans[-1] = (spans[-1][0], max(spans[-1][1], end), spans[-1][2] + [(off, data)])
                else:
                    spans.append((start, end, [(off, data)]))
            writes, crcs = [], []
            for start, end, members in spans:
                buf = bytearray(self.image.read(start, end - start))
                if later:
                    for p in range(start, end, PIECE):
                        prev = later.get(p)
                        if prev is not None:
                            buf[p - start:p - start + len(prev)] = prev
                crcs.append(tuple(crc32c_blocks(buf, PIECE).tolist()))
                for off, data in members:
                    buf[off - start:off - start + len(data)] = data
                after = bytes(buf)
                writes.append((start, after))
                if k + 1 < len(steps):
                    for p in range(start, end, PIECE):
                        later[p] = after[p - start:p - start + PIECE]
            out_steps.append(Step(step.name, writes))
            out_crcs.append(crcs)
        return out_steps, out_crcs

    def _apply(self, t: PendingTransaction, first: int = 0) -> None:
        """Write the after-images into the image, step by step from step ``first``, with barriers."""
        for step in t.steps[first:]:
            self.image.event(step.name)             # for fault injection: this step's writes follow
            for off, data in step.writes:
                self.image.write(off, data)
            # The barrier: this step is durable before any write of the next one.
            # A crash before it leaves any subset of this step's pieces written.
            self.image.flush([(off, len(data)) for off, data in step.writes])
            self.image.mark(step.name)

    def _checkpoint(self, txid: int) -> None:
        """Append a CHECKPOINT record for ``txid``; it is synced by whoever syncs next."""
        log = self._log
        assert self.jmedium is not None and log.header is not None
        # An incomplete transaction at the end of the log is overwritten: forget it.
        log.transactions = [t for t in log.transactions if log.state[t.txid] != INCOMPLETE]
        rec, log.crc = pack_record(CHECKPOINT, log.seq, log.header.salt, txid, b"", log.crc)
        self.jmedium.event("checkpoint")            # for fault injection: the record follows
        self.jmedium.write(log.end, rec)
        log.end += len(rec)
        log.seq += 1
        log.top = max(log.top, log.seq)
        log.state[txid] = CHECKPOINTED
        self._unsynced = True

    # -- recovery ----------------------------------------------------------------
    def check_binding(self) -> None:
        """Raise JournalError unless every piece a pending transaction writes holds its
        before-image or one of the after-images recorded for it. Reads only.
        O(bytes of the pending transactions)."""
        pend = self.pending()
        size = self.image.size
        index: dict[int, list[tuple[int, bytes]]] | None = None
        for t in pend:
            for si, step in enumerate(t.steps):
                for wi, (off, data) in enumerate(step.writes):
                    where = (f"journal transaction {t.txid} ({t.description!r}), step {si + 1} ({step.name!r}), "
                             f"write {wi + 1} at offset {off:#x}+{len(data):#x}")
                    if off + len(data) > size:
                        raise JournalError(f"{where}: beyond the image end {size:#x}; the journal belongs to "
                                           "another image (nothing was written)")
                    cur = self.image.read(off, len(data))
                    if cur == data:
                        continue
                    ok = _pieces_bound(cur, data, np.array(t.checksums[si][wi], dtype=np.uint32))
                    if ok.all():
                        continue
                    if index is None:
                        index = _piece_index(pend)
                    for p in np.flatnonzero(~ok).tolist():
                        piece = cur[p * PIECE:(p + 1) * PIECE]
                        if not _known(index.get(off + p * PIECE, []), piece):
                            raise JournalError(
                                f"{where}: the 512-byte piece at {off + p * PIECE:#x} holds neither the bytes "
                                "the transaction replaces nor bytes it writes, so the image changed after the "
                                "crash (QEMU opened it, or the journal belongs to another copy); nothing was "
                                f"written; to keep the image as it stands, run qjournal recover --discard")

    def recover(self) -> int:
        """Replay the pending transactions; return how many.

        The binding check runs first and, when it fails, nothing is written to
        either file. Then each transaction is applied, from the first step that had
        not fully taken effect (:meth:`resume_step`), with the same barriers as a
        commit, and checkpointed; one journal sync ends recovery. Idempotent: a crash
        at any point leaves pieces that hold before- or after-images, which the next
        recovery accepts and completes, and every state it passes through is one the
        original commit passed through too.
        O(bytes of the pending transactions); one barrier per step, one journal sync.
        """
        pend = self.pending()
        if not pend:
            return 0
        self.check_binding()
        assert self.jmedium is not None
        for t in pend:
            self._apply(t, self.resume_step(t))
            self._checkpoint(t.txid)
        self.jmedium.flush()
        self._unsynced = False
        return len(pend)

    def resume_step(self, t: PendingTransaction) -> int:
        """The first step of ``t`` recovery must apply again (``len(t.steps)``: none).

        Steps are applied in order with a barrier after each, so a crash during step
        ``k`` leaves every piece the transaction writes holding its content after step
        ``k - 1`` or after step ``k``. The answer is ``k`` for the largest ``k - 1``
        that agrees with the image in this way. Replaying from step 0 instead would
        take the image back through earlier states (an autoclear bit cleared again
        after the size switch of a shrink, for example): a reader that ignores the
        journal, or a second crash, could then meet a state the commit never showed.
        Pieces before step 0 are compared by their before-image CRC32C.
        O(steps × pieces of the transaction).
        """
        n = len(t.steps)
        size = self.image.size
        before: dict[int, int] = {}
        states: list[dict[int, bytes]] = []     # states[j]: piece -> content after step j
        cur: dict[int, bytes] = {}
        for si, step in enumerate(t.steps):
            for (off, data), crcs in zip(step.writes, t.checksums[si]):
                for i, crc in enumerate(crcs):
                    before.setdefault(off + i * PIECE, crc)
                    cur[off + i * PIECE] = data[i * PIECE:(i + 1) * PIECE]
            states.append(dict(cur))
        now = {p: self.image.read(p, len(d)) if p + len(d) <= size else None for p, d in cur.items()}

        def at(j: int, p: int, got: bytes | None) -> bool:
            """``got`` is piece ``p``'s content after step ``j`` (-1: before the transaction)."""
            if got is None:
                return False
            if j < 0 or p not in states[j]:
                return crc32c(got) == before[p]
            return got == states[j][p]

        for j in range(n - 1, -2, -1):
            nxt = min(j + 1, n - 1)
            if all(at(j, p, got) or at(nxt, p, got) for p, got in now.items()):
                return j + 1
        return 0

    def _compact(self) -> None:
        """Replace a long log, every transaction of it checkpointed, by a new generation
        without records: its header, then the file cut to the header's length.

        The checkpoint is durable (synced just before) and each step ended with a
        barrier, so no record is needed by recovery any more. A crash before the header
        write leaves the old log; after it, the new header over records of the old salt,
        which read as an empty log; after the cut, the bare header. No state holds a
        pending transaction; the one sync at the end keeps the rule that nothing is left
        unsynced after a close. The new generation starts at the old log's top, so
        transaction ids are never reused.
        """
        log = self._log
        assert self.jmedium is not None and log.header is not None
        if any(log.state[t.txid] != CHECKPOINTED for t in log.transactions):
            return
        header = FileHeader(log.header.generation + 1, self._new_salt(log.header.salt), log.top)
        self.jmedium.write(0, header.pack())
        self.jmedium.resize(HEADER_SIZE)
        self.jmedium.flush()
        self._log = Log(header, end=HEADER_SIZE, crc=header.checksum, seq=header.first_seq, top=header.first_seq)

    def close(self) -> None:
        """Sync a checkpoint not yet synced, and close the journal file."""
        if self.jmedium is not None:
            if self._unsynced:
                # Without this, a power loss could lose the checkpoint, and recovery
                # would then refuse an image that QEMU changed in the meantime.
                self.jmedium.flush()
                self._unsynced = False
                if self._log.end > self.compact_above:
                    self._compact()
            self.jmedium.close()
            self.jmedium = None
        self._on_create = None


def _pieces_bound(cur: bytes, data: bytes, before: np.ndarray) -> np.ndarray:
    """Per 512-byte piece: holds the after-image ``data``, or CRC32C matches ``before``."""
    n = len(cur)
    full = n // PIECE
    ok = np.empty(pieces(n), dtype=bool)
    a = np.frombuffer(cur, dtype=np.uint8, count=full * PIECE).reshape(full, PIECE)
    b = np.frombuffer(data, dtype=np.uint8, count=full * PIECE).reshape(full, PIECE)
    ok[:full] = (a == b).all(axis=1)
    if full < len(ok):
        ok[full] = cur[full * PIECE:] == data[full * PIECE:]
    return ok | (crc32c_blocks(cur, PIECE) == before)


def _piece_index(pend: list[PendingTransaction]) -> dict[int, list[tuple[int, bytes]]]:
    """Piece offset -> (before CRC32C, after-image) of every pending write of it."""
    index: dict[int, list[tuple[int, bytes]]] = {}
    for t in pend:
        for step, crcs in zip(t.steps, t.checksums):
            for (off, data), before in zip(step.writes, crcs):
                for p, crc in enumerate(before):
                    index.setdefault(off + p * PIECE, []).append((crc, data[p * PIECE:(p + 1) * PIECE]))
    return index


def _known(entries: list[tuple[int, bytes]], piece: bytes) -> bool:
    """Whether ``piece`` is a before- or after-image some pending write records for it."""
    crc = crc32c(piece)
    return any(after[:len(piece)] == piece or (len(after) == len(piece) and before == crc)
               for before, after in entries)

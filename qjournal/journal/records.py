"""The journal file's structures, declared once: file header, records, payloads, and
the reader that turns a journal file into its log.

The layout and the validity rules are specified in the package docstring
(:mod:`qjournal.journal`); the names below follow it.
"""
from __future__ import annotations

import struct

import attrs

from ..format.lazy import np
from .crc32c import crc32c
from ..errors import JournalError
from ..format.geometry import SECTOR
from ..storage.medium import Medium
from .transaction import PendingTransaction, Step

MAGIC = b"qjournal"
VERSION = 1
HEADER_SIZE = 48
RECORD_HEADER_SIZE = 40
PIECE = SECTOR                   # binding checksums cover one sector of the image each (it cannot tear)
MAX_SEQ = (1 << 62) - 1          # sequence numbers and generations stay below this

BEGIN, STEP, WRITE, COMMIT, CHECKPOINT = 1, 2, 3, 4, 5
TYPE_NAMES = {BEGIN: "begin", STEP: "step", WRITE: "write", COMMIT: "commit", CHECKPOINT: "checkpoint"}

# File header: magic, version, header_length, generation, salt, first_seq, piece_size, checksum.
_HEADER = struct.Struct(">8sIIQQQII")
# Record header: type, payload_length, seq, salt, txid, reserved, checksum.
_RECORD = struct.Struct(">IIQQQII")
_WRITE = struct.Struct(">QQ")     # image offset, length
_COMMIT = struct.Struct(">IIQ")   # steps, writes, after-image bytes

COMMITTED, CHECKPOINTED, INCOMPLETE = "committed", "checkpointed", "incomplete"


@attrs.frozen
class FileHeader:
    """The 48-byte file header of one journal generation."""

    generation: int = attrs.field(validator=attrs.validators.and_(attrs.validators.ge(1),
                                                                  attrs.validators.le(MAX_SEQ)))
    salt: int = attrs.field(validator=attrs.validators.and_(attrs.validators.ge(0),
                                                            attrs.validators.lt(1 << 64)))
    first_seq: int = attrs.field(validator=attrs.validators.and_(attrs.validators.ge(1),
                                                                 attrs.validators.le(MAX_SEQ)))

    def pack(self) -> bytes:
        body = _HEADER.pack(MAGIC, VERSION, HEADER_SIZE, self.generation, self.salt,
                            self.first_seq, PIECE, 0)[:-4]
        return body + crc32c(body).to_bytes(4, "big")

    @property
    def checksum(self) -> int:
        """CRC32C of header bytes 0..43: the seed of the record chain."""
        return int.from_bytes(self.pack()[-4:], "big")

    @classmethod
    def parse(cls, buf: bytes) -> FileHeader | None:
        """The header in ``buf``, or None when there is no valid one (an empty journal).

        Raises JournalError for a valid header of a format version this code does not know.
        """
        if len(buf) < HEADER_SIZE:
            return None
        magic, version, hlen, gen, salt, first, piece, cks = _HEADER.unpack_from(buf)
        if magic != MAGIC or crc32c(buf[:HEADER_SIZE - 4]) != cks:
            return None
        if version != VERSION:
            raise JournalError(f"journal header at offset 0x0: format version {version} is not {VERSION}; "
                               "use the qjournal that wrote it")
        if hlen != HEADER_SIZE or piece != PIECE or not 1 <= gen <= MAX_SEQ or not 1 <= first <= MAX_SEQ:
            return None
        return cls(gen, salt, first)


def pad8(n: int) -> int:
    return -n % 8


def pack_record(rtype: int, seq: int, salt: int, txid: int, payload: bytes, prev: int) -> tuple[bytes, int]:
    """The bytes of one record and its chained checksum, given the previous one."""
    head = _RECORD.pack(rtype, len(payload), seq, salt, txid, 0, 0)[:-4]
    body = payload + bytes(pad8(len(payload)))
    cks = crc32c(body, crc32c(head, prev))
    return head + cks.to_bytes(4, "big") + body, cks


def pack_write(off: int, data: bytes, before: np.ndarray) -> bytes:
    return _WRITE.pack(off, len(data)) + before.astype(">u4").tobytes() + data


def pack_commit(steps: int, writes: int, nbytes: int) -> bytes:
    return _COMMIT.pack(steps, writes, nbytes)


def pieces(length: int) -> int:
    """How many 512-byte pieces a write of ``length`` bytes at an aligned offset has."""
    return -(-length // PIECE)


def _parse_write(payload: bytes) -> tuple[int, bytes, tuple[int, ...]] | None:
    """(offset, after-image, before checksums) of a WRITE payload, or None if malformed."""
    if len(payload) < _WRITE.size:
        return None
    off, length = _WRITE.unpack_from(payload)
    k = pieces(length)
    if length < 1 or off % PIECE or off + length > MAX_SEQ or len(payload) != _WRITE.size + 4 * k + length:
        return None
    crcs = np.frombuffer(payload, ">u4", count=k, offset=_WRITE.size)
    return off, payload[_WRITE.size + 4 * k:], tuple(crcs.tolist())


@attrs.define
class _Open:
    """A transaction whose COMMIT has not been read yet."""

    txid: int
    description: str
    steps: list[Step] = attrs.Factory(list)
    checksums: list[list[tuple[int, ...]]] = attrs.Factory(list)
    nbytes: int = 0

    def freeze(self) -> PendingTransaction:
        return PendingTransaction(self.txid, self.description, self.steps, self.checksums)


@attrs.define
class Log:
    """What a journal file holds: its header and the transactions of its log.

    ``end``, ``crc`` and ``seq`` say where the next record goes: after the last record
    that is not inside an incomplete transaction, chained on that record's checksum.
    ``top`` is the sequence number after the last valid record (a new generation
    starts there, so that transaction ids are never reused).
    """

    header: FileHeader | None
    transactions: list[PendingTransaction] = attrs.Factory(list)
    state: dict[int, str] = attrs.Factory(dict)
    end: int = 0
    crc: int = 0
    seq: int = 1
    top: int = 1


def read_log(m: Medium) -> Log:
    """Read the log of the journal on ``m``: the longest prefix of valid records that
    follows the grammar. O(size of the log); reads nothing beyond it but one record
    header. Never raises for damaged content (JournalError only for an unknown version).
    """
    size = m.size
    header = FileHeader.parse(m.read(0, HEADER_SIZE)) if size >= HEADER_SIZE else None
    if header is None:
        return Log(None)
    log = Log(header, end=HEADER_SIZE, crc=header.checksum, seq=header.first_seq, top=header.first_seq)
    off, crc, seq = HEADER_SIZE, header.checksum, header.first_seq
    cur: _Open | None = None
    while off + RECORD_HEADER_SIZE <= size and seq <= MAX_SEQ:
        head = m.read(off, RECORD_HEADER_SIZE)
        rtype, plen, rseq, salt, txid, reserved, cks = _RECORD.unpack(head)
        total = RECORD_HEADER_SIZE + plen + pad8(plen)
        if (salt != header.salt or rseq != seq or rtype not in TYPE_NAMES or reserved
                or total > size - off):
            break
        body = m.read(off + RECORD_HEADER_SIZE, total - RECORD_HEADER_SIZE)
        rcrc = crc32c(body, crc32c(head[:-4], crc))
        if rcrc != cks:
            break
        payload = body[:plen]
        # The grammar: BEGIN (STEP (STEP|WRITE)*) COMMIT, and CHECKPOINTs between transactions.
        if rtype == BEGIN:
            if cur is not None or txid != rseq:
                break
            cur = _Open(txid, payload.decode("utf-8", "replace"))
        elif rtype == CHECKPOINT:
            if cur is not None or log.state.get(txid) != COMMITTED or plen:
                break
            log.state[txid] = CHECKPOINTED
        elif cur is None or txid != cur.txid:
            break
        elif rtype == STEP:
            cur.steps.append(Step(payload.decode("utf-8", "replace"), []))
            cur.checksums.append([])
        elif rtype == WRITE:
            w = _parse_write(payload)
            if w is None or not cur.steps:
                break
            cur.steps[-1].writes.append((w[0], w[1]))
            cur.checksums[-1].append(w[2])
            cur.nbytes += len(w[1])
        else:  # COMMIT
            counts = (len(cur.steps), sum(len(s.writes) for s in cur.steps), cur.nbytes)
            if plen != _COMMIT.size or _COMMIT.unpack(payload) != counts:
                break
            log.transactions.append(cur.freeze())
            log.state[cur.txid] = COMMITTED
            cur = None
        off, crc, seq = off + total, rcrc, seq + 1
        if cur is None:
            log.end, log.crc, log.seq = off, crc, seq
    log.top = seq
    if cur is not None:
        log.transactions.append(cur.freeze())
        log.state[cur.txid] = INCOMPLETE
    return log

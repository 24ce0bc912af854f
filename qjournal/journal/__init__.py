"""The qjournal write-ahead journal, and the specification of its file format.

The journal of an image ``IMAGE`` is the file ``IMAGE.qjournal`` beside it. It holds
transactions of byte-range writes to the image; it knows nothing of qcow2. This
docstring is the format: a recovery tool written from it alone is compatible.

Conventions
===========

All integers are unsigned and big-endian. CRC32C is CRC-32C (Castagnoli: reflected
polynomial 0x82F63B78, initial value and final xor 0xFFFFFFFF; CRC32C("123456789") =
0xE3069283). ``CRC32C(x, seed=c)`` continues a CRC as zlib.crc32 does, so that
``CRC32C(b, seed=CRC32C(a)) == CRC32C(a ‖ b)``. A *piece* of an image byte range is
its intersection with one 512-byte-aligned block of the image ([512·i, 512·i + 512)).

The file header (48 bytes, at offset 0)
=======================================

======  ====  ==========================================================
offset  size  field
======  ====  ==========================================================
0       8     magic ``qjournal`` (71 6a 6f 75 72 6e 61 6c)
8       4     format version: 1
12      4     header length: 48 (the first record starts here)
16      8     generation (1, 2, ...; each new generation is one more)
24      8     salt: random, new for each generation
32      8     sequence number of the first record of this generation
40      4     piece size: 512
44      4     checksum: CRC32C of bytes 0..43
======  ====  ==========================================================

The header is valid iff (1) the file is at least 48 bytes long, (2) the magic
matches, (3) the checksum matches, (4) the header length is 48 and the piece size
512, and (5) 1 <= generation < 2**62 and 1 <= first sequence number < 2**62. A file
without a valid header is an empty journal (nothing to recover). A header with a
valid magic and checksum but another version is refused (JournalError), never
ignored.

Records (from offset 48, back to back)
======================================

Each record is a 40-byte record header, a payload of P bytes, and zero padding to a
multiple of 8 bytes (``pad = -P mod 8``); it occupies ``40 + P + pad`` bytes.

======  ====  ==========================================================
offset  size  field
======  ====  ==========================================================
0       4     type: 1 BEGIN, 2 STEP, 3 WRITE, 4 COMMIT, 5 CHECKPOINT
4       4     payload length P (padding excluded)
8       8     sequence number
16      8     salt (the header's)
24      8     transaction id: the sequence number of the transaction's BEGIN
32      4     reserved: 0
36      4     checksum (chained, see below)
40      P     payload
40+P    pad   zero bytes
======  ====  ==========================================================

The checksum of record *i* is ``CRC32C(bytes 0..35 of the record ‖ payload ‖
padding, seed = c[i-1])`` where ``c[i-1]`` is the checksum of the previous record,
and for the first record the header's checksum. Equivalently, it is the CRC32C of
header bytes 0..43 followed by every record up to and including this one, each
without its checksum field: the chain covers all previous records.

Payloads:

- BEGIN: the transaction's description, UTF-8.
- STEP: the step's name, UTF-8. The WRITE records that follow belong to it.
- WRITE: an after-image and the checksums of the bytes it replaces:

  ========  ======  ================================================
  offset    size    field
  ========  ======  ================================================
  0         8       image offset O, a multiple of 512
  8         8       length L >= 1
  16        4·K     K = ceil(L / 512) before-image checksums: the k-th
                    is the CRC32C of the image bytes in the k-th piece
                    [O + 512k, min(O + 512k + 512, O + L)) as they were
                    just before this step (after the earlier steps)
  16 + 4K   L       after-image: the bytes of [O, O + L) after the step
  ========  ======  ================================================

  P = 16 + 4K + L, and O + L < 2**62. A writer makes every piece a whole 512-byte block, except that
  a write may end at the image's end: it widens each write to the blocks it touches,
  taking the bytes it does not change from the image (as changed by earlier steps).
- COMMIT (P = 16): number of STEP records (4 bytes), number of WRITE records
  (4 bytes) and sum of their lengths L (8 bytes) in the transaction.
- CHECKPOINT (P = 0): the transaction id field names the transaction whose
  after-images are all in the image.

A record is *valid* iff (1) its 40-byte header and its ``P + pad`` following bytes
lie inside the file, (2) its type is 1..5 and its reserved field 0, (3) its salt
equals the header's salt, (4) its sequence number is the previous valid record's
plus one (the header's first sequence number for the first record), (5) its
checksum matches the chain, and (6) its payload is well formed for its type
(WRITE: as above; COMMIT: 16 bytes; CHECKPOINT: empty).

The *log* is the longest run of valid records from offset 48 that also follows the
grammar ``(BEGIN STEP (STEP | WRITE)* COMMIT | CHECKPOINT)*`` with an incomplete
transaction allowed at the end, where: a BEGIN's transaction id equals its own
sequence number and no transaction is open; every STEP, WRITE and COMMIT carries the
open transaction's id; a COMMIT's counts match the transaction's records; a
CHECKPOINT comes outside a transaction and names a committed transaction of the log
not yet checkpointed. The first record that is invalid or breaks the grammar ends
the log: it and everything after it are discarded, never replayed and never
reported as corruption (a torn write, or the stale records of an older generation).

A transaction is *committed* iff its BEGIN, its STEP and WRITE records and its
COMMIT are all in the log. It is *checkpointed* iff it is committed and a CHECKPOINT
naming it is in the log; *pending* iff committed and not checkpointed; *incomplete*
iff its BEGIN is in the log and its COMMIT is not (it is ignored).

Writing (the protocol this package follows)
===========================================

Commit, for a transaction of ordered steps:

1. Every earlier transaction is checkpointed (a pending one must be recovered
   first), so a new generation starts: the header, with generation + 1, a fresh
   salt and the next sequence number, is written at offset 0 and the records of the
   transaction (BEGIN, then per step a STEP and its WRITEs, then COMMIT) right after
   it. The file is never truncated; older records beyond are invalid by salt and
   chain.
2. One fdatasync of the journal: the commit point. The chained checksum makes a
   second sync unnecessary: a COMMIT that reached the disk ahead of an earlier record
   is not in the log. (A new journal file is created, and its directory fsynced,
   before this sync.)
3. Apply: for each step in order, its after-images are written into the image, then
   a barrier (msync/fdatasync of the ranges it wrote). Nothing in use in the image
   changed before the commit point.
4. A CHECKPOINT record is appended, without a sync of its own (the next commit's
   sync, or closing the journal, makes it durable).

Recovery
========

Recovery replays the pending transactions in log order. First, the *binding check*:
a piece of a pending write is *bound* iff (1) the write lies inside the image, and
(2) the image's bytes in that piece equal the after-image bytes some pending WRITE
record holds for that piece, or their CRC32C equals the before-image checksum some
pending WRITE record holds for a piece with the same offset and length. Since every
recorded piece is a whole block, these are exactly the states a crash can leave at
any point of applying, replaying, or replaying again. If any piece is not bound, the
image was changed after the crash by someone else (QEMU opened it, or the journal
belongs to another copy): recovery refuses and writes nothing to either file.
Otherwise each transaction is applied step by step with the same barriers, a
CHECKPOINT record is appended for it at the end of the log (over an incomplete
transaction, if the log ends in one), and the journal is fsynced. Replay is
idempotent: a crash during recovery leaves bound pieces, and the next recovery
finishes the job.

A read-only open shows the committed state by laying the after-images of the
pending transactions, in apply order, over the image (:meth:`Journal.overlay`).
"""
from __future__ import annotations

from .journal import Journal
from .transaction import PendingTransaction, Step, Transaction

__all__ = ["Journal", "Transaction", "Step", "PendingTransaction"]

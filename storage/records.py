"""Record batch format: pure encode/decode, no files, no sockets, no clock.

A batch is the unit of writing, checksumming, replication and fetching. The broker never
decodes records on the hot path: it validates a producer's batch (:func:`validate_batch`),
stamps the base offset and leader epoch into a fresh 64-byte header (:func:`stamp_header`) and
writes the producer's record bytes untouched. Clients encode and decode records.

Layout (little-endian; byte-by-byte description in ``docs/STORAGE.md``)::

    off size field
      0   8  base_offset      i64  stamped by the broker
      8   4  batch_length     u32  whole batch, header included
     12   1  magic            u8   format version, 1
     13   1  attributes       u8   bits 0-2 compression (0 = none); others reserved, 0
     14   2  reserved         u16  0
     16   4  leader_epoch     u32  stamped by the broker
     20   4  record_count     u32  >= 1
     24   8  first_timestamp  i64  ms since the Unix epoch
     32   8  max_timestamp    i64
     40   8  producer_id      i64  -1 when the producer is not idempotent
     48   4  base_sequence    i32  -1 when the producer is not idempotent
     52   8  body_checksum    u64  xxh3_64 of bytes [64, batch_length)
     60   4  header_checksum  u32  xxh32 of bytes [0, 60)
     64   .  records          msgpack array of ``record_count`` records

Two checksums, so every byte is covered and the broker's stamping stays O(1): the body
checksum is computed once by the producer and verified once by the broker; the header
checksum covers the fields the broker rewrites (and the body checksum), and costs 60 bytes
of hashing to recompute.

A record is a msgpack array ``[timestamp_delta, key, value]`` or
``[timestamp_delta, key, value, headers]`` where ``key`` is bin or nil, ``value`` is bin and
``headers`` an array of ``[str, bin]`` pairs. msgpack keeps records compact (about 5 bytes of
framing each) and lets a client decode a whole batch with one C call.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Final

import msgspec
import xxhash

from storage.errors import CorruptBatch, IncompleteBatch

MAGIC: Final = 1
HEADER_SIZE: Final = 64
NO_PRODUCER: Final = -1
NO_SEQUENCE: Final = -1

_HEADER = struct.Struct("<qIBBHIIqqqiQI")
_HEADER_BEFORE_CRC = struct.Struct("<qIBBHIIqqqiQ")  # _HEADER less the header checksum
_PREFIX = struct.Struct("<qI")  # base_offset, batch_length: enough to walk a log
_CRC = struct.Struct("<I")
_SUMS = struct.Struct("<QI")  # body_checksum, header_checksum, at byte 52
_SUMS_AT: Final = 52
_COUNT = struct.Struct("<I")
_COUNT_AT: Final = 20
# bytes 12-15 of every header this version writes: magic 1, attributes 0, reserved 0. A scan
# for a batch boundary after damage looks for them before hashing anything.
HEADER_MARK: Final = b"\x01\x00\x00\x00"
HEADER_MARK_AT: Final = 12
_HEADER_CRC_AT: Final = 60
assert _HEADER.size == HEADER_SIZE
assert _HEADER_BEFORE_CRC.size == _HEADER_CRC_AT

# A batch larger than this is refused by every reader; the broker's own limit is lower
# (``max_batch_bytes`` in the config) and is what producers see.
MAX_BATCH_BYTES: Final = 256 * 1024 * 1024

_xxh3 = xxhash.xxh3_64_intdigest
_xxh32 = xxhash.xxh32_intdigest


class Record(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True):
    """One record as stored: the timestamp is a delta from the batch's first timestamp."""

    timestamp_delta: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


class BatchHeader(msgspec.Struct, frozen=True):
    """The decoded fixed header of a batch."""

    base_offset: int
    batch_length: int
    magic: int
    attributes: int
    leader_epoch: int
    record_count: int
    first_timestamp: int
    max_timestamp: int
    producer_id: int
    base_sequence: int
    body_checksum: int
    header_checksum: int

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.record_count - 1

    @property
    def next_offset(self) -> int:
        return self.base_offset + self.record_count

    @property
    def last_sequence(self) -> int:
        return self.base_sequence + self.record_count - 1


_record_list = msgspec.msgpack.Decoder(list[Record])
_encoder = msgspec.msgpack.Encoder()

RecordInput = (
    tuple[int, bytes | None, bytes] | tuple[int, bytes | None, bytes, Sequence[tuple[str, bytes]]]
)


def encode_batch(
    records: Sequence[RecordInput],
    *,
    first_timestamp: int,
    max_timestamp: int | None = None,
    producer_id: int = NO_PRODUCER,
    base_sequence: int = NO_SEQUENCE,
    base_offset: int = 0,
    leader_epoch: int = 0,
) -> bytes:
    """Encode records, given as ``(timestamp_delta, key, value[, headers])`` tuples, into one
    batch. Tuples encode straight to msgpack arrays, so no per-record object is built.

    ``max_timestamp`` defaults to ``first_timestamp + max(delta)``. Raises ``ValueError`` for
    an empty batch, or when ``max_timestamp`` would be below ``first_timestamp`` (every
    reader rejects such a batch).
    """
    if not records:
        raise ValueError("a batch holds at least one record")
    body = _encoder.encode(records)
    if max_timestamp is None:
        max_timestamp = first_timestamp + max(r[0] for r in records)
    if max_timestamp < first_timestamp:
        raise ValueError(
            f"max_timestamp {max_timestamp} < first_timestamp {first_timestamp}: "
            "at least one record must be at or after first_timestamp"
        )
    return _assemble(
        body,
        len(records),
        first_timestamp,
        max_timestamp,
        producer_id,
        base_sequence,
        base_offset,
        leader_epoch,
    )


def encode_values(
    values: Sequence[bytes],
    *,
    timestamp: int,
    key: bytes | None = None,
    producer_id: int = NO_PRODUCER,
    base_sequence: int = NO_SEQUENCE,
) -> bytes:
    """Fast path for the common producer case: values sharing one key and one timestamp."""
    return encode_batch(
        [(0, key, v) for v in values],
        first_timestamp=timestamp,
        max_timestamp=timestamp,
        producer_id=producer_id,
        base_sequence=base_sequence,
    )


def _assemble(
    body: bytes,
    count: int,
    first_timestamp: int,
    max_timestamp: int,
    producer_id: int,
    base_sequence: int,
    base_offset: int,
    leader_epoch: int,
) -> bytes:
    head = _HEADER_BEFORE_CRC.pack(
        base_offset,
        HEADER_SIZE + len(body),
        MAGIC,
        0,
        0,
        leader_epoch,
        count,
        first_timestamp,
        max_timestamp,
        producer_id,
        base_sequence,
        _xxh3(body),
    )
    # the 60 bytes the header checksum covers are ``head`` itself: hashed as packed, with
    # no mutable copy to patch (a producer encodes a batch per request)
    return b"".join((head, _CRC.pack(_xxh32(head)), body))


def parse_header(buf: bytes | bytearray | memoryview, pos: int = 0) -> BatchHeader:
    """Decode the 64-byte header at ``pos`` and check it alone (length, magic, header
    checksum). Does not look at the body. Raises :class:`IncompleteBatch` if fewer than 64
    bytes remain, :class:`CorruptBatch` otherwise."""
    fields = _header_fields(buf, pos)
    return BatchHeader(*fields[:4], *fields[5:])


def _header_fields(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, ...]:
    """The 13 fields of the header at ``pos`` (``_HEADER``'s order: the reserved one fifth),
    after :func:`parse_header`'s checks."""
    if len(buf) - pos < HEADER_SIZE:
        raise IncompleteBatch(f"need {HEADER_SIZE} header bytes at {pos}, have {len(buf) - pos}")
    fields = _HEADER.unpack_from(buf, pos)
    if _xxh32(bytes(buf[pos : pos + _HEADER_CRC_AT])) != fields[12]:
        raise CorruptBatch(f"header checksum mismatch at {pos}")
    if fields[2] != MAGIC:
        raise CorruptBatch(f"unknown batch magic {fields[2]} at {pos}")
    if fields[4] != 0 or fields[3] != 0:
        raise CorruptBatch(f"unsupported attributes {fields[3]:#x} at {pos}")
    if not HEADER_SIZE < fields[1] <= MAX_BATCH_BYTES:
        raise CorruptBatch(f"batch length {fields[1]} out of range at {pos}")
    if fields[6] < 1:
        raise CorruptBatch(f"batch at {pos} holds no records")
    if fields[8] < fields[7]:
        raise CorruptBatch(f"batch at {pos} has max_timestamp < first_timestamp")
    return fields


def _array_length(body: bytes | bytearray | memoryview) -> int:
    """Element count of the msgpack array that starts ``body``, or -1 if it is not one."""
    if not body:
        return -1
    tag = body[0]
    if 0x90 <= tag <= 0x9F:
        return tag & 0x0F
    if tag == 0xDC and len(body) >= 3:
        return int.from_bytes(body[1:3], "big")
    if tag == 0xDD and len(body) >= 5:
        return int.from_bytes(body[1:5], "big")
    return -1


def validate_batch(buf: bytes | bytearray | memoryview, pos: int = 0) -> BatchHeader:
    """Check one whole batch at ``pos`` without decoding its records: header checks, the body
    checksum, and that the body opens with a msgpack array of ``record_count`` elements.

    This is what the broker runs on every produced batch and what recovery runs on every
    batch past the checkpoint. O(batch bytes) in C, O(1) in Python.
    """
    fields = _header_fields(buf, pos)
    _check_body(buf, pos, fields)
    return BatchHeader(*fields[:4], *fields[5:])


def _check_body(buf: bytes | bytearray | memoryview, pos: int, fields: tuple[int, ...]) -> None:
    end = pos + fields[1]
    if end > len(buf):
        raise IncompleteBatch(f"batch at {pos} needs {fields[1]} bytes, have {len(buf) - pos}")
    body = memoryview(buf)[pos + HEADER_SIZE : end]
    if _xxh3(body) != fields[11]:
        raise CorruptBatch(f"body checksum mismatch in batch at {pos}")
    if _array_length(body[:5]) != fields[6]:
        raise CorruptBatch(f"batch at {pos} does not open with {fields[6]} records")


def stamp_header(
    batch: bytes | bytearray | memoryview, base_offset: int, leader_epoch: int
) -> bytes:
    """Return a new 64-byte header for ``batch`` carrying ``base_offset`` and
    ``leader_epoch``, with its header checksum recomputed. The body is not touched; write
    ``stamped + batch[64:]`` (e.g. with ``os.writev``) to avoid copying it."""
    head, crc = _stamped(_HEADER.unpack_from(batch, 0), base_offset, leader_epoch)
    return head + _CRC.pack(crc)


def accept_batch(
    batch: bytes | bytearray | memoryview, base_offset: int, leader_epoch: int
) -> tuple[bytes, BatchHeader]:
    """:func:`validate_batch` then :func:`stamp_header`, in one pass, for the append path:
    the batch checked whole (the same checks and errors), and the 64-byte header it is
    stored with (``base_offset``, ``leader_epoch``, the new header checksum) with its
    header as stored. One unpack, one pack and no intermediate header object: this runs for
    every produced batch, on the event loop."""
    f = _header_fields(batch, 0)
    _check_body(batch, 0, f)
    head, crc = _stamped(f, base_offset, leader_epoch)
    header = BatchHeader(
        base_offset, f[1], f[2], f[3], leader_epoch, f[6], f[7], f[8], f[9], f[10], f[11], crc
    )
    return head + _CRC.pack(crc), header


def _stamped(f: tuple[int, ...], base_offset: int, leader_epoch: int) -> tuple[bytes, int]:
    """The first 60 bytes of a header with fields ``f`` (``_HEADER``'s order) carrying
    ``base_offset`` and ``leader_epoch``, and the header checksum over them."""
    head = _HEADER_BEFORE_CRC.pack(
        base_offset, f[1], f[2], f[3], f[4], leader_epoch, f[6], f[7], f[8], f[9], f[10], f[11]
    )
    return head, _xxh32(head)


def decode_records(
    batch: bytes | bytearray | memoryview, header: BatchHeader | None = None
) -> list[Record]:
    """Decode the records of one batch that was already validated (or ``header`` from
    :func:`validate_batch`). Raises :class:`CorruptBatch` on a malformed record section."""
    if header is None:
        header = validate_batch(batch)
    try:
        records = _record_list.decode(memoryview(batch)[HEADER_SIZE : header.batch_length])
    except msgspec.DecodeError as exc:
        raise CorruptBatch(f"malformed record section: {exc}") from None
    if len(records) != header.record_count:
        raise CorruptBatch(f"batch declares {header.record_count} records, holds {len(records)}")
    return records


def decode_batch(batch: bytes | bytearray | memoryview) -> tuple[BatchHeader, list[Record]]:
    """Validate and decode one batch: its header and its records."""
    header = validate_batch(batch)
    return header, decode_records(batch, header)


def iter_batches(
    buf: bytes | bytearray | memoryview, *, verify: bool = True
) -> Iterator[tuple[int, BatchHeader]]:
    """Yield ``(position, header)`` for each whole batch in a concatenation such as a fetch
    response or a segment file. Stops silently at an incomplete trailing batch (a fetch may
    end mid-batch); raises :class:`CorruptBatch` on anything else. With ``verify=False`` only
    the headers are checked (the bodies were checked when written)."""
    pos = 0
    size = len(buf)
    check = validate_batch if verify else parse_header
    while pos < size:
        try:
            header = check(buf, pos)
        except IncompleteBatch:
            return
        if pos + header.batch_length > size:
            return
        yield pos, header
        pos += header.batch_length


def peek_length(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int]:
    """``(base_offset, batch_length)`` at ``pos`` without any check: for walking batches
    already validated."""
    base, length = _PREFIX.unpack_from(buf, pos)
    return int(base), int(length)


def verify_batches(
    buf: bytes | bytearray | memoryview, expected_offset: int
) -> tuple[int, int, str | None]:
    """Check the stored batches at the start of ``buf`` (a read of a segment) as they were
    written: each batch's header checksum, its base offset (``expected_offset``, then the
    previous batch's next offset), its length and its body checksum.

    Returns ``(end, next_offset, problem)``: ``end`` is the length of the run of good whole
    batches at the start of ``buf``, ``next_offset`` the offset after them, and ``problem``
    None when the walk stopped at the end of ``buf`` or at a batch ``buf`` holds only in
    part (a read cut it), or else why the batch at ``end`` is damaged. Every step advances
    by a checksummed length of more than 64 bytes, so the walk always ends.

    The per-read check of the fetch path: O(bytes) hashing in C, a few attribute lookups in
    Python per batch, no object built per batch."""
    view = memoryview(buf)
    size = len(view)
    pos = 0
    expected = expected_offset
    xxh32, xxh3 = _xxh32, _xxh3
    while pos + HEADER_SIZE <= size:
        body_sum, head_sum = _SUMS.unpack_from(view, pos + _SUMS_AT)
        if xxh32(view[pos : pos + _HEADER_CRC_AT]) != head_sum:
            return pos, expected, f"header checksum mismatch at {pos}"
        base, length = _PREFIX.unpack_from(view, pos)
        if base != expected:
            return pos, expected, f"base offset {base} where {expected} was expected"
        if not HEADER_SIZE < length <= MAX_BATCH_BYTES:
            return pos, expected, f"batch length {length} out of range"
        end = pos + length
        if end > size:
            break
        if xxh3(view[pos + HEADER_SIZE : end]) != body_sum:
            return pos, expected, f"body checksum mismatch in the batch at offset {base}"
        (count,) = _COUNT.unpack_from(view, pos + _COUNT_AT)
        if count < 1:
            return pos, expected, "batch of no records"
        expected = base + count
        pos = end
    return pos, expected, None

"""The record batch format (``storage/records.py``): pure bytes in, bytes out."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import records
from storage.errors import CorruptBatch, IncompleteBatch
from storage.records import HEADER_SIZE, Record

# ------------------------------------------------------------------------------ strategies
# (deadline=None throughout: several properties loop over every byte of a batch, and a loaded
# CI machine must not turn that into a DeadlineExceeded flake)

_keys = st.one_of(st.none(), st.binary(max_size=16))
_headers = st.lists(st.tuples(st.text(max_size=8), st.binary(max_size=8)), max_size=3)
_record = st.one_of(
    st.tuples(st.integers(0, 10_000), _keys, st.binary(max_size=64)),
    st.tuples(st.integers(0, 10_000), _keys, st.binary(max_size=64), _headers),
)


@st.composite
def batch_args(draw: st.DrawFn, max_records: int = 8) -> dict[str, object]:
    recs = draw(st.lists(_record, min_size=1, max_size=max_records))
    idempotent = draw(st.booleans())
    return {
        "records": recs,
        "first_timestamp": draw(st.integers(0, 2**62)),
        "producer_id": draw(st.integers(0, 2**63 - 1)) if idempotent else records.NO_PRODUCER,
        "base_sequence": draw(st.integers(0, 2**31 - 1 - max_records))
        if idempotent
        else records.NO_SEQUENCE,
        "base_offset": draw(st.integers(0, 2**62)),
        "leader_epoch": draw(st.integers(0, 2**32 - 1)),
    }


def _encode(args: dict[str, object]) -> bytes:
    return records.encode_batch(**args)  # type: ignore[arg-type]


def _expected(rec: tuple[object, ...]) -> Record:
    headers = tuple(tuple(h) for h in rec[3]) if len(rec) == 4 else ()  # type: ignore[attr-defined]
    return Record(rec[0], rec[1], rec[2], headers)  # type: ignore[arg-type]


def _small_batch() -> bytes:
    return records.encode_batch(
        [(0, None, b"first"), (3, b"key", b"second", [("trace", b"abc")]), (7, b"", b"")],
        first_timestamp=1_700_000_000_000,
        producer_id=42,
        base_sequence=9,
        base_offset=1234,
        leader_epoch=5,
    )


# ------------------------------------------------------------------------------ round trip


@settings(deadline=None)
@given(batch_args())
def test_round_trip_keeps_every_field(args: dict[str, object]) -> None:
    batch = _encode(args)
    header, decoded = records.decode_batch(batch)
    recs = args["records"]
    assert isinstance(recs, list)
    assert decoded == [_expected(r) for r in recs]
    assert header.batch_length == len(batch)
    assert header.record_count == len(recs)
    assert header.base_offset == args["base_offset"]
    assert header.leader_epoch == args["leader_epoch"]
    assert header.first_timestamp == args["first_timestamp"]
    assert header.max_timestamp == args["first_timestamp"] + max(r[0] for r in recs)  # type: ignore[operator]
    assert header.producer_id == args["producer_id"]
    assert header.base_sequence == args["base_sequence"]
    assert header.last_offset == header.base_offset + len(recs) - 1
    assert header.next_offset == header.base_offset + len(recs)


def test_none_key_and_empty_key_stay_distinct() -> None:
    batch = records.encode_batch([(0, None, b"a"), (0, b"", b"b")], first_timestamp=1)
    _, decoded = records.decode_batch(batch)
    assert decoded[0].key is None
    assert decoded[1].key == b""


def test_explicit_max_timestamp_is_kept() -> None:
    batch = records.encode_batch([(0, None, b"a")], first_timestamp=10, max_timestamp=99)
    assert records.validate_batch(batch).max_timestamp == 99


def test_encode_values_shares_key_and_timestamp() -> None:
    batch = records.encode_values(
        [b"a", b"bb", b"ccc"], timestamp=77, key=b"k", producer_id=3, base_sequence=11
    )
    header, decoded = records.decode_batch(batch)
    assert [r.value for r in decoded] == [b"a", b"bb", b"ccc"]
    assert {r.key for r in decoded} == {b"k"}
    assert {r.timestamp_delta for r in decoded} == {0}
    assert (header.first_timestamp, header.max_timestamp) == (77, 77)
    assert (header.producer_id, header.base_sequence, header.last_sequence) == (3, 11, 13)


def test_negative_deltas_round_trip_when_one_record_is_at_first_timestamp() -> None:
    batch = records.encode_batch([(-5, None, b"early"), (0, None, b"on time")], first_timestamp=100)
    header, decoded = records.decode_batch(batch)
    assert [r.timestamp_delta for r in decoded] == [-5, 0]
    assert (header.first_timestamp, header.max_timestamp) == (100, 100)


def test_empty_batch_is_refused() -> None:
    with pytest.raises(ValueError):
        records.encode_batch([], first_timestamp=0)


@settings(deadline=None)
@given(st.lists(st.integers(-1000, -1), min_size=1, max_size=5))
def test_encoder_refuses_a_batch_the_validator_would_reject(deltas: list[int]) -> None:
    # All records earlier than first_timestamp would give max_timestamp < first_timestamp,
    # which every reader rejects: the encoder must say so instead of emitting it.
    with pytest.raises(ValueError):
        records.encode_batch([(d, None, b"v") for d in deltas], first_timestamp=10_000)


# ------------------------------------------------------------------------------ corruption


def _assert_detected(corrupt: bytes) -> None:
    with pytest.raises(CorruptBatch):
        records.validate_batch(corrupt)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch_args(max_records=4), st.integers(1, 255))
def test_every_single_byte_corruption_is_detected(args: dict[str, object], mask: int) -> None:
    batch = _encode(args)
    records.validate_batch(batch)
    for pos in range(len(batch)):
        for xor in {mask, 0xFF, 1 << (pos % 8)}:
            corrupt = bytearray(batch)
            corrupt[pos] ^= xor
            _assert_detected(bytes(corrupt))


def test_every_byte_replaced_by_every_other_value_is_detected() -> None:
    # Exhaustive for one small batch, base_offset and leader_epoch included: they are what
    # the broker stamps and are covered by the header checksum.
    batch = _small_batch()
    for pos in range(len(batch)):
        for value in range(256):
            if value == batch[pos]:
                continue
            corrupt = bytearray(batch)
            corrupt[pos] = value
            _assert_detected(bytes(corrupt))


@settings(deadline=None)
@given(batch_args())
def test_every_truncation_is_rejected(args: dict[str, object]) -> None:
    batch = _encode(args)
    for cut in range(len(batch)):
        with pytest.raises(CorruptBatch):
            records.validate_batch(batch[:cut])
        if cut < HEADER_SIZE:
            with pytest.raises(IncompleteBatch):
                records.validate_batch(batch[:cut])


def test_truncation_is_reported_as_incomplete() -> None:
    batch = _small_batch()
    for cut in range(len(batch)):
        with pytest.raises(IncompleteBatch):
            records.validate_batch(batch[:cut])


def test_validate_at_a_position_inside_a_buffer() -> None:
    batch = _small_batch()
    buf = b"\x00" * 13 + batch + b"trailing"
    assert records.validate_batch(buf, 13).base_offset == 1234
    with pytest.raises(CorruptBatch):
        records.validate_batch(buf, 12)


def test_record_count_must_match_the_record_section() -> None:
    # A header that claims one record more than the body holds, with both checksums made
    # right, is still refused: validate_batch checks the msgpack array length.
    batch = bytearray(_small_batch())
    struct.pack_into("<I", batch, 20, 4)
    struct.pack_into("<I", batch, 60, records._xxh32(bytes(batch[:60])))
    with pytest.raises(CorruptBatch, match="records"):
        records.validate_batch(bytes(batch))


# ------------------------------------------------------------------------------ stamping


@settings(deadline=None)
@given(batch_args(), st.integers(0, 2**62), st.integers(0, 2**32 - 1))
def test_stamp_header_changes_only_offset_and_epoch(
    args: dict[str, object], offset: int, epoch: int
) -> None:
    batch = _encode(args)
    head = records.stamp_header(batch, offset, epoch)
    assert len(head) == HEADER_SIZE
    stamped = head + batch[HEADER_SIZE:]
    before = records.validate_batch(batch)
    after = records.validate_batch(stamped)
    assert after.base_offset == offset
    assert after.leader_epoch == epoch
    unchanged = ("base_offset", "leader_epoch", "header_checksum")
    for field in before.__struct_fields__:
        if field not in unchanged:
            assert getattr(after, field) == getattr(before, field), field
    assert records.decode_records(stamped, after) == records.decode_records(batch, before)
    # bytes outside base_offset [0,8), leader_epoch [16,20) and the header checksum [60,64)
    changed = {i for i in range(len(batch)) if batch[i] != stamped[i]}
    assert changed <= set(range(8)) | set(range(16, 20)) | set(range(60, 64))


@settings(deadline=None)
@given(batch_args(), st.integers(0, 2**62), st.integers(0, 2**32 - 1))
def test_accept_batch_is_validate_then_stamp(
    args: dict[str, object], offset: int, epoch: int
) -> None:
    batch = _encode(args)
    head, header = records.accept_batch(batch, offset, epoch)
    assert head == records.stamp_header(batch, offset, epoch)
    assert header == records.validate_batch(head + batch[HEADER_SIZE:])


def test_accept_batch_refuses_what_validate_batch_refuses() -> None:
    batch = bytearray(_small_batch())
    batch[-1] ^= 0xFF  # the body no longer matches its checksum
    with pytest.raises(CorruptBatch) as expected:
        records.validate_batch(batch)
    with pytest.raises(CorruptBatch) as got:
        records.accept_batch(batch, 7, 0)
    assert str(got.value) == str(expected.value)


def test_stamp_header_accepts_memoryview() -> None:
    batch = _small_batch()
    head = records.stamp_header(memoryview(batch), 7, 1)
    assert records.validate_batch(head + batch[HEADER_SIZE:]).base_offset == 7


# ------------------------------------------------------------------------------ iteration


@settings(deadline=None)
@given(st.lists(batch_args(max_records=3), min_size=1, max_size=5), st.data())
def test_iter_batches_walks_a_concatenation_and_stops_at_a_partial_tail(
    many: list[dict[str, object]], data: st.DataObject
) -> None:
    batches = [_encode(a) for a in many]
    buf = b"".join(batches)
    positions = [sum(len(b) for b in batches[:i]) for i in range(len(batches))]
    for verify in (True, False):
        found = list(records.iter_batches(buf, verify=verify))
        assert [p for p, _ in found] == positions
        assert [h.batch_length for _, h in found] == [len(b) for b in batches]
    # a prefix of the next batch at the end is not yielded and does not raise
    tail = data.draw(st.integers(1, len(batches[-1]) - 1))
    partial = buf + batches[-1][:tail]
    for verify in (True, False):
        assert [p for p, _ in records.iter_batches(partial, verify=verify)] == positions


def test_iter_batches_raises_on_corruption_in_the_middle() -> None:
    a, b = _small_batch(), _small_batch()
    corrupt = bytearray(a + b)
    corrupt[len(a) + 70] ^= 0x10
    it = records.iter_batches(bytes(corrupt))
    assert next(it)[0] == 0
    with pytest.raises(CorruptBatch):
        next(it)


def test_iter_batches_over_empty_input_yields_nothing() -> None:
    assert list(records.iter_batches(b"")) == []


def test_peek_length_reads_offset_and_length() -> None:
    batch = _small_batch()
    assert records.peek_length(b"xx" + batch, 2) == (1234, len(batch))


def test_decode_records_reports_a_malformed_section_as_corrupt() -> None:
    # A body that is not a list of records but whose checksums are right.
    body = records._encoder.encode([[0, None, 5]])
    batch = records._assemble(body, 1, 0, 0, -1, -1, 0, 0)
    header = records.validate_batch(batch)
    with pytest.raises(CorruptBatch, match="malformed"):
        records.decode_records(batch, header)

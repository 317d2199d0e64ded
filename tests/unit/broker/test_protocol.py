"""The wire protocol without sockets: framing and request decoding, byte by byte."""

from __future__ import annotations

import struct

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import errors
from broker import protocol as p

MAX = 1024


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def feed_in_chunks(dec: p.FrameDecoder, data: bytes, cuts: list[int]) -> list[bytes]:
    out: list[bytes] = []
    prev = 0
    for cut in [*sorted(cuts), len(data)]:
        out += dec.feed(data[prev:cut])
        prev = cut
    return out


# ----------------------------------------------------------------------------- framing
def test_encode_frame_prefixes_the_big_endian_length() -> None:
    assert p.encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert p.encode_frame(b"") == b"\x00\x00\x00\x00"


def test_frames_fed_byte_by_byte_come_out_whole() -> None:
    dec = p.FrameDecoder(MAX)
    data = frame(b"hello") + frame(b"") + frame(b"world!")
    out: list[bytes] = []
    for i in range(len(data)):
        got = dec.feed(data[i : i + 1])
        out += got
    assert out == [b"hello", b"", b"world!"]
    assert dec.buffered == 0


def test_many_frames_in_one_chunk_and_a_partial_tail_is_kept() -> None:
    dec = p.FrameDecoder(MAX)
    data = frame(b"a") + frame(b"bb") + frame(b"cccc")
    assert dec.feed(data[:-2]) == [b"a", b"bb"]
    assert dec.buffered == 4 + 2  # the third frame's prefix and two of its bytes
    assert dec.feed(data[-2:]) == [b"cccc"]
    assert dec.buffered == 0


def test_a_split_length_prefix_is_reassembled() -> None:
    dec = p.FrameDecoder(MAX)
    data = frame(b"xyz")
    assert dec.feed(data[:2]) == []
    assert dec.feed(data[2:3]) == []
    assert dec.feed(data[3:]) == [b"xyz"]


def test_a_frame_of_exactly_the_limit_is_accepted() -> None:
    dec = p.FrameDecoder(MAX)
    assert dec.feed(frame(b"x" * MAX)) == [b"x" * MAX]


def test_a_frame_declared_over_the_limit_is_fatal_before_its_body_arrives() -> None:
    dec = p.FrameDecoder(MAX)
    with pytest.raises(p.ProtocolError) as info:
        dec.feed(struct.pack(">I", MAX + 1))  # only the prefix: nothing is buffered for it
    assert info.value.code == errors.FrameTooLarge.code
    assert info.value.fatal


def test_a_whole_oversized_frame_in_one_read_is_fatal() -> None:
    dec = p.FrameDecoder(MAX)
    with pytest.raises(p.ProtocolError) as info:
        dec.feed(frame(b"x" * (MAX + 1)))  # exactly one frame: the one-frame shortcut
    assert info.value.code == errors.FrameTooLarge.code


def test_one_whole_frame_comes_back_as_bytes_whatever_buffer_it_was_read_into() -> None:
    dec = p.FrameDecoder(MAX)
    for data in (frame(b"abc"), bytearray(frame(b"abc")), memoryview(frame(b"abc"))):
        (out,) = dec.feed(data)  # type: ignore[arg-type]
        assert type(out) is bytes and out == b"abc"
    assert dec.buffered == 0


def test_an_oversized_frame_after_good_ones_is_fatal_even_when_fed_in_pieces() -> None:
    dec = p.FrameDecoder(MAX)
    assert dec.feed(frame(b"ok")[:3]) == []
    with pytest.raises(p.ProtocolError) as info:
        dec.feed(frame(b"ok")[3:] + struct.pack(">I", 0xFFFFFFFF))
    assert info.value.code == errors.FrameTooLarge.code


@given(
    payloads=st.lists(st.binary(max_size=MAX), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=20),
)
def test_any_split_of_a_frame_stream_yields_the_same_frames(
    payloads: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(frame(x) for x in payloads)
    dec = p.FrameDecoder(MAX)
    assert feed_in_chunks(dec, data, [c % (len(data) + 1) for c in cuts]) == payloads
    assert dec.buffered == 0


# ----------------------------------------------------------------------------- requests
def enc(obj: object) -> bytes:
    return msgspec.msgpack.encode(obj)


def decode_error(payload: bytes) -> p.ProtocolError:
    with pytest.raises(p.ProtocolError) as info:
        p.decode_request(payload)
    assert not info.value.fatal, "a bad request must leave the connection usable"
    return info.value


def test_every_request_type_round_trips() -> None:
    reqs: list[p.Request] = [
        p.Hello(id=1, client_id="c", api_key="k" * 16),
        p.Produce(id=2, topic="t", batches=[b"x"], partition=1, key=b"k", acks=0),
        p.Fetch(id=3, partitions=[p.FetchPartition("t", 0, 5)], max_wait_ms=10),
        p.ListOffsets(id=4, topic="t", partition=0, spec="earliest"),
        p.ListOffsets(id=5, topic="t", partition=0, spec=1234),
        p.Metadata(id=6, topics=["t"], auto_create=True),
        p.CreateTopic(id=7, topic="t", partitions=3),
        p.DeleteTopic(id=8, topic="t"),
        p.InitProducer(id=9),
        p.JoinGroup(id=10, group="g", topics=["t"], session_timeout_ms=3000),
        p.Heartbeat(id=11, group="g", member_id="m", generation=2, owned=[("t", 0)]),
        p.LeaveGroup(id=12, group="g", member_id="m"),
        p.CommitOffsets(id=13, group="g", offsets=[("t", 0, 7)], member_id="m"),
        p.FetchOffsets(id=14, group="g", partitions=[("t", 0)]),
        p.ListGroups(id=15),
        p.DescribeGroup(id=16, group="g"),
    ]
    for req in reqs:
        wire = p.encode_message(req)
        assert struct.unpack(">I", wire[:4])[0] == len(wire) - 4
        assert p.decode_request(wire[4:]) == req


def test_not_msgpack_is_bad_frame() -> None:
    assert decode_error(b"").code == errors.BadFrame.code
    assert decode_error(b"\xc1").code == errors.BadFrame.code  # never used in msgpack
    assert decode_error(b"\x81\xa2op").code == errors.BadFrame.code  # truncated map


@pytest.mark.parametrize("value", [5, "produce", [1, 2], None, 1.5, b"bytes"])
def test_msgpack_that_is_not_a_map_is_bad_frame(value: object) -> None:
    assert decode_error(enc(value)).code == errors.BadFrame.code


def test_deeply_nested_msgpack_is_a_bad_frame_not_a_crash() -> None:
    # a value nested past the decoder's recursion limit, before the "op" tag is seen
    payload = b"\x82\xa1x" + b"\x91" * 200_000 + b"\x00" + b"\xa2op\xa5hello"
    assert decode_error(payload).code in (errors.BadFrame.code, errors.InvalidRequest.code)
    assert p.request_id_of(payload) == 0


def test_invalid_utf8_in_a_string_is_bad_frame() -> None:
    bad_str = b"\xa2\xff\xfe"  # a 2-byte msgpack str that is not UTF-8
    for payload in (
        b"\x82\xa2op" + bad_str + b"\xa2id\x01",  # as a value
        b"\x82" + bad_str + b"\x01\xa2op\xa5hello",  # as a key
    ):
        assert decode_error(payload).code == errors.BadFrame.code
        assert p.request_id_of(payload) == 0


def test_unknown_op_is_invalid_request_naming_op() -> None:
    err = decode_error(enc({"op": "launch_rockets", "id": 1}))
    assert err.code == errors.InvalidRequest.code
    assert "op" in err.message


def test_missing_op_is_invalid_request() -> None:
    err = decode_error(enc({"id": 1, "topic": "t"}))
    assert err.code == errors.InvalidRequest.code
    assert "op" in err.message


def test_missing_field_is_named() -> None:
    err = decode_error(enc({"op": "produce", "id": 1, "batches": []}))
    assert err.code == errors.InvalidRequest.code
    assert "`topic`" in err.message


def test_wrong_type_is_named_with_its_path() -> None:
    err = decode_error(enc({"op": "produce", "id": 1, "topic": 7, "batches": []}))
    assert err.code == errors.InvalidRequest.code
    assert "$.topic" in err.message
    err = decode_error(
        enc({"op": "fetch", "id": 1, "partitions": [["t", "zero", 0]], "max_wait_ms": 0})
    )
    assert "$.partitions[0]" in err.message


def test_unknown_field_is_named() -> None:
    err = decode_error(enc({"op": "list_groups", "id": 1, "verbose": True}))
    assert err.code == errors.InvalidRequest.code
    assert "`verbose`" in err.message


def test_out_of_range_acks_is_refused() -> None:
    err = decode_error(enc({"op": "produce", "id": 1, "topic": "t", "batches": [], "acks": 2}))
    assert err.code == errors.InvalidRequest.code
    assert "acks" in err.message


def test_request_id_of_a_bad_request_is_recovered_when_present() -> None:
    assert p.request_id_of(enc({"op": "nope", "id": 42})) == 42
    assert p.request_id_of(enc({"op": "nope", "id": True})) == 0  # bool is not an id
    assert p.request_id_of(enc({"op": "nope", "id": "42"})) == 0
    assert p.request_id_of(enc([1, 2])) == 0
    assert p.request_id_of(b"\xc1garbage") == 0


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_protocol_error(payload: bytes) -> None:
    try:
        p.decode_request(payload)
    except p.ProtocolError as exc:
        assert exc.code in (errors.BadFrame.code, errors.InvalidRequest.code)
        assert not exc.fatal
    p.request_id_of(payload)  # never raises


# ---------------------------------------------------------------------------- responses
def test_responses_round_trip() -> None:
    resps: list[p.Response] = [
        p.Error(id=1, code=errors.UnknownTopic.code, message="no", retriable=False),
        p.Produced(id=2, topic="t", partition=0, base_offset=3, last_offset=5, duplicate=True),
        p.Fetched(id=3, partitions=[p.FetchedPartition("t", 0, 9, 0, b"raw", None)]),
        p.HeartbeatResult(id=4, generation=3, assignment=[("t", 1)], rebalancing=True),
    ]
    for resp in resps:
        wire = p.encode_message(resp)
        assert p.decode_response(wire[4:]) == resp


def test_a_bad_response_frame_is_a_protocol_error() -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.decode_response(enc({"op": "produced", "id": 1}))
    assert info.value.code == errors.BadFrame.code

"""The gateway's wire protocol without a server: every client message decodes to its type or
is refused with one clear error; server messages are the JSON the protocol documents."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from gateway import frames


def test_client_messages_decode_to_their_types() -> None:
    assert frames.decode_client('{"type":"auth","token":"t"}') == frames.Auth("t")
    msg = frames.decode_client(b'{"type":"read","ids":["a","b"]}')
    assert msg == frames.Read(["a", "b"])
    assert frames.engagement_of(msg) == "read"
    assert frames.engagement_of(frames.Seen([])) == "seen"
    assert frames.engagement_of(frames.Archived([])) == "archived"


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "null",
        "[]",
        '{"type":"nope"}',
        '{"ids":["a"]}',
        '{"type":"seen"}',
        '{"type":"seen","ids":"a"}',
        '{"type":"seen","ids":[1]}',
        '{"type":"seen","ids":[""]}',
        '{"type":"seen","ids":["a"],"extra":1}',
        '{"type":"auth"}',
        json.dumps({"type": "seen", "ids": ["x"] * (frames.MAX_IDS + 1)}),
        json.dumps({"type": "seen", "ids": ["x" * 201]}),
    ],
)
def test_bad_client_messages_are_refused_with_a_protocol_violation(raw: str) -> None:
    with pytest.raises(frames.ProtocolViolation):
        frames.decode_client(raw)


@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_no_input_makes_the_decoder_raise_anything_else(raw: bytes | str) -> None:
    try:
        frames.decode_client(raw)
    except frames.ProtocolViolation:
        pass


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=10,
    )
)
def test_any_json_value_is_refused_or_typed(value: object) -> None:
    try:
        msg = frames.decode_client(json.dumps(value))
    except frames.ProtocolViolation:
        return
    assert isinstance(msg, frames.Auth | frames.Seen | frames.Read | frames.Archived)


def test_a_notification_carries_the_payload_bytes_as_given() -> None:
    raw = b'{"b": 2, "a": [1, 2.50]}'
    out = json.loads(frames.notification("id1", "ev1", "orders", raw, 123, "42"))
    assert out == {
        "type": "notification",
        "id": "id1",
        "event_id": "ev1",
        "topic": "orders",
        "payload": {"b": 2, "a": [1, 2.5]},
        "ts": 123,
        "cursor": "42",
    }
    assert b'"payload":{"b": 2, "a": [1, 2.50]}' in frames.notification("i", "e", "t", raw, 1, "1")
    assert json.loads(frames.notification("i", "e", "t", b"", 1, "1"))["payload"] is None


def test_the_other_server_messages() -> None:
    assert json.loads(frames.retract("x")) == {"type": "retract", "id": "x"}
    assert json.loads(frames.counts(3, 1)) == {"type": "counts", "unseen": 3, "unread": 1}
    assert json.loads(frames.ready("7", 2, True)) == {
        "type": "ready",
        "cursor": "7",
        "backfilled": 2,
        "truncated": True,
    }
    assert json.loads(frames.error("bad_message", "m")) == {
        "type": "error",
        "code": "bad_message",
        "message": "m",
    }


def test_cursors_round_trip_and_foreign_ones_are_refused() -> None:
    assert frames.parse_cursor(frames.format_cursor(12345)) == 12345
    assert frames.parse_cursor(None) is None and frames.parse_cursor("") is None
    for bad in ("-1", "1.5", "abc", "1" * 20, " 1"):
        with pytest.raises(frames.ProtocolViolation):
            frames.parse_cursor(bad)


def test_every_close_code_is_private_or_standard_and_its_reason_fits() -> None:
    for name, close in frames.CLOSE.items():
        assert 4000 <= close.code < 5000 or close.code == 1001, name
        assert len(close.reason.encode()) <= 123, name
    assert len({c.code for c in frames.CLOSE.values()}) == len(frames.CLOSE)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70_000])
def test_a_text_frame_is_what_websockets_would_send(size: int) -> None:
    """The gateway frames a message once for all its recipients; the bytes must be the ones
    websockets' own protocol writes for it (server side: unmasked, no extension)."""
    message = b"x" * size
    reference = Frame(Opcode.TEXT, message).serialize(mask=False, extensions=[])
    assert frames.text_frame(message) == reference

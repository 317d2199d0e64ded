"""The session table's held writes (``gateway/sessions.py``): between ``hold`` and
``release`` each connection's frames are written at once, in order; a session cut off
meanwhile gets what it was already given before its close frame."""

from __future__ import annotations

from typing import Any

from websockets.protocol import State

from gateway import frames
from gateway.sessions import Session, SessionTable


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.buffered = 0

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str) -> Any:
        return None

    def abort(self) -> None:
        return None


class FakeProtocol:
    def __init__(self, transport: FakeTransport) -> None:
        self.state = State.OPEN
        self.transport = transport
        self.closed: tuple[int, str] | None = None

    def send_close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)
        self.state = State.CLOSING


class FakeConn:
    def __init__(self) -> None:
        self.transport = FakeTransport()
        self.protocol = FakeProtocol(self.transport)
        self.loop = self

    def send_data(self) -> None:
        self.transport.writes.append(b"<close>")

    def call_later(self, _delay: float, _fn: Any) -> None:
        return None


def session(table: SessionTable, user: str) -> tuple[Session, FakeTransport]:
    conn = FakeConn()
    s = Session(table, conn, "t", user)  # type: ignore[arg-type]
    s.backfilling = False
    table.add(s)
    return s, conn.transport


def test_held_frames_go_out_in_one_write_per_connection_in_order() -> None:
    table = SessionTable()
    _a, ta = session(table, "a")
    _b, tb = session(table, "b")
    table.hold()
    table.offer_user("t", "a", 1, b'{"n":1}')
    table.offer_user("t", "b", 2, b'{"n":2}')
    table.offer_user("t", "a", 3, b'{"n":3}')
    table.write_user("t", "a", b'{"counts":1}')
    assert ta.writes == [] and tb.writes == []  # nothing yet
    table.release()
    one, two, three = (frames.text_frame(f) for f in (b'{"n":1}', b'{"n":2}', b'{"n":3}'))
    assert ta.writes == [one + three + frames.text_frame(b'{"counts":1}')]
    assert tb.writes == [two]
    table.offer_user("t", "a", 4, b'{"n":4}')  # not held: written at once
    assert ta.writes[-1] == frames.text_frame(b'{"n":4}')


def test_a_session_cut_off_while_held_gets_what_it_was_given_before_the_close() -> None:
    table = SessionTable(send_buffer_bytes=100)
    _a, ta = session(table, "a")
    table.hold()
    table.offer_user("t", "a", 1, b"x" * 40)
    table.offer_user("t", "a", 2, b"y" * 80)  # past the send buffer with what is held
    table.release()
    assert ta.writes == [frames.text_frame(b"x" * 40), b"<close>"]
    assert table.cut_offs == {"slow_consumer": 1}

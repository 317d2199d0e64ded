"""Sessions: the open, authenticated connections of this gateway, by user and by tenant.

A user may hold several sessions (devices); each gets every message. A message reaches a
session through :meth:`Session.offer` with its inbox number (``gateway/inbox.py``): the session
sends it only if the number is above the last one it sent, so backfill pages and live pushes
may overlap in any way and the client still gets each message once, in order. While a session
is backfilling, live messages wait in ``pending`` (bounded by the backfill itself: the reader
pushes at most what it indexes meanwhile) and go out after the backfill, above its last number.

**Back-pressure without waiting.** Writes never await: a frame is written to the
connection's transport at once, framed by :func:`gateway.frames.text_frame` (once per
message: a broadcast's bytes are the same object for every recipient); websockets' protocol
still owns everything else on the connection (handshake, pings, close). A connection whose
unsent bytes (the transport's buffer, above a kernel send buffer capped at the same size)
would pass ``send_buffer_bytes`` is *cut off*: it gets a close frame with code 4008 and
reason "send buffer full: reconnect with your last cursor" behind what it has not read, and
is aborted ``close_timeout`` later if it still does not read. Its memory is bounded by that
limit and nobody else waits for it: a broadcast loop never awaits a slow client. The client
catches up by reconnecting with its cursor.

Cost per session: this object (~300 bytes with ``__slots__``) on top of websockets'
connection and its handler task: 14 KiB in all per idle connection (bench/RESULTS.md,
Gateway: idle connections and memory).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from gateway import frames

log = logging.getLogger("herald.gateway")


class Recipients(Protocol):
    """Where the reader's numbered messages and the unnumbered frames go, and who is
    present: this process's :class:`SessionTable`, or the node's :class:`gateway.hub.Hub`
    routing to its worker processes (``gateway.workers``)."""

    def present(self, tenant: str, user: str) -> int: ...

    def offer_user(self, tenant: str, user: str, seq: int, frame: bytes) -> int: ...

    def offer_tenant(
        self,
        tenant: str,
        seq: int,
        frame: bytes,
        allows: Callable[[Iterable[str]], set[str]],
    ) -> int: ...

    def write_user(self, tenant: str, user: str | None, frame: bytes) -> None: ...

    def hold(self) -> None: ...

    def release(self) -> None: ...


class Session:
    """One device of one user: its connection, its position, its send budget."""

    __slots__ = (
        "backfilling",
        "bucket",
        "bucket_at",
        "conn",
        "cut_off",
        "held",
        "held_bytes",
        "last_seq",
        "pending",
        "table",
        "tenant",
        "user",
    )

    def __init__(self, table: SessionTable, conn: ServerConnection, tenant: str, user: str) -> None:
        self.table = table
        self.conn = conn
        self.tenant = tenant
        self.user = user
        self.last_seq = 0
        self.held: list[bytes] | None = None  # frames written while the table holds
        self.held_bytes = 0
        self.backfilling = True
        self.pending: list[tuple[int, bytes]] = []  # (number, wire bytes)
        self.cut_off: str | None = None
        self.bucket = float(table.message_burst)
        self.bucket_at = 0.0

    # ------------------------------------------------------------------ sending
    def offer(self, seq: int, wire: bytes) -> None:
        """A numbered message, framed (:func:`gateway.frames.text_frame`): sent now (or after
        the backfill) if it is new to this session."""
        if self.backfilling:
            self.pending.append((seq, wire))
        elif seq > self.last_seq and self.write_wire(wire):
            self.last_seq = seq

    def write(self, message: bytes) -> bool:
        """Write one message (JSON) now. False if the session is closed or was just cut off
        for a full send buffer."""
        return self.write_wire(frames.text_frame(message))

    def write_wire(self, wire: bytes) -> bool:
        """Write one framed message now (see :meth:`write`)."""
        if self.cut_off is not None:
            return False
        conn = self.conn
        if conn.protocol.state is not State.OPEN:
            return False
        transport = conn.transport
        table = self.table
        if (
            transport.get_write_buffer_size() + self.held_bytes + len(wire)
            > table.send_buffer_bytes
        ):
            self.cut("slow_consumer")
            return False
        if table.holding:
            held = self.held
            if held is None:
                held = self.held = []
                table.held.append(self)
            held.append(wire)
            self.held_bytes += len(wire)
            return True
        transport.write(wire)
        return True

    def write_held(self) -> None:
        """Write the frames held for this session (:meth:`SessionTable.hold`) at once."""
        held, self.held = self.held, None
        self.held_bytes = 0
        if not held or self.conn.protocol.state is not State.OPEN:
            return
        self.conn.transport.write(held[0] if len(held) == 1 else b"".join(held))

    def finish_backfill(self) -> None:
        """Go live: send what arrived during the backfill, above its last number."""
        self.backfilling = False
        pending, self.pending = self.pending, []
        for seq, wire in pending:
            self.offer(seq, wire)

    def cut(self, why: str) -> None:
        """Close now with the reason ``why`` (a key of ``frames.CLOSE``) without waiting: the
        close frame is queued behind what the client has not read; the connection is
        dropped if the closing handshake has not finished ``close_timeout`` later."""
        if self.cut_off is not None:
            return
        self.write_held()  # what was accepted goes out before the close frame
        self.cut_off = why
        self.table.cut_offs[why] = self.table.cut_offs.get(why, 0) + 1
        close = frames.CLOSE[why]
        conn = self.conn
        log.info(
            "event=session_cut_off tenant=%s user=%s reason=%s buffered=%d",
            self.tenant,
            self.user,
            why,
            conn.transport.get_write_buffer_size() if conn.transport else 0,
        )
        if conn.protocol.state is State.OPEN:
            conn.protocol.send_close(close.code, close.reason)
            conn.send_data()
        transport = conn.transport
        conn.loop.call_later(self.table.close_timeout, transport.abort)

    # --------------------------------------------------------------- rate limit
    def allow_message(self, now: float) -> bool:
        """Token bucket over the client's messages (``messages-per-second``, ``burst``)."""
        t = self.table
        self.bucket = min(
            float(t.message_burst), self.bucket + (now - self.bucket_at) * t.messages_per_second
        )
        self.bucket_at = now
        if self.bucket < 1.0:
            return False
        self.bucket -= 1.0
        return True


class SessionTable:
    """Every session of this gateway, by (tenant, user) and by tenant."""

    def __init__(
        self,
        *,
        send_buffer_bytes: int = 256 * 1024,
        close_timeout: float = 2.0,
        messages_per_second: float = 20.0,
        message_burst: int = 40,
    ) -> None:
        self.send_buffer_bytes = send_buffer_bytes
        self.close_timeout = close_timeout
        self.messages_per_second = messages_per_second
        self.message_burst = message_burst
        self.by_user: dict[tuple[str, str], list[Session]] = {}
        self.by_tenant: dict[str, dict[str, list[Session]]] = {}
        self.count = 0
        self.cut_offs: dict[str, int] = {}
        # between hold() and release(): sessions with frames held, in the order first held
        self.holding = False
        self.held: list[Session] = []

    def hold(self) -> None:
        """Hold the frames written from now until :meth:`release` and write each session's
        then, in one write: the reader's batch (its messages, then the counts behind them)
        costs one send per connection instead of one per frame. Only around code that does
        not await (nothing else may write meanwhile)."""
        self.holding = True

    def release(self) -> None:
        """Write what :meth:`hold` held, per session in the order it was written."""
        self.holding = False
        held, self.held = self.held, []
        for s in held:
            s.write_held()

    def add(self, session: Session) -> None:
        key = (session.tenant, session.user)
        devices = self.by_user.get(key)
        if devices is None:
            devices = self.by_user[key] = []
            self.by_tenant.setdefault(session.tenant, {})[session.user] = devices
        devices.append(session)
        self.count += 1
        _cap_send_buffer(session.conn, self.send_buffer_bytes)

    def remove(self, session: Session) -> None:
        key = (session.tenant, session.user)
        devices = self.by_user.get(key)
        if devices is None or session not in devices:
            return
        devices.remove(session)
        self.count -= 1
        if not devices:
            del self.by_user[key]
            users = self.by_tenant[session.tenant]
            del users[session.user]
            if not users:
                del self.by_tenant[session.tenant]

    def present(self, tenant: str, user: str) -> int:
        """How many devices of the user are connected here (the presence the in-app channel
        and the fan-out's ``recipient.online`` see)."""
        devices = self.by_user.get((tenant, user))
        return len(devices) if devices else 0

    def sessions_of(self, tenant: str, user: str) -> list[Session]:
        return list(self.by_user.get((tenant, user), ()))

    def offer_user(self, tenant: str, user: str, seq: int, frame: bytes) -> int:
        devices = self.by_user.get((tenant, user))
        if not devices:
            return 0
        wire = frames.text_frame(frame)
        for s in list(devices):
            s.offer(seq, wire)
        return len(devices)

    def offer_tenant(
        self,
        tenant: str,
        seq: int,
        frame: bytes,
        allows: Callable[[Iterable[str]], set[str]],
    ) -> int:
        """A broadcast: ``frame`` (encoded once) to every session of the tenant whose user
        ``allows`` lets through (one call for all the tenant's connected users). Returns the
        sessions offered it."""
        users = self.by_tenant.get(tenant)
        if not users:
            return 0
        allowed = allows(users.keys())
        wire = frames.text_frame(frame)  # once: the same bytes go to every recipient
        n = 0
        for user in allowed:
            for s in users.get(user, ()):
                s.offer(seq, wire)
                n += 1
        return n

    def write_user(self, tenant: str, user: str | None, frame: bytes) -> None:
        """An unnumbered frame (retract, counts) to the user's sessions (``user`` None:
        every session of the tenant)."""
        wire = frames.text_frame(frame)
        if user is None:
            for devices in list(self.by_tenant.get(tenant, {}).values()):
                for s in list(devices):
                    s.write_wire(wire)
            return
        for s in list(self.by_user.get((tenant, user), ())):
            s.write_wire(wire)

    def all(self) -> list[Session]:
        return [s for devices in self.by_user.values() for s in devices]


def _cap_send_buffer(conn: ServerConnection, limit: int) -> None:
    """Cap the kernel's send buffer of the connection at ``limit`` (it would otherwise grow
    to megabytes on its own), so a client that stops reading is noticed after about twice
    ``send_buffer_bytes`` in all, not after the kernel's autotuned maximum."""
    sock: Any = conn.transport.get_extra_info("socket") if conn.transport else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limit)

"""The link between a node and one of its gateway worker processes (``gateway.workers``):
one Unix socket pair per worker, made by the node when it starts the worker, carrying
length-prefixed msgpack messages both ways. Sans I/O but for :func:`read`
(:class:`Splitter` cuts a stream into messages without it).

Node -> worker: :class:`Hello` (once, first), then the numbered stream (:class:`Push`,
:class:`Broadcast`), unnumbered frames for devices (:class:`Write`, :class:`Tell`) and
answers to opens (:class:`Backfill`).

Worker -> node: :class:`Listening` (once, when its socket is bound), then one
:class:`Open` per authenticated connection, one :class:`Gone` when it closes, and the
client's marks (:class:`Mark`).

Why a private socket pair and not a topic of the log: the workers need the stream only while
they live (a client that loses its worker reconnects with its cursor and its backfill comes
from the node's inbox), so durability would buy nothing; the node routes each message only
to the workers holding one of its recipients, which a topic every worker reads in full
could not; and the link's order is what makes an open's backfill and the live stream meet
without a gap (``gateway/hub.py``).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Final

import msgspec

MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024  # a Backfill of 500 messages of 64 KiB fits
_LEN = struct.Struct(">I")


class Hello(msgspec.Struct, tag="hello", array_like=True):
    """The worker's configuration: the node's config (msgpack of :class:`broker.config.
    Config`), the token secret, the tenants the node serves, the port to share, its index
    and its own connection cap."""

    config: bytes
    secret: bytes
    tenants: list[str]
    port: int
    index: int
    max_connections: int


class Listening(msgspec.Struct, tag="listening", array_like=True):
    pid: int
    port: int


class Open(msgspec.Struct, tag="open", array_like=True):
    """A connection's token checked out and its session is registered on the worker: count
    the device present, answer with its :class:`Backfill`."""

    sid: int
    tenant: str
    user: str
    cursor: int | None


class Gone(msgspec.Struct, tag="gone", array_like=True):
    sid: int
    tenant: str
    user: str


class Mark(msgspec.Struct, tag="mark", array_like=True):
    sid: int
    tenant: str
    user: str
    what: str
    ids: list[str]


class Backfill(msgspec.Struct, tag="backfill", array_like=True):
    """What the session ``sid`` missed: its start (``after``), the messages above it in
    number order as (number, JSON), whether older ones were left out, and the counts."""

    sid: int
    after: int
    messages: list[tuple[int, bytes]]
    truncated: bool
    unseen: int
    unread: int


class Push(msgspec.Struct, tag="push", array_like=True):
    """A numbered in-app message for the user's sessions on this worker."""

    seq: int
    tenant: str
    user: str
    frame: bytes


class Broadcast(msgspec.Struct, tag="broadcast", array_like=True):
    """A numbered broadcast for the tenant's sessions on this worker but ``deny`` (the users
    whose preferences refuse it, decided by the node)."""

    seq: int
    tenant: str
    frame: bytes
    deny: list[str]


class Write(msgspec.Struct, tag="write", array_like=True):
    """An unnumbered frame (retract, counts) for the user's sessions (None: the tenant's)."""

    tenant: str
    user: str | None
    frame: bytes


class Tell(msgspec.Struct, tag="tell", array_like=True):
    """A frame for one session (an ``error`` answering its marks)."""

    sid: int
    frame: bytes


ToWorker = Hello | Push | Broadcast | Write | Tell | Backfill
ToNode = Listening | Open | Gone | Mark

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_to_node = msgspec.msgpack.Decoder(ToNode)


class LinkError(Exception):
    code = "gateway_link"


def encode(msg: ToWorker | ToNode) -> bytes:
    body = _encoder.encode(msg)
    return _LEN.pack(len(body)) + body


def decode_to_worker(body: bytes) -> ToWorker:
    return _to_worker.decode(body)


def decode_to_node(body: bytes) -> ToNode:
    return _to_node.decode(body)


class Splitter:
    """Cuts a stream of bytes into the bodies of the messages it carries (sans I/O): a worker
    reads what the link has, then handles every whole message in it at once (one write per
    connection for all of them: ``SessionTable.hold``)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The bodies of the messages ``data`` completes, in order (the rest is kept).
        Raises :class:`LinkError` for a length past :data:`MAX_MESSAGE_BYTES`."""
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        size = _LEN.size
        while len(buf) - pos >= size:
            (n,) = _LEN.unpack_from(buf, pos)
            if n > MAX_MESSAGE_BYTES:
                raise LinkError(f"link message of {n} bytes")
            if len(buf) - pos - size < n:
                break
            out.append(bytes(buf[pos + size : pos + size + n]))
            pos += size + n
        if pos:
            del buf[:pos]
        return out


async def read(reader: asyncio.StreamReader) -> bytes | None:
    """The next message's body; None at the end of the stream (the other side is gone).
    Raises :class:`LinkError` for a length past :data:`MAX_MESSAGE_BYTES`."""
    try:
        head = await reader.readexactly(_LEN.size)
        (n,) = _LEN.unpack(head)
        if n > MAX_MESSAGE_BYTES:
            raise LinkError(f"link message of {n} bytes")
        return await reader.readexactly(n)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None

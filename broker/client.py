"""Asyncio client for Herald's TCP protocol: a pipelined :class:`Client` connection with admin
calls, a batching idempotent :class:`Producer` and a group-member :class:`Consumer`.

The benchmark, the tests, the CLI and (later) the engines use it. Usage::

    async with await Client.connect("127.0.0.1", 9092) as client:
        producer = await client.producer()
        meta = await producer.send("orders", b"hello", key=b"user-1")
        consumer = await client.consumer("orders", group="billing")
        for record in await consumer.getmany(timeout_ms=1000):
            ...

Over TLS (a node with a ``[tls]`` section), verifying the node against a CA file::

    from broker.tls import client_context
    client = await Client.connect("node.example", 9092, ssl=client_context("ca.pem"))
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl as ssl_module
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import msgspec

from broker import errors
from broker import protocol as p
from storage import records

log = logging.getLogger("herald.client")
TopicPartition = tuple[str, int]


class BrokerError(Exception):
    """An error answered by the node (``code`` as in docs/PROTOCOL.md)."""

    def __init__(self, code: str, message: str, retriable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retriable = retriable


class ConnectionLost(BrokerError):
    def __init__(self, message: str = "connection lost") -> None:
        super().__init__("connection_lost", message, True)


class CorruptData(BrokerError):
    """The node found damaged data at ``offset`` of ``topic/partition`` and will not serve it
    (offsets ``offset`` to ``end_offset - 1`` are quarantined). The consumer stops there (its
    position stays at the damage) until the application decides: ``seek(topic, partition,
    exc.end_offset)`` to go on without them, or repair the data."""

    def __init__(self, topic: str, partition: int, offset: int, end_offset: int) -> None:
        super().__init__(
            errors.CorruptData.code,
            f"{topic}/{partition}: damaged data from offset {offset} to {end_offset - 1} is "
            f"quarantined; seek to {end_offset} to go on without it",
        )
        self.topic, self.partition = topic, partition
        self.offset, self.end_offset = offset, end_offset


# what waits for a reply: a future, or a callback called with the reply (or the error that
# ended the connection) from ``data_received`` itself, one loop turn sooner than a future's
ReplyCallback = Callable[[p.Response | BrokerError], None]
_Waiter = asyncio.Future[p.Response] | ReplyCallback


class _Connection(asyncio.Protocol):
    """The client's socket: frames out (coalesced per loop turn), replies in, matched to the
    pending futures (or callbacks) by id. A lost connection fails every pending request.
    Requests queued while replies are handled (a producer sending what waited for a reply)
    leave when ``data_received`` ends, in one write."""

    def __init__(self, pending: dict[int, _Waiter]) -> None:
        self.pending = pending
        self.loop = asyncio.get_running_loop()
        self.decoder = p.FrameDecoder(1 << 31)
        self.transport: asyncio.Transport
        self.lost = False
        self.paused = False
        self.closed = asyncio.Event()
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._out: list[bytes | bytearray] = []
        self._error: BrokerError = ConnectionLost()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            import socket

            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def write(self, frame: bytes | bytearray) -> None:
        if not self._out:
            self.loop.call_soon(self.flush)
        self._out.append(frame)

    def flush(self) -> None:
        if self._out and not self.lost:
            out, self._out = self._out, []
            self.transport.writelines(out)

    def write_now(self, frame: bytes | bytearray) -> None:
        """Write ``frame`` at once, behind any frames queued before it (in the same write):
        no flush scheduled for the end of the turn, which would find nothing left to do."""
        if self._out:
            self._out.append(frame)
            self.flush()
        else:
            self.transport.write(frame)

    def pause_writing(self) -> None:
        self.paused = True
        self._resumed.clear()

    def resume_writing(self) -> None:
        self.paused = False
        self._resumed.set()

    async def drain(self) -> None:
        if self.paused and not self.lost:
            await self._resumed.wait()

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
            for frame in frames:
                msg = p.decode_response(frame)
                waiter = self.pending.pop(msg.id, None)
                if waiter is None:
                    if isinstance(msg, p.Error):
                        # not tied to a request (e.g. frame too large): the node closes next
                        self._error = BrokerError(msg.code, msg.message, msg.retriable)
                elif isinstance(waiter, asyncio.Future):
                    if not waiter.done():
                        waiter.set_result(msg)
                else:
                    try:  # _call, inline: a call less on every reply
                        waiter(msg)
                    except Exception:  # a callback's bug must not drop the other replies
                        log.exception("event=reply_callback_failed")
        except p.ProtocolError as exc:
            self._error = BrokerError(exc.code, str(exc))
            self.transport.close()
        if self._out:
            self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._resumed.set()
        pending = list(self.pending.values())
        self.pending.clear()
        for waiter in pending:
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():
                    waiter.set_exception(self._error)
            else:
                _call(waiter, self._error)
        self.closed.set()


def _call(callback: ReplyCallback, reply: p.Response | BrokerError) -> None:
    try:
        callback(reply)
    except Exception:  # a callback's bug must not drop the other replies of this read
        log.exception("event=reply_callback_failed")


# ---------------------------------------------------------------------------- client
class Client:
    """One pipelined connection. Requests may be issued concurrently; replies are matched by
    correlation id. Reconnects on the next request after a loss."""

    # whether fetched batches arrive already checked (checksums included) by the code that
    # read them from the log: true only in process (``broker/local.py``), where the bytes
    # are the node's own verified read (``storage/reads.py``); over a network, the consumer
    # verifies every batch it decodes
    fetches_verified = False

    def __init__(
        self,
        host: str,
        port: int,
        *,
        api_key: str | None = None,
        client_id: str = "herald-py",
        connect_timeout: float = 10.0,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.api_key = api_key
        # TLS: the context verifies the node's certificate for ``host``
        self.ssl = ssl
        self.client_id = client_id
        self.connect_timeout = connect_timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, _Waiter] = {}
        self._conn: _Connection | None = None
        self._connecting: asyncio.Lock | None = None
        self._closed = False
        self.tenant = ""
        self._partition_counts: dict[str, int] = {}

    @classmethod
    async def connect(cls, host: str = "127.0.0.1", port: int = 9092, **kw: Any) -> Client:
        client = cls(host, port, **kw)
        await client._ensure_connected()
        return client

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.lost

    async def _ensure_connected(self) -> None:
        if self.connected:
            return
        if self._closed:
            raise ConnectionLost("client is closed")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self.connected:
                return
            loop = asyncio.get_running_loop()
            _transport, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self._pending),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None,
                ),
                self.connect_timeout,
            )
            self._conn = conn
            try:
                hello = await self._request_now(
                    p.Hello(id=0, client_id=self.client_id, api_key=self.api_key)
                )
            except BaseException:
                conn.transport.close()
                raise
            assert isinstance(hello, p.HelloOk)
            self.tenant = hello.tenant

    def send_nowait(self, msg: Any) -> asyncio.Future[p.Response]:
        """Queue a request (its ``id`` is assigned here) and return the future of its reply.
        Requests queued in one turn of the event loop leave in one write. Raises
        :class:`ConnectionLost` if not connected."""
        conn = self._conn
        if conn is None or conn.lost:
            raise ConnectionLost()
        msg.id = next(self._ids)
        fut: asyncio.Future[p.Response] = conn.loop.create_future()
        self._pending[msg.id] = fut
        conn.write(p.encode_message(msg))
        return fut

    def send_callback(self, msg: Any, callback: ReplyCallback, *, flush: bool = False) -> None:
        """Queue a request and call ``callback`` with its reply, or with the
        :class:`BrokerError` that lost it (``ConnectionLost``), as soon as it is read: no
        future, no task, no loop turn in between. The request leaves at the next
        :meth:`flush` (or at the end of this loop turn); with ``flush=True`` it leaves now,
        with the requests queued before it. ``callback`` runs inside the connection's read
        and must not block. Raises :class:`ConnectionLost` if not connected."""
        conn = self._conn
        if conn is None or conn.lost:
            raise ConnectionLost()
        msg.id = rid = next(self._ids)
        self._pending[rid] = callback
        if flush:
            conn.write_now(p.encode_message(msg))
        else:
            conn.write(p.encode_message(msg))

    def flush(self) -> None:
        """Send the requests queued so far now, rather than at the end of this loop turn."""
        conn = self._conn
        if conn is not None:
            conn.flush()

    async def _request_now(self, msg: Any) -> p.Response:
        fut = self.send_nowait(msg)
        conn = self._conn
        if conn is not None and conn.paused:
            await conn.drain()
        resp = await fut
        if isinstance(resp, p.Error):
            raise BrokerError(resp.code, resp.message, resp.retriable)
        return resp

    async def request(self, msg: Any, *, retries: int = 3) -> p.Response:
        """Send one request and await its reply, reconnecting and retrying on a lost
        connection or a retriable error (not for produce: see :class:`Producer`)."""
        delay = 0.05
        for attempt in range(retries + 1):
            try:
                if not self.connected:  # a coroutine less per request when connected
                    await self._ensure_connected()
                return await self._request_now(msg)
            except (ConnectionLost, ConnectionError, OSError, TimeoutError) as exc:
                if attempt == retries:
                    raise ConnectionLost(str(exc)) from exc
            except BrokerError as exc:
                if not exc.retriable or attempt == retries:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")

    async def drain(self) -> None:
        """Wait while the socket's write buffer is over its high-water mark."""
        if self._conn is not None:
            await self._conn.drain()

    async def close(self) -> None:
        self._closed = True
        conn = self._conn
        if conn is not None and not conn.lost:
            conn.flush()
            conn.transport.close()
            await conn.closed.wait()

    # ----------------------------------------------------------------------- admin
    async def create_topic(
        self,
        topic: str,
        partitions: int | None = None,
        *,
        retention_ms: int | None = None,
        retention_bytes: int | None = None,
        exist_ok: bool = False,
    ) -> p.TopicInfo:
        resp = await self.request(
            p.CreateTopic(
                id=0,
                topic=topic,
                partitions=partitions,
                retention_ms=retention_ms,
                retention_bytes=retention_bytes,
                exist_ok=exist_ok,
            )
        )
        assert isinstance(resp, p.TopicCreated)
        self._partition_counts[topic] = len(resp.topic.partitions)
        return resp.topic

    async def delete_topic(self, topic: str) -> None:
        await self.request(p.DeleteTopic(id=0, topic=topic))
        self._partition_counts.pop(topic, None)

    async def metadata(
        self, topics: list[str] | None = None, *, auto_create: bool = False
    ) -> list[p.TopicInfo]:
        resp = await self.request(p.Metadata(id=0, topics=topics, auto_create=auto_create))
        assert isinstance(resp, p.MetadataResult)
        for t in resp.topics:
            self._partition_counts[t.name] = len(t.partitions)
        return resp.topics

    async def partition_count(
        self, topic: str, *, refresh: bool = False, auto_create: bool = False
    ) -> int | None:
        if refresh or topic not in self._partition_counts:
            try:
                await self.metadata([topic], auto_create=auto_create)
            except BrokerError as exc:
                if exc.code != errors.UnknownTopic.code:
                    raise
                return None
        return self._partition_counts.get(topic)

    async def list_offsets(
        self, topic: str, partition: int, spec: Literal["earliest", "latest"] | int = "latest"
    ) -> int:
        resp = await self.request(p.ListOffsets(id=0, topic=topic, partition=partition, spec=spec))
        assert isinstance(resp, p.Offsets)
        return resp.offset

    async def list_groups(self) -> list[str]:
        resp = await self.request(p.ListGroups(id=0))
        assert isinstance(resp, p.GroupsListed)
        return resp.groups

    async def describe_group(self, group: str) -> p.GroupInfo:
        resp = await self.request(p.DescribeGroup(id=0, group=group))
        assert isinstance(resp, p.GroupDescribed)
        return resp.group

    async def fetch(
        self,
        partitions: Sequence[tuple[str, int, int]],
        *,
        max_wait_ms: int = 0,
        max_bytes: int = 16 * 1024 * 1024,
        partition_max_bytes: int = 1024 * 1024,
        min_bytes: int = 1,
    ) -> list[p.FetchedPartition]:
        resp = await self.request(
            p.Fetch(
                id=0,
                partitions=[
                    p.FetchPartition(t, i, o, partition_max_bytes) for t, i, o in partitions
                ],
                max_wait_ms=max_wait_ms,
                max_bytes=max_bytes,
                min_bytes=min_bytes,
            )
        )
        assert isinstance(resp, p.Fetched)
        return resp.partitions

    async def producer(self, **kw: Any) -> Producer:
        producer = Producer(self, **kw)
        await producer.start()
        return producer

    async def consumer(self, *topics: str, group: str | None = None, **kw: Any) -> Consumer:
        consumer = Consumer(self, list(topics), group=group, **kw)
        await consumer.start()
        return consumer


# -------------------------------------------------------------------------- producer
class RecordMetadata(msgspec.Struct, frozen=True, gc=False):
    """Where an acknowledged record is stored. A msgspec struct, as :class:`ConsumerRecord`:
    one is built for every record ``send`` acknowledges."""

    topic: str
    partition: int
    offset: int


class BatchMetadata(msgspec.Struct, frozen=True, gc=False):
    """Where an acknowledged batch is stored: offsets ``base_offset..last_offset``.
    ``duplicate``: an idempotent retry of a batch already stored (the offsets are the
    original's)."""

    topic: str
    partition: int
    base_offset: int
    last_offset: int
    duplicate: bool = False

    def record(self, index: int) -> RecordMetadata:
        return RecordMetadata(self.topic, self.partition, self.base_offset + index)


def _batch_metadata(r: p.Produced) -> BatchMetadata:
    return BatchMetadata(r.topic, r.partition, r.base_offset, r.last_offset, r.duplicate)


@dataclass
class _Accumulator:
    topic: str
    partition: int
    rows: list[records.RecordInput] = field(default_factory=list)
    futures: list[asyncio.Future[RecordMetadata]] = field(default_factory=list)
    size: int = 0
    first_ts: int = 0
    timer: asyncio.TimerHandle | None = None  # linger_ms > 0: sealed when it fires
    waiting: bool = False  # linger_ms=0: sealed when one of the partition's requests returns


class _Slots:
    """At most ``n`` produce requests in flight: an ``asyncio.Semaphore`` that can also be
    taken without awaiting (:meth:`take`), so a request can leave from a plain callback."""

    def __init__(self, n: int) -> None:
        self._free = n
        self._waiters: deque[asyncio.Future[None]] = deque()

    def take(self) -> bool:
        """Take a slot if one is free now (and nobody waits for one)."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def acquire(self) -> None:
        if self.take():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # the slot is handed over by release()
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # handed over, but nobody will use it
            else:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes to this waiter
                return
        self._free += 1


class Producer:
    """Batches records per partition (up to ``batch_bytes`` or ``linger_ms``), sends each
    batch as one produce request, pipelines up to ``max_inflight`` requests, and retries
    retriable failures with backoff. With ``idempotent=True`` (the default) every batch
    carries this producer's id and a per-partition sequence, so a batch retried after a lost
    reply is stored once. Ordering per partition holds: batches of a partition are sent in
    order and a retry resends the same bytes.

    ``linger_ms=0`` batches by load instead of by time: the records queued for a partition in
    one loop turn leave together at the end of that turn, as long as the partition has fewer
    than ``partition_inflight`` requests unanswered; past that, they wait for a reply and
    then leave as one batch (Kafka's ``max.in.flight.requests.per.connection`` does the
    same). A record pays its own round trip and no timer; under load, batches grow with the
    rate, so a fast sender does not turn into one request per record. A record awaited with
    :meth:`send` for a partition with nothing queued and nothing in flight does not wait
    for the end of the turn: it leaves at once, alone (its sender waits for it anyway, and
    one at a time this saves a loop turn per record); records queued after it in the same
    turn leave together at the end of the turn, as above."""

    def __init__(
        self,
        client: Client,
        *,
        acks: Literal[0, 1, -1] = -1,
        linger_ms: float = 2.0,
        batch_bytes: int = 512 * 1024,
        max_inflight: int = 64,
        partition_inflight: int = 5,
        idempotent: bool = True,
        retries: int = 5,
        retry_backoff_ms: int = 50,
    ) -> None:
        self.client = client
        self.acks = acks
        self.linger_ms = linger_ms
        self.partition_inflight = partition_inflight
        self.batch_bytes = batch_bytes
        self.idempotent = idempotent
        self.retries = retries
        self.retry_backoff_ms = retry_backoff_ms
        self.producer_id = records.NO_PRODUCER
        self._sequences: dict[TopicPartition, int] = {}
        self._acc: dict[TopicPartition, _Accumulator] = {}
        self._busy: dict[TopicPartition, int] = {}  # requests in flight per partition
        self._rr = itertools.count()
        self._inflight = _Slots(max_inflight)
        self._due: list[TopicPartition] = []  # linger_ms=0: sealed at the end of this turn
        self._due_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = (
            None  # asyncio.get_running_loop() is a getpid()
        )
        self._sending = 0  # first attempts in flight (answered by a callback, no task)
        self._sent: asyncio.Future[None] | None = None  # resolved when _sending drops to 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._counts: dict[str, int] = {}
        # records for topics whose partition count is being looked up, in send order
        self._waiting: dict[
            str, list[tuple[records.RecordInput, asyncio.Future[RecordMetadata]]]
        ] = {}
        self._renewing = asyncio.Lock()
        # partitions whose sequence has a hole (a batch failed for good with later ones in
        # flight), per producer id: their out_of_order_sequence answers mean "renew"
        self._gaps: dict[int, set[TopicPartition]] = {}

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    async def start(self) -> None:
        if self.idempotent:
            resp = await self.client.request(p.InitProducer(id=0))
            assert isinstance(resp, p.ProducerId)
            self.producer_id = resp.producer_id

    async def _partitions(self, topic: str) -> int:
        n = self._counts.get(topic)
        if n is None:
            n = await self.client.partition_count(topic, auto_create=True)
            if n is None:
                raise BrokerError(errors.UnknownTopic.code, f"unknown topic {topic!r}")
            self._counts[topic] = n
        return n

    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        partition: int | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> RecordMetadata:
        """Queue one record and wait for its acknowledgement. With ``linger_ms=0``, a
        record for a partition with nothing queued and nothing in flight leaves at once
        (see the class)."""
        return await self._submit(topic, value, key, partition, headers, timestamp_ms, True)

    def send_nowait(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        partition: int | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> asyncio.Future[RecordMetadata]:
        """Queue one record and return the future of its acknowledgement; never waits. A
        record for a topic whose partition count is not known yet waits (in order, with the
        topic's later records) for one metadata request."""
        return self._submit(topic, value, key, partition, headers, timestamp_ms, False)

    def _submit(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        partition: int | None,
        headers: Sequence[tuple[str, bytes]] | None,
        timestamp_ms: int | None,
        awaited: bool,
    ) -> asyncio.Future[RecordMetadata]:
        """:meth:`send_nowait`; ``awaited``: the caller waits for this record before it
        queues another (:meth:`send`), so a lone record need not wait for company."""
        ts = timestamp_ms if timestamp_ms is not None else time.time_ns() // 1_000_000
        loop = self._loop
        if loop is None:
            loop = self.loop
        fut: asyncio.Future[RecordMetadata] = loop.create_future()
        row: records.RecordInput = (ts, key, value, list(headers)) if headers else (ts, key, value)
        if partition is None:
            n = self._counts.get(topic)
            waiting = self._waiting.get(topic)
            if n is None or waiting is not None:
                if waiting is None:
                    waiting = self._waiting[topic] = []
                    task = self.loop.create_task(self._learn_partitions(topic))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                waiting.append((row, fut))
                return fut
            partition = p.partition_for_key(key, n) if key is not None else next(self._rr) % n
        self._queue(topic, partition, row, fut, awaited)
        return fut

    async def _learn_partitions(self, topic: str) -> None:
        """Find ``topic``'s partition count, then queue the records that waited for it."""
        try:
            n = await self._partitions(topic)
        except BaseException as exc:
            for _row, fut in self._waiting.pop(topic, []):
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else ConnectionLost())
            if not isinstance(exc, Exception):
                raise
            return
        for row, fut in self._waiting.pop(topic, []):
            key = row[1]
            partition = p.partition_for_key(key, n) if key is not None else next(self._rr) % n
            self._queue(topic, partition, row, fut)

    def _queue(
        self,
        topic: str,
        partition: int,
        row: records.RecordInput,
        fut: asyncio.Future[RecordMetadata],
        awaited: bool = False,
    ) -> None:
        ts, key, value = row[0], row[1], row[2]
        tp = (topic, partition)
        acc = self._acc.get(tp)
        if acc is None:
            if awaited and tp not in self._busy and not self.linger_ms > 0:
                # nothing queued or in flight for tp, so nothing to keep order with, and no
                # company to wait for: the end of the turn would only cost a loop turn
                rows: list[records.RecordInput] = [
                    (0, key, value, row[3]) if len(row) == 4 else (0, key, value)
                ]
                self._dispatch(tp, rows, [fut], ts, ts, True)
                return
            acc = self._acc[tp] = _Accumulator(topic, partition, first_ts=ts)
            if self.linger_ms > 0:
                acc.timer = self.loop.call_later(self.linger_ms / 1000, self._linger_expired, tp)
            elif self._busy.get(tp, 0) < self.partition_inflight:
                self._due.append(tp)
                if not self._due_scheduled:
                    self._due_scheduled = True
                    self.loop.call_soon(self._send_due)
            else:  # sealed when one of the partition's requests in flight is answered
                acc.waiting = True
        delta = ts - acc.first_ts
        if len(row) == 4:
            acc.rows.append((delta, key, value, row[3]))
        else:
            acc.rows.append((delta, key, value))
        acc.futures.append(fut)
        acc.size += len(value) + (len(key) if key else 0) + 8
        if acc.size >= self.batch_bytes:
            self._seal(tp)

    def _linger_expired(self, tp: TopicPartition) -> None:
        if tp in self._acc:
            self._seal(tp)
            self.client.flush()

    def _send_due(self) -> None:
        """linger_ms=0, at the end of the turn the records were queued in: every partition's
        records leave, in one write."""
        self._due_scheduled = False
        due, self._due = self._due, []
        for tp in due:
            if tp in self._acc:
                self._seal(tp)
        self.client.flush()

    def _seal(self, tp: TopicPartition) -> None:
        acc = self._acc.pop(tp)
        if acc.timer is not None:
            acc.timer.cancel()
        self._dispatch(tp, acc.rows, acc.futures, acc.first_ts, None, False)

    def _dispatch(
        self,
        tp: TopicPartition,
        rows: list[records.RecordInput],
        futures: list[asyncio.Future[RecordMetadata]],
        first_ts: int,
        max_ts: int | None,
        now: bool,
    ) -> None:
        """Encode ``rows`` as the next batch of ``tp`` and send it: now if ``now``, else at
        the next flush of the client (the end of the turn at the latest); through a task
        when no in-flight slot is free or the client is not connected."""
        batch = self._encode(tp, rows, first_ts, max_ts)
        self._busy[tp] = self._busy.get(tp, 0) + 1
        if self._inflight.take():
            try:  # not connected: send_callback raises before anything is sent
                self._send_first(tp, batch, futures, rows, first_ts, now)
                return
            except ConnectionLost:
                self._inflight.release()
        task = self.loop.create_task(self._send_batch(tp, batch, futures, rows, first_ts))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send_first(
        self,
        tp: TopicPartition,
        batch: bytes,
        futures: list[asyncio.Future[RecordMetadata]],
        rows: list[records.RecordInput],
        first_ts: int,
        now: bool = False,
    ) -> None:
        """The first attempt of a sealed batch, holding an in-flight slot already: queued
        on the connection (written now if ``now``) and answered by a callback, with no
        task. Any failure hands the batch to :meth:`_send_batch`, which decides as for a
        failure of its own first attempt (retry the same bytes, renew the producer id, or
        fail the records)."""
        pid = self.producer_id
        msg = p.Produce(
            id=0, topic=tp[0], partition=tp[1], key=None, batches=[batch], acks=self.acks
        )

        def answered(reply: p.Response | BrokerError) -> None:
            self._inflight.release()
            try:
                if type(reply) is p.Produced:
                    self._answered(tp)
                    topic, partition, base = tp[0], reply.partition, reply.base_offset
                    for f in futures:
                        if not f.done():
                            f.set_result(RecordMetadata(topic, partition, base))
                        base += 1
                else:
                    failed(reply)
            finally:
                # after the records' futures: their callbacks run before flush() returns
                self._sending -= 1
                if not self._sending and self._sent is not None:
                    if not self._sent.done():
                        self._sent.set_result(None)
                    self._sent = None

        def failed(reply: p.Response | BrokerError) -> None:
            if isinstance(reply, p.Error):
                exc = BrokerError(reply.code, reply.message, reply.retriable)
            elif isinstance(reply, BrokerError):
                exc = reply
            else:
                exc = BrokerError(errors.InvalidRequest.code, f"unexpected reply {reply!r}")
            task = self.loop.create_task(
                self._send_batch(tp, batch, futures, rows, first_ts, pid=pid, first_failure=exc)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._sending += 1
        try:
            self.client.send_callback(msg, answered, flush=now)
        except BaseException:
            self._sending -= 1
            raise

    def _answered(self, tp: TopicPartition, *, send_next: bool = True) -> None:
        left = self._busy[tp] - 1
        if left:
            self._busy[tp] = left
        else:
            del self._busy[tp]
        acc = self._acc.get(tp)
        if send_next and acc is not None and acc.waiting:  # linger_ms=0: it waited
            self._seal(tp)

    def _encode(
        self,
        tp: TopicPartition,
        rows: list[records.RecordInput],
        first_ts: int,
        max_ts: int | None = None,
    ) -> bytes:
        """The next batch of ``tp`` (sequenced when idempotent); ``max_ts`` when the caller
        knows it, else found from the rows' deltas."""
        seq = self._sequences.get(tp, 0) if self.idempotent else records.NO_SEQUENCE
        if max_ts is None:
            max_ts = first_ts + max([r[0] for r in rows])
        batch = records.encode_batch(
            rows,
            first_timestamp=first_ts,
            max_timestamp=max_ts,
            producer_id=self.producer_id,
            base_sequence=seq,
        )
        if self.idempotent:  # only once encoded: a record that cannot be leaves no hole
            self._sequences[tp] = seq + len(rows)
        return batch

    async def _send_batch(
        self,
        tp: TopicPartition,
        batch: bytes,
        futures: list[asyncio.Future[RecordMetadata]],
        rows: list[records.RecordInput],
        first_ts: int,
        *,
        pid: int | None = None,
        first_failure: BrokerError | None = None,
    ) -> None:
        try:
            produced = await self._produce_renewing(
                tp, batch, rows, first_ts, pid=pid, first_failure=first_failure
            )
        except BaseException as exc:
            self._answered(tp, send_next=isinstance(exc, Exception))
            for f in futures:
                if not f.done():
                    f.set_exception(exc if isinstance(exc, Exception) else ConnectionLost())
            if not isinstance(exc, Exception):
                raise
            return
        self._answered(tp)
        for i, f in enumerate(futures):
            if not f.done():
                f.set_result(RecordMetadata(tp[0], produced.partition, produced.base_offset + i))

    async def _produce_renewing(
        self,
        tp: TopicPartition,
        batch: bytes,
        rows: list[records.RecordInput],
        first_ts: int,
        *,
        pid: int | None = None,
        first_failure: BrokerError | None = None,
    ) -> p.Produced:
        """Produce ``batch`` (encoded under producer id ``pid``, by default the current
        one), keeping the idempotent sequence of ``tp`` whole (``first_failure`` is how a
        first attempt made without a task, :meth:`_send_first`, failed: it counts as the
        first of the attempts):

        - if the node no longer knows this producer's id (it expired after the node's
          producer-id expiration, idle), get a new id and send the records again under it,
          from sequence 0 (as Kafka's producer resets on UNKNOWN_PRODUCER_ID);
        - if the batch finally fails, the producer must not be stuck (issue 12 item 7): after
          ``storage_full`` (the node took the append back whole) the next batch of ``tp``
          reuses its sequence numbers when none was encoded after it; after any other
          failure the batch may or may not be stored, so its numbers are never reused:
          the next batch of ``tp`` that the node answers ``out_of_order_sequence`` (a hole
          where the failed batch was not stored) is sent again under a new id (KIP-360's
          idea)."""
        if pid is None:
            pid = self.producer_id
        try:
            if first_failure is None:
                return await self._produce_with_retries(tp[0], tp[1], batch)
            if not first_failure.retriable or self.retries == 0:  # as _produce_with_retries
                raise first_failure
            return await self._produce_with_retries(tp[0], tp[1], batch, first_attempt=1)
        except BrokerError as exc:
            if not self.idempotent:
                raise
            gap = exc.code == errors.OutOfOrderSequence.code and tp in self._gaps.get(pid, ())
            if exc.code != errors.UnknownProducerId.code and not gap:
                self._failed(tp, pid, batch, rolled_back=exc.code == errors.StorageFull.code)
                raise
        except ConnectionLost:
            if self.idempotent:
                self._failed(tp, pid, batch, rolled_back=False)
            raise
        await self._renew_producer_id(pid)
        return await self._produce_with_retries(tp[0], tp[1], self._encode(tp, rows, first_ts))

    def _failed(self, tp: TopicPartition, pid: int, batch: bytes, *, rolled_back: bool) -> None:
        """``batch`` of ``tp`` failed for good under ``pid``. If the node took it back and
        it was the last batch encoded, its sequence numbers are given back; otherwise the
        hole it may leave is remembered, so that an ``out_of_order_sequence`` after it
        renews the producer id instead of failing every later batch."""
        if pid != self.producer_id:
            return  # renewed meanwhile: the old id's sequences no longer matter
        header = records.parse_header(batch)
        last = self._sequences.get(tp) == header.base_sequence + header.record_count
        if rolled_back and last:
            self._sequences[tp] = header.base_sequence
        else:
            self._gaps.setdefault(pid, set()).add(tp)

    async def _renew_producer_id(self, stale: int) -> None:
        async with self._renewing:
            if self.producer_id != stale:
                return  # another batch renewed it already
            resp = await self.client.request(p.InitProducer(id=0))
            assert isinstance(resp, p.ProducerId)
            self.producer_id = resp.producer_id
            self._sequences.clear()
            self._gaps.pop(stale, None)

    async def _produce_with_retries(
        self,
        topic: str,
        partition: int | None,
        batch: bytes,
        key: bytes | None = None,
        *,
        first_attempt: int = 0,
    ) -> p.Produced:
        """Send until acknowledged: attempts ``first_attempt`` to ``retries`` (0 is the
        first try; a later one first sleeps the backoff, doubling from ``retry_backoff_ms``
        up to 2 s)."""
        await self._inflight.acquire()
        try:
            for attempt in range(first_attempt, self.retries + 1):
                if attempt:
                    await asyncio.sleep(min(self.retry_backoff_ms / 1000 * 2 ** (attempt - 1), 2.0))
                try:
                    await self.client._ensure_connected()
                    resp = await self.client._request_now(
                        p.Produce(
                            id=0,
                            topic=topic,
                            partition=partition,
                            key=key,
                            batches=[batch],
                            acks=self.acks,
                        )
                    )
                    assert isinstance(resp, p.Produced)
                    return resp
                except (ConnectionLost, ConnectionError, OSError, TimeoutError) as exc:
                    if attempt == self.retries:
                        raise ConnectionLost(str(exc)) from exc
                except BrokerError as exc:
                    if not exc.retriable or attempt == self.retries:
                        raise
        finally:
            self._inflight.release()
        raise AssertionError("unreachable")

    async def send_batch(
        self,
        topic: str,
        values: Sequence[bytes],
        *,
        key: bytes | None = None,
        partition: int | None = None,
        keys: Sequence[bytes | None] | None = None,
    ) -> BatchMetadata:
        """Send ``values`` as one batch now (no accumulation) and wait for the ack. With
        ``partition`` None the node chooses: by ``key``, else round robin. ``keys`` gives
        each record its own key (``partition`` must then be given). Fast path for callers
        that batch themselves (the benchmark, the notification engines)."""
        ts = time.time_ns() // 1_000_000
        if keys is not None:
            if partition is None or len(keys) != len(values):
                raise ValueError("keys needs a partition and one key per value")
            rows: list[records.RecordInput] = [(0, k, v) for k, v in zip(keys, values, strict=True)]
        else:
            rows = [(0, key, v) for v in values]
        if self.idempotent and partition is None:
            n = await self._partitions(topic)
            partition = p.partition_for_key(key, n) if key is not None else next(self._rr) % n
        batch = self._encode_direct(topic, partition, rows, ts)
        if self.idempotent:
            assert partition is not None
            r = await self._produce_renewing((topic, partition), batch, rows, ts)
        else:
            r = await self._produce_with_retries(topic, partition, batch, key)
        return _batch_metadata(r)

    def _encode_direct(
        self, topic: str, partition: int | None, rows: list[records.RecordInput], ts: int
    ) -> bytes:
        """A batch sent as it is (:meth:`send_batch`, :meth:`send_batches`): sequenced when
        the producer is idempotent (``partition`` is then known), else plain."""
        if self.idempotent:
            assert partition is not None
            return self._encode((topic, partition), rows, ts)
        return records.encode_batch(rows, first_timestamp=ts, max_timestamp=ts)

    def send_batches(
        self, batches: Sequence[tuple[str, int, Sequence[bytes | None] | None, Sequence[bytes]]]
    ) -> asyncio.Future[list[BatchMetadata]]:
        """Send each ``(topic, partition, keys, values)`` as one batch now (``keys`` None:
        keyless records), and return one future of all their acknowledgements, in order.
        :meth:`send_batch` for several partitions at once, without a task per batch: each
        first attempt is answered by a callback (in process, from the turn that makes the
        append durable), and the future resolves when the last one is in, so the caller
        wakes once. A batch whose first attempt fails, or that finds no free in-flight
        slot, goes on as :meth:`send_batch` would (retries, a new producer id) in a task;
        the future fails with the first batch that fails for good."""
        out: asyncio.Future[list[BatchMetadata]] = self.loop.create_future()
        if not batches:
            out.set_result([])
            return out
        results: list[BatchMetadata | None] = [None] * len(batches)
        left = len(batches)

        def finish(i: int, result: BatchMetadata | BaseException) -> None:
            nonlocal left
            if out.done():
                return
            if isinstance(result, BaseException):
                out.set_exception(result)
                return
            results[i] = result
            left -= 1
            if not left:
                out.set_result([r for r in results if r is not None])

        ts = time.time_ns() // 1_000_000
        for i, (topic, partition, keys, values) in enumerate(batches):
            if keys is not None and len(keys) != len(values):
                raise ValueError("keys needs one key per value")
            ks = keys if keys is not None else [None] * len(values)
            rows: list[records.RecordInput] = [(0, k, v) for k, v in zip(ks, values, strict=True)]
            batch = self._encode_direct(topic, partition, rows, ts)
            self._send_batch_now((topic, partition), batch, rows, ts, partial(finish, i))
        return out

    def _send_batch_now(
        self,
        tp: TopicPartition,
        batch: bytes,
        rows: list[records.RecordInput],
        ts: int,
        finish: Callable[[BatchMetadata | BaseException], None],
    ) -> None:
        """One batch of :meth:`send_batches`: its first attempt now if an in-flight slot is
        free and the client is connected, answered through ``finish``; otherwise, and
        after a failed first attempt, the rest of :meth:`send_batch`'s way in a task."""
        pid = self.producer_id

        def later(first_failure: BrokerError | None) -> None:
            async def attempts() -> p.Produced:
                if self.idempotent:
                    return await self._produce_renewing(
                        tp, batch, rows, ts, pid=pid, first_failure=first_failure
                    )
                if first_failure is None:
                    return await self._produce_with_retries(tp[0], tp[1], batch)
                if not first_failure.retriable or self.retries == 0:
                    raise first_failure
                return await self._produce_with_retries(tp[0], tp[1], batch, first_attempt=1)

            task = self.loop.create_task(attempts())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

            def done(t: asyncio.Task[p.Produced]) -> None:
                if t.cancelled():
                    finish(ConnectionLost("send cancelled"))
                elif (exc := t.exception()) is not None:
                    finish(exc)
                else:
                    finish(_batch_metadata(t.result()))

            task.add_done_callback(done)

        if not self.client.connected or not self._inflight.take():
            later(None)
            return
        msg = p.Produce(
            id=0, topic=tp[0], partition=tp[1], key=None, batches=[batch], acks=self.acks
        )

        def answered(reply: p.Response | BrokerError) -> None:
            self._inflight.release()
            if isinstance(reply, p.Produced):
                finish(_batch_metadata(reply))
            elif isinstance(reply, p.Error):
                later(BrokerError(reply.code, reply.message, reply.retriable))
            elif isinstance(reply, BrokerError):
                later(reply)
            else:
                later(BrokerError(errors.InvalidRequest.code, f"unexpected reply {reply!r}"))

        try:
            self.client.send_callback(msg, answered)
        except ConnectionLost as exc:
            self._inflight.release()
            later(exc)

    async def flush(self) -> None:
        """Send everything queued and wait for every acknowledgement."""
        while self._acc or self._tasks or self._waiting or self._sending:
            for tp in list(self._acc):
                self._seal(tp)
            self.client.flush()
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            elif self._sending:
                if self._sent is None:
                    self._sent = self.loop.create_future()
                await self._sent
            elif self._waiting:
                await asyncio.sleep(0)

    async def close(self) -> None:
        await self.flush()


# -------------------------------------------------------------------------- consumer
class ConsumerRecord(msgspec.Struct, frozen=True, gc=False):
    """One consumed record. A msgspec struct: building one costs a fraction of a frozen
    dataclass, which matters at a million records a second."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


AssignCallback = Callable[[list[TopicPartition]], Awaitable[None] | None]


class Consumer:
    """A consumer of ``topics``: a member of ``group`` (the node assigns its partitions and
    moves them cooperatively), or, with ``group=None``, of every partition of the topics
    with positions from ``auto_offset_reset`` or :meth:`seek`.

    ``getmany`` returns records in offset order per partition. With ``auto_commit`` the
    positions of records returned by the previous ``getmany`` are committed at the start of
    the next one, every ``auto_commit_interval_ms`` (0: at every call), on revocation and on
    close: a record is committed only after the application had it, so delivery is at least
    once. The commit made by ``getmany`` goes out with its fetch and is not awaited (a
    failed one is logged and made again by the next call); those on revocation and close,
    and :meth:`commit`, are awaited.
    """

    def __init__(
        self,
        client: Client,
        topics: list[str],
        *,
        group: str | None = None,
        auto_commit: bool = True,
        auto_commit_interval_ms: int = 1000,
        auto_offset_reset: Literal["earliest", "latest"] = "earliest",
        session_timeout_ms: int | None = None,
        assignor: Literal["range", "sticky"] | None = None,
        on_assign: AssignCallback | None = None,
        on_revoke: AssignCallback | None = None,
        max_partition_bytes: int = 1024 * 1024,
        max_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.client = client
        self.topics = topics
        self.group = group
        self.auto_commit = auto_commit and group is not None
        self.auto_commit_interval_ms = auto_commit_interval_ms
        self.auto_offset_reset = auto_offset_reset
        self.session_timeout_ms = session_timeout_ms
        self.assignor = assignor
        self.on_assign = on_assign
        self.on_revoke = on_revoke
        self.max_partition_bytes = max_partition_bytes
        self.max_bytes = max_bytes
        self.member_id: str | None = None
        self.generation = -1
        self.assignment: list[TopicPartition] = []
        # the next offset the application gets, per partition (what a commit stores); a fetch
        # starts there, as it happens only once what getmany buffered is all returned
        self.positions: dict[TopicPartition, int] = {}
        self._buffer: deque[ConsumerRecord] = deque()
        # the buffer as runs of one partition's records, in its order: [partition, records,
        # the offset after the run's last], so getmany moves positions once per run
        self._runs: deque[list[Any]] = deque()
        self._committed: dict[TopicPartition, int] = {}
        self._heartbeat_interval = 1.0
        self._hb_task: asyncio.Task[None] | None = None
        self._assignment_changed = asyncio.Event()
        self._last_commit = time.monotonic()
        self._commit_in_flight = False  # an auto commit awaits its reply
        self._rebalancing = False
        self._closed = False
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        if self.group is None:
            parts: list[TopicPartition] = []
            for t in self.topics:
                n = await self.client.partition_count(t)
                if n is None:
                    raise BrokerError(errors.UnknownTopic.code, f"unknown topic {t!r}")
                parts.extend((t, i) for i in range(n))
            await self._apply_assignment(parts)
            return
        await self._join()
        self._hb_task = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    async def _join(self) -> None:
        assert self.group is not None
        resp = await self.client.request(
            p.JoinGroup(
                id=0,
                group=self.group,
                topics=self.topics,
                member_id=None,
                session_timeout_ms=self.session_timeout_ms,
                assignor=self.assignor,
                client_id=self.client.client_id,
            )
        )
        assert isinstance(resp, p.Joined)
        self.member_id = resp.member_id
        self.generation = resp.generation
        self._heartbeat_interval = resp.heartbeat_interval_ms / 1000
        await self._apply_assignment([tuple(tp) for tp in resp.assignment])  # type: ignore[misc]

    async def _heartbeat_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(0.05 if self._rebalancing else self._heartbeat_interval)
            if self._closed:
                return
            try:
                await self.heartbeat()
            except BrokerError as exc:
                if exc.code == errors.UnknownMember.code:
                    log.warning("event=consumer_rejoin group=%s reason=%s", self.group, exc.code)
                    await self._revoke(list(self.assignment), commit=False)
                    await self._join()
                elif not exc.retriable:
                    log.error("event=heartbeat_failed group=%s error=%s", self.group, exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the member alive through transient trouble
                log.warning("event=heartbeat_error group=%s error=%r", self.group, exc)

    async def heartbeat(self) -> None:
        assert self.group is not None and self.member_id is not None
        resp = await self.client.request(
            p.Heartbeat(
                id=0,
                group=self.group,
                member_id=self.member_id,
                generation=self.generation,
                owned=list(self.assignment),
            ),
            retries=1,
        )
        assert isinstance(resp, p.HeartbeatResult)
        self.generation = resp.generation
        self._rebalancing = resp.rebalancing
        await self._apply_assignment([tuple(tp) for tp in resp.assignment])  # type: ignore[misc]

    async def _apply_assignment(self, new: list[TopicPartition]) -> None:
        async with self._lock:
            old = set(self.assignment)
            new_set = set(new)
            revoked = [tp for tp in self.assignment if tp not in new_set]
            added = [tp for tp in new if tp not in old]
            if revoked:
                await self._revoke(revoked, commit=True)
            if added:
                await self._init_positions(added)
                self.assignment = self.assignment + added
                await self._call(self.on_assign, added)
            if revoked or added:
                self._assignment_changed.set()

    async def _revoke(self, tps: list[TopicPartition], *, commit: bool) -> None:
        if not tps:
            return
        if commit and self.auto_commit:
            with contextlib.suppress(BrokerError):
                await self.commit({tp: self.positions[tp] for tp in tps if tp in self.positions})
        await self._call(self.on_revoke, tps)
        gone = set(tps)
        self.assignment = [tp for tp in self.assignment if tp not in gone]
        self._drop_buffered(gone)
        for tp in tps:
            self.positions.pop(tp, None)

    @staticmethod
    async def _call(cb: AssignCallback | None, tps: list[TopicPartition]) -> None:
        if cb is not None:
            result = cb(list(tps))
            if asyncio.iscoroutine(result):
                await result

    async def _init_positions(self, tps: list[TopicPartition]) -> None:
        committed: dict[TopicPartition, int] = {}
        if self.group is not None:
            resp = await self.client.request(p.FetchOffsets(id=0, group=self.group, partitions=tps))
            assert isinstance(resp, p.OffsetsFetched)
            committed = {(o.topic, o.partition): o.offset for o in resp.offsets if o.offset >= 0}
        for tp in tps:
            if tp in committed:
                self.positions[tp] = committed[tp]
                self._committed[tp] = committed[tp]
            else:
                self.positions[tp] = await self.client.list_offsets(
                    tp[0], tp[1], self.auto_offset_reset
                )

    async def assign(self, partitions: Sequence[TopicPartition]) -> None:
        """Consume exactly ``partitions`` (no group): positions start from
        ``auto_offset_reset`` unless :meth:`seek` sets them."""
        if self.group is not None:
            raise BrokerError(
                errors.InvalidRequest.code, "a group member's partitions are assigned"
            )
        await self._apply_assignment(list(partitions))

    def seek(self, topic: str, partition: int, offset: int) -> None:
        """Consume ``topic/partition`` from ``offset`` on (records already buffered for it
        are dropped). Also the way past a damaged batch (:class:`CorruptData`): seek to its
        ``end_offset``."""
        tp = (topic, partition)
        self.positions[tp] = offset
        self._drop_buffered({tp})

    def _drop_buffered(self, tps: set[TopicPartition]) -> None:
        if self._buffer:
            self._buffer = deque(r for r in self._buffer if (r.topic, r.partition) not in tps)
            self._runs = deque(run for run in self._runs if run[0] not in tps)

    async def getmany(
        self, timeout_ms: int = 1000, max_records: int | None = None
    ) -> list[ConsumerRecord]:
        """Records from the assigned partitions, in offset order per partition, waiting up
        to ``timeout_ms`` for some. With ``max_records``, at most that many: the rest of
        what was fetched is kept for the next call (no fetch is wasted). A position moves
        only past records returned, so a commit never covers a record the application did
        not get."""
        if (
            self.auto_commit
            and time.monotonic() - self._last_commit >= self.auto_commit_interval_ms / 1000
        ):
            self._auto_commit()
        if not self._buffer:
            self._decode(await self._fetch_data(timeout_ms))
        buffer, runs, positions = self._buffer, self._runs, self.positions
        if max_records is None or len(buffer) <= max_records:
            out = list(buffer)
            buffer.clear()
            for tp, _count, end in runs:
                positions[tp] = end
            runs.clear()
            return out
        out = [buffer.popleft() for _ in range(max_records)]
        left = max_records
        while left:
            run = runs[0]
            if run[1] <= left:
                positions[run[0]] = run[2]
                left -= run[1]
                runs.popleft()
            else:  # the records taken from this run end the list
                run[1] -= left
                positions[run[0]] = out[-1].offset + 1
                left = 0
        return out

    def _decode(self, fetched: list[tuple[str, int, bytes, int]]) -> None:
        buffer = self._buffer
        append = buffer.append
        verify = not self.client.fetches_verified
        for topic, partition, data, start in fetched:
            held = len(buffer)
            try:
                self._decode_partition(topic, partition, data, start, append, verify)
            finally:  # records decoded before a damaged batch are kept, and so is their run
                if len(buffer) > held:
                    run = [(topic, partition), len(buffer) - held, buffer[-1].offset + 1]
                    self._runs.append(run)

    @staticmethod
    def _decode_partition(
        topic: str,
        partition: int,
        data: bytes,
        start: int,
        append: Callable[[ConsumerRecord], None],
        verify: bool,
    ) -> None:
        record = ConsumerRecord
        view = memoryview(data)
        for _pos, header in records.iter_batches(view, verify=verify):
            recs = records.decode_records(view[_pos : _pos + header.batch_length], header)
            base, ts0 = header.base_offset, header.first_timestamp
            skip = max(0, start - base)
            for off, r in enumerate(recs[skip:] if skip else recs, base + skip):
                append(
                    record(
                        topic,
                        partition,
                        off,
                        ts0 + r.timestamp_delta,
                        r.key,
                        r.value,
                        r.headers,
                    )
                )

    async def fetch_batches(self, timeout_ms: int = 1000) -> list[tuple[str, int, bytes, int]]:
        """Raw record batches (``topic, partition, bytes, first wanted offset``) from the
        assigned partitions, advancing positions past them. For callers that decode
        themselves; do not mix with :meth:`getmany`."""
        out = []
        for topic, partition, data, start in await self._fetch_data(timeout_ms):
            nxt = start
            for _pos, header in records.iter_batches(data, verify=False):
                nxt = header.next_offset
            if nxt > start:  # some data past the position
                self.positions[(topic, partition)] = nxt
                out.append((topic, partition, data, start))
        return out

    async def _fetch_data(self, timeout_ms: int) -> list[tuple[str, int, bytes, int]]:
        """One fetch from the positions of the assigned partitions: ``(topic, partition,
        bytes, first wanted offset)`` per partition that answered records, not walked yet
        (:meth:`_decode` walks them once, checking them as it goes). Positions do not move
        here, except past an out-of-range position (``auto_offset_reset``)."""
        if not self.assignment:
            self._assignment_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._assignment_changed.wait(), timeout_ms / 1000)
            if not self.assignment:
                return []
        wanted = [
            (t, i, self.positions[(t, i)]) for t, i in self.assignment if (t, i) in self.positions
        ]
        results = await self.client.fetch(
            wanted,
            max_wait_ms=timeout_ms,
            max_bytes=self.max_bytes,
            partition_max_bytes=self.max_partition_bytes,
        )
        out = []
        for res in results:
            tp = (res.topic, res.partition)
            if tp not in self.positions:
                continue  # revoked while the fetch was in flight
            start = self.positions[tp]
            if res.error == errors.OffsetOutOfRange.code:
                reset = (
                    res.log_start_offset
                    if self.auto_offset_reset == "earliest"
                    else res.high_watermark
                )
                log.warning(
                    "event=offset_reset topic=%s partition=%d from=%d to=%d",
                    res.topic,
                    res.partition,
                    start,
                    reset,
                )
                self.positions[tp] = reset
                continue
            if res.error == errors.CorruptData.code:
                # stop here, loudly: nothing past a damaged batch is skipped silently
                raise CorruptData(res.topic, res.partition, start, res.resume_offset)
            if res.error is not None or not res.records:
                continue
            out.append((res.topic, res.partition, res.records, start))
        return out

    async def committed(
        self, partitions: Sequence[TopicPartition] | None = None
    ) -> dict[TopicPartition, int]:
        """The group's committed offsets (the next offset to consume) for ``partitions``
        (default: the assigned ones), as stored by the node; a partition without a commit is
        absent."""
        if self.group is None:
            raise BrokerError(
                errors.InvalidRequest.code, "a consumer without a group commits nothing"
            )
        tps = list(self.assignment if partitions is None else partitions)
        resp = await self.client.request(p.FetchOffsets(id=0, group=self.group, partitions=tps))
        assert isinstance(resp, p.OffsetsFetched)
        return {(o.topic, o.partition): o.offset for o in resp.offsets if o.offset >= 0}

    def _auto_commit(self) -> None:
        """Commit the positions that moved, pipelined with the fetch that follows instead of
        awaited before it (as Redis's consumer sends XACK with its next XREADGROUP): an
        auto commit no longer holds up the next records by a round trip and a state-store
        sync. One at a time; a failed one is logged and retried by the next ``getmany``
        (the positions still differ from what is known committed)."""
        self._last_commit = time.monotonic()
        if self._commit_in_flight:
            return  # the next getmany commits what moves meanwhile
        offsets = {tp: off for tp, off in self.positions.items() if self._committed.get(tp) != off}
        if not offsets:
            return
        assert self.group is not None

        def answered(reply: p.Response | BrokerError) -> None:
            self._commit_in_flight = False
            if isinstance(reply, p.Committed):
                self._committed.update(offsets)
            else:
                log.warning("event=auto_commit_failed group=%s reply=%r", self.group, reply)

        self._commit_in_flight = True
        try:
            self.client.send_callback(
                p.CommitOffsets(
                    id=0,
                    group=self.group,
                    member_id=self.member_id,
                    generation=self.generation,
                    offsets=[(t, i, o) for (t, i), o in offsets.items()],
                ),
                answered,
            )
        except ConnectionLost:
            self._commit_in_flight = False  # the fetch reconnects; the next call commits

    async def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        """Commit ``offsets`` (next offset to read, per partition), default: the current
        positions of every assigned partition that moved since the last commit."""
        if self.group is None:
            raise BrokerError(
                errors.InvalidRequest.code, "a consumer without a group cannot commit"
            )
        if offsets is None:
            offsets = {
                tp: off for tp, off in self.positions.items() if self._committed.get(tp) != off
            }
        self._last_commit = time.monotonic()
        if not offsets:
            return
        await self.client.request(
            p.CommitOffsets(
                id=0,
                group=self.group,
                member_id=self.member_id,
                generation=self.generation,
                offsets=[(t, i, o) for (t, i), o in offsets.items()],
            )
        )
        self._committed.update(offsets)

    async def close(self) -> None:
        """Commit (with auto commit), leave the group and stop heartbeating."""
        if self._closed:
            return
        if self.auto_commit:
            with contextlib.suppress(BrokerError):
                await self.commit()
        self._closed = True
        if self._hb_task is not None:
            self._hb_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._hb_task
        if self.group is not None and self.member_id is not None:
            with contextlib.suppress(BrokerError):
                await self.client.request(
                    p.LeaveGroup(id=0, group=self.group, member_id=self.member_id), retries=0
                )

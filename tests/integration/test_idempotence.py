"""An idempotent producer that retries a batch whose reply it never saw gets the original
offsets back, and the log holds the batch once: over raw sockets with identical bytes, across
a crash of the node, and through the :class:`Producer` class with a reply dropped in flight."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time

from broker import errors
from broker import protocol as p
from broker.client import Client
from storage import records

from .herald_process import HeraldProcess
from .raw_wire import RawConnection

TOPIC = "payments"
_LEN = struct.Struct(">I")


def values_in(conn: RawConnection, topic: str, partition: int = 0) -> list[tuple[int, bytes]]:
    """Every (offset, value) of a partition, read from offset 0."""
    out: list[tuple[int, bytes]] = []
    offset = 0
    while True:
        resp = conn.request(
            p.Fetch(id=99, partitions=[p.FetchPartition(topic, partition, offset)], max_wait_ms=0)
        )
        assert isinstance(resp, p.Fetched), resp
        (res,) = resp.partitions
        assert res.error is None, res
        if not res.records:
            return out
        for pos, h in records.iter_batches(res.records):
            recs = records.decode_records(res.records[pos : pos + h.batch_length], h)
            out += [(h.base_offset + i, r.value) for i, r in enumerate(recs)]
            offset = h.next_offset


def wait_high_watermark(conn: RawConnection, topic: str, want: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        resp = conn.request(p.ListOffsets(id=5, topic=topic, partition=0, spec="latest"))
        assert isinstance(resp, p.Offsets), resp
        if resp.offset >= want or time.monotonic() > deadline:
            assert resp.offset == want
            return
        time.sleep(0.02)


def produce_frame(batch: bytes, rid: int = 1) -> bytes:
    return p.encode_message(p.Produce(id=rid, topic=TOPIC, partition=0, batches=[batch]))


def idempotent_batch(pid: int, seq: int, values: list[bytes]) -> bytes:
    return records.encode_batch(
        [(0, b"acct-1", v) for v in values],
        first_timestamp=1_700_000_000_000,
        producer_id=pid,
        base_sequence=seq,
    )


def setup_producer(node: HeraldProcess) -> int:
    with RawConnection(node.host, node.tcp_port) as conn:
        assert isinstance(
            conn.request(p.CreateTopic(id=1, topic=TOPIC, partitions=1)), p.TopicCreated
        )
        resp = conn.request(p.InitProducer(id=2))
        assert isinstance(resp, p.ProducerId)
        return resp.producer_id


def test_batch_resent_after_a_dropped_reply_is_appended_once(herald: HeraldProcess) -> None:
    pid = setup_producer(herald)
    values = [b"debit-%d" % i for i in range(5)]
    frame = produce_frame(idempotent_batch(pid, 0, values))

    # the reply is lost: the connection closes before the producer reads it
    first = RawConnection(herald.host, herald.tcp_port)
    first.send_bytes(frame)
    first.close()

    with RawConnection(herald.host, herald.tcp_port) as conn:
        wait_high_watermark(conn, TOPIC, 5)  # the first attempt was appended
        conn.send_bytes(frame)  # the retry: the very same bytes on a fresh connection
        retry = conn.recv()
        assert isinstance(retry, p.Produced), retry
        assert (retry.base_offset, retry.last_offset, retry.duplicate) == (0, 4, True)
        assert values_in(conn, TOPIC) == list(enumerate(values))

        # the producer goes on where it was; a gap in its sequence is refused
        nxt = conn.request(p.Produce(id=3, topic=TOPIC, partition=0, batches=[
            idempotent_batch(pid, 5, [b"debit-5"])
        ]))  # fmt: skip
        assert isinstance(nxt, p.Produced)
        assert (nxt.base_offset, nxt.duplicate) == (5, False)
        gap = conn.request(p.Produce(id=4, topic=TOPIC, partition=0, batches=[
            idempotent_batch(pid, 9, [b"debit-9"])
        ]))  # fmt: skip
        assert isinstance(gap, p.Error)
        assert gap.code == errors.OutOfOrderSequence.code
        assert values_in(conn, TOPIC) == list(enumerate([*values, b"debit-5"]))


def test_retry_pipelined_before_the_first_reply_is_a_duplicate(herald: HeraldProcess) -> None:
    pid = setup_producer(herald)
    batch = idempotent_batch(pid, 0, [b"a", b"b", b"c"])
    with RawConnection(herald.host, herald.tcp_port) as conn:
        conn.send_bytes(produce_frame(batch, rid=10) + produce_frame(batch, rid=11))
        replies = {r.id: r for r in (conn.recv(), conn.recv())}
        first, second = replies[10], replies[11]
        assert isinstance(first, p.Produced) and isinstance(second, p.Produced)
        assert (first.base_offset, first.last_offset, first.duplicate) == (0, 2, False)
        assert (second.base_offset, second.last_offset, second.duplicate) == (0, 2, True)
        assert [v for _o, v in values_in(conn, TOPIC)] == [b"a", b"b", b"c"]


def test_duplicate_is_recognised_after_the_node_crashes_and_restarts(
    herald: HeraldProcess,
) -> None:
    pid = setup_producer(herald)
    frames = [
        produce_frame(idempotent_batch(pid, 2 * i, [b"x%d" % i, b"y%d" % i])) for i in range(3)
    ]
    with RawConnection(herald.host, herald.tcp_port) as conn:
        for frame in frames:
            conn.send_bytes(frame)
            resp = conn.recv()
            assert isinstance(resp, p.Produced) and not resp.duplicate
    herald.restart(crash=True)  # SIGKILL: producer state comes back from checkpoint + log
    with RawConnection(herald.host, herald.tcp_port) as conn:
        conn.send_bytes(frames[-1])
        retry = conn.recv()
        assert isinstance(retry, p.Produced), retry
        assert (retry.base_offset, retry.last_offset, retry.duplicate) == (4, 5, True)
        assert len(values_in(conn, TOPIC)) == 6


class DropFirstProducedReply:
    """A TCP proxy to the node that, once, closes both sides instead of passing on a
    ``Produced`` reply: the request was served but the producer never hears of it."""

    def __init__(self, node: HeraldProcess) -> None:
        self.node = node
        self.drops_left = 1
        self.dropped: list[p.Produced] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.handlers):
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.connections += 1
        handler = asyncio.current_task()
        assert handler is not None
        self.handlers.add(handler)  # close() ends it, so no socket outlives the test
        writers = [cwriter]
        try:
            ureader, uwriter = await asyncio.open_connection(self.node.host, self.node.tcp_port)
            writers.append(uwriter)
            up = asyncio.ensure_future(self._pump_requests(creader, uwriter))
            down = asyncio.ensure_future(self._pump_replies(ureader, cwriter))
            try:
                await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (up, down):
                    task.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
        finally:
            for w in writers:
                w.close()
            for w in writers:
                with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                    await w.wait_closed()
            self.handlers.discard(handler)

    @staticmethod
    async def _pump_requests(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    async def _pump_replies(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                head = await reader.readexactly(4)
                body = await reader.readexactly(_LEN.unpack(head)[0])
            except asyncio.IncompleteReadError:
                return
            resp = p.decode_response(body)
            if isinstance(resp, p.Produced) and self.drops_left:
                self.drops_left -= 1
                self.dropped.append(resp)
                return  # both sides are closed: the reply is lost
            writer.write(head + body)
            await writer.drain()


async def test_producer_retry_after_a_lost_reply_stores_records_once(
    herald: HeraldProcess,
) -> None:
    proxy = DropFirstProducedReply(herald)
    port = await proxy.start()
    try:
        async with await Client.connect(herald.host, port) as client:
            await client.create_topic(TOPIC, 1)
            producer = await client.producer(linger_ms=20, retry_backoff_ms=20)
            futures = [producer.send_nowait(TOPIC, b"rec-%d" % i, partition=0) for i in range(10)]
            await producer.flush()
            acked = [f.result() for f in futures]
            (dropped,) = proxy.dropped
            assert proxy.connections >= 2, "the producer did not reconnect to retry"
            # the retry was answered as a duplicate with the offsets of the lost reply
            assert [m.offset for m in acked] == list(
                range(dropped.base_offset, dropped.last_offset + 1)
            )
            assert [m.offset for m in acked] == list(range(10))

            got = []
            for res in await client.fetch([(TOPIC, 0, 0)]):
                for pos, h in records.iter_batches(res.records):
                    recs = records.decode_records(res.records[pos : pos + h.batch_length], h)
                    got += [(h.base_offset + i, r.value) for i, r in enumerate(recs)]
            assert got == [(i, b"rec-%d" % i) for i in range(10)]
            assert await client.list_offsets(TOPIC, 0) == 10
    finally:
        await proxy.close()

"""Scenario 3, end-to-end latency at fixed offered rates: a paced producer process sends
single 200-byte messages, each carrying ``time.monotonic_ns()`` taken just before the send
call; a consumer process (a group member, acknowledging as in scenario 2) records
``now - sent`` when its read returns. Producer and consumer are two processes (CLOCK_MONOTONIC
is system-wide, so their clocks agree), each on uvloop.

Pacing: every loop turn the producer sends the messages due by now (``rate * elapsed``) and
sleeps until the next is due; uvloop's timers have millisecond resolution, so above 1k msg/s
messages leave in bursts of about ``rate / 1000``. Each rate runs a warm-up (not measured)
then a measured window; a short pause between rates lets any backlog drain.

* Redis: the messages due in a loop turn go out as one pipeline of single ``XADD``s; the
  consumer blocks in ``XREADGROUP BLOCK 500 COUNT 10000``, its ``XACK`` pipelined with the next
  read. Against two servers: ``appendfsync everysec`` ("Redis": replies from memory, AOF
  fsync once a second, off the reply path) and ``appendfsync always`` ("Redis-always": the
  loop fsyncs the AOF before it answers a turn's commands, the consumer's XACKs included).
* NATS: ``js.publish_async`` per message; a durable push consumer (``AckPolicy.ALL``, manual
  acks), acknowledged every 20 ms. Acked once written to the OS, no fsync.
* Herald: ``Producer.send_nowait`` with acks=all and ``linger_ms=0`` (batching by load: the
  records due in a loop turn leave together, and those sent while a request is in flight
  follow its reply, as Redis's pipeline sends what is due each turn); a group consumer
  long-polls with ``getmany(timeout_ms=500)`` and commits after each poll
  (``auto_commit_interval_ms=0``: the positions ``getmany`` returned are committed when it is
  called next, as Redis's consumer acknowledges with its next read; an acknowledged commit is
  synced to disk). A consumer sees a record only after its fdatasync (the high watermark is
  the durable offset), so Herald's figure includes the sync, Redis-everysec's and NATS's do
  not.

Per step the worst latency is kept with the time into the step at which its record was sent
(warm-up included), so a stall can be placed: which repeat, which rate, which second.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bench.scenarios.measure import percentiles
from bench.scenarios.produce import HOST, MESSAGE_BYTES

# send time (monotonic ns), step index (-1 ends the run), measured flag, sequence
_HEAD = struct.Struct("<qhhi")
_PAD = b"\0" * (MESSAGE_BYTES - _HEAD.size)
END = -1
QS = (0.5, 0.99, 0.999)


@dataclass(frozen=True)
class Step:
    rate: int
    warmup: float
    seconds: float


@dataclass
class StepResult:
    rate: int
    sent: int = 0
    achieved_rate: float = 0.0  # sent / (warm-up + measured time)
    max_lag_ms: float = 0.0  # how far the producer fell behind its schedule, at worst
    received: int = 0
    measured: int = 0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    p999_ms: float = float("nan")
    max_ms: float = float("nan")
    max_at_s: float = float("nan")  # when the worst record was sent, seconds into the step
    # the same as a wall-clock time (time.time()), to match it with the server's log lines
    max_at_wall: float = float("nan")
    over_20ms: int = 0  # records measured with more than 20 ms


@dataclass
class RunResult:
    steps: list[StepResult] = field(default_factory=list)
    producer_errors: int = 0
    consumer_timed_out: bool = False


def message(step: int, measured: bool, seq: int) -> bytes:
    return _HEAD.pack(time.monotonic_ns(), step, int(measured), seq) + _PAD


class Recorder:
    """Per-step latencies seen by the consumer; ``done`` once the end marker arrives."""

    def __init__(self, steps: int) -> None:
        self.lat: list[list[float]] = [[] for _ in range(steps)]
        self.received = [0] * steps
        self.worst: list[tuple[float, int]] = [(-1.0, 0)] * steps  # (latency ms, sequence)
        self.worst_sent_ns = [0] * steps  # its send time, time.monotonic_ns()
        self.done = asyncio.Event()

    def record(self, value: bytes, now_ns: int) -> None:
        sent, step, measured, seq = _HEAD.unpack_from(value)
        if step == END:
            self.done.set()
            return
        self.received[step] += 1
        if measured:
            ms = (now_ns - sent) / 1e6
            self.lat[step].append(ms)
            if ms > self.worst[step][0]:
                self.worst[step] = (ms, seq)
                self.worst_sent_ns[step] = sent

    def results(self, steps: list[Step]) -> list[StepResult]:
        out = []
        wall_minus_mono = time.time() - time.monotonic_ns() / 1e9
        for i, st in enumerate(steps):
            p50, p99, p999 = percentiles(self.lat[i], QS)
            worst, seq = self.worst[i]
            out.append(
                StepResult(
                    st.rate,
                    received=self.received[i],
                    measured=len(self.lat[i]),
                    p50_ms=p50,
                    p99_ms=p99,
                    p999_ms=p999,
                    max_ms=max(self.lat[i], default=float("nan")),
                    max_at_s=seq / st.rate if worst >= 0 else float("nan"),
                    max_at_wall=(
                        self.worst_sent_ns[i] / 1e9 + wall_minus_mono
                        if worst >= 0
                        else float("nan")
                    ),
                    over_20ms=sum(1 for x in self.lat[i] if x > 20.0),
                )
            )
        return out


async def pace(
    steps: list[Step],
    send: Callable[[bytes], Awaitable[Any]],
    flush: Callable[[], Awaitable[Any]],
) -> list[tuple[int, float, float]]:
    """Send every step at its rate; returns (sent, achieved rate, worst lag in ms) per step.
    Messages carry their actual send time, so a producer that falls behind (lag) does not
    inflate the latencies; the lag is reported instead, as a sign the client was the bound."""
    out = []
    for i, st in enumerate(steps):
        total = int(st.rate * (st.warmup + st.seconds))
        t0 = time.monotonic()
        measure_from = t0 + st.warmup
        sent = 0
        max_lag = 0.0
        while sent < total:
            now = time.monotonic()
            due = min(total, int((now - t0) * st.rate) + 1)
            if due > sent + 1:
                max_lag = max(max_lag, now - (t0 + sent / st.rate))
            measured = now >= measure_from
            while sent < due:
                await send(message(i, measured, sent))
                sent += 1
            await flush()
            delay = t0 + sent / st.rate - time.monotonic()
            # uvloop's timers count whole milliseconds: a shorter sleep returns at once, and
            # at 5k msg/s (0.2 ms apart) the producer would spin a whole core of this 2-core
            # machine against the server and the consumer. Sleep at least 1 ms; the messages
            # due meanwhile leave together, stamped when actually sent.
            await asyncio.sleep(max(delay, 0.001) if delay > 0 else 0)
        out.append((sent, sent / (time.monotonic() - t0), max_lag * 1000))
        await asyncio.sleep(0.5)  # let a backlog drain before the next rate
    await send(_HEAD.pack(time.monotonic_ns(), END, 0, 0) + _PAD)
    await flush()
    return out


def timeout_for(steps: list[Step]) -> float:
    return sum(s.warmup + s.seconds + 0.5 for s in steps) + 60.0


# ------------------------------------------------------------------------------ herald
async def herald_consumer(port: int, topic: str, steps: list[Step], ready: Any) -> RunResult:
    from broker.client import Client

    rec = Recorder(len(steps))
    async with await Client.connect(HOST, port, client_id="bench-lat-consumer") as client:
        await client.create_topic(topic, 1, exist_ok=True)
        consumer = await client.consumer(topic, group="bench-latency", auto_commit_interval_ms=0)
        ready.set()
        timed_out = False
        deadline = time.monotonic() + timeout_for(steps)
        while not rec.done.is_set():
            if time.monotonic() > deadline:
                timed_out = True
                break
            batch = await consumer.getmany(timeout_ms=500)
            now = time.monotonic_ns()
            for r in batch:
                rec.record(r.value, now)
        await consumer.close()
        await client.delete_topic(topic)
    return RunResult(rec.results(steps), consumer_timed_out=timed_out)


async def herald_producer(port: int, topic: str, steps: list[Step]) -> RunResult:
    from broker.client import Client

    errors = 0
    pending = 0
    drained = asyncio.Event()

    # count acknowledgements instead of keeping every future: a list of a few hundred
    # thousand futures makes the garbage collector stall the producer for tens of ms
    def done(f: asyncio.Future[Any]) -> None:
        nonlocal errors, pending
        pending -= 1
        if f.cancelled() or f.exception() is not None:
            errors += 1
        if pending == 0:
            drained.set()

    async with await Client.connect(HOST, port, client_id="bench-lat-producer") as client:
        producer = await client.producer(acks=-1, linger_ms=0.0)

        async def send(value: bytes) -> None:
            nonlocal pending
            fut = producer.send_nowait(topic, value, partition=0)
            pending += 1
            drained.clear()
            fut.add_done_callback(done)

        async def flush() -> None:
            return None

        sent = await pace(steps, send, flush)
        await producer.flush()
        if pending:
            await asyncio.wait_for(drained.wait(), 60)
    return _producer_result(steps, sent, errors)


def _producer_result(
    steps: list[Step], sent: list[tuple[int, float, float]], errors: int
) -> RunResult:
    return RunResult(
        [
            StepResult(st.rate, sent=n, achieved_rate=r, max_lag_ms=lag)
            for st, (n, r, lag) in zip(steps, sent, strict=True)
        ],
        producer_errors=errors,
    )


# ------------------------------------------------------------------------------- redis
async def redis_consumer(port: int, stream: str, steps: list[Step], ready: Any) -> RunResult:
    import redis.asyncio as aioredis

    rec = Recorder(len(steps))
    r = aioredis.Redis(host=HOST, port=port)
    try:
        await r.delete(stream)
        await r.xgroup_create(stream, "bench-latency", id="$", mkstream=True)
        ready.set()
        timed_out = False
        deadline = time.monotonic() + timeout_for(steps)
        ids: list[bytes] = []
        while not rec.done.is_set():
            if time.monotonic() > deadline:
                timed_out = True
                break
            pipe = r.pipeline(transaction=False)
            if ids:
                pipe.xack(stream, "bench-latency", *ids)
            pipe.xreadgroup("bench-latency", "c1", {stream: ">"}, count=10_000, block=500)
            replies = await pipe.execute()
            now = time.monotonic_ns()
            ids = []
            for _name, entries in replies[-1] or []:
                for entry_id, fields in entries:
                    ids.append(entry_id)
                    rec.record(fields[b"v"], now)
        if ids:
            await r.xack(stream, "bench-latency", *ids)
        await r.delete(stream)
    finally:
        await r.aclose()
    return RunResult(rec.results(steps), consumer_timed_out=timed_out)


async def redis_producer(port: int, stream: str, steps: list[Step]) -> RunResult:
    import redis.asyncio as aioredis

    r = aioredis.Redis(host=HOST, port=port)
    pipe = r.pipeline(transaction=False)
    queued = 0
    errors = 0

    async def send(value: bytes) -> None:
        nonlocal queued
        pipe.xadd(stream, {b"v": value})
        queued += 1

    async def flush() -> None:
        nonlocal queued, errors
        if queued:
            replies = await pipe.execute(raise_on_error=False)
            errors += sum(isinstance(x, Exception) for x in replies)
            queued = 0

    try:
        sent = await pace(steps, send, flush)
    finally:
        await r.aclose()
    return _producer_result(steps, sent, errors)


# -------------------------------------------------------------------------------- nats
async def nats_consumer(url: str, stream: str, steps: list[Step], ready: Any) -> RunResult:
    import nats as natslib
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    from bench.scenarios.produce import nats_stream

    rec = Recorder(len(steps))
    subject = f"{stream}.in"
    nc = await natslib.connect(url)
    last: list[Any] = [None]
    try:
        js = nc.jetstream()
        await nats_stream(js, stream, subject)

        async def on_msg(msg: Any) -> None:
            rec.record(msg.data, time.monotonic_ns())
            last[0] = msg

        sub = await js.subscribe(
            subject,
            durable="bench-latency",
            stream=stream,
            cb=on_msg,
            manual_ack=True,
            config=ConsumerConfig(
                ack_policy=AckPolicy.ALL,
                deliver_policy=DeliverPolicy.NEW,
                max_ack_pending=-1,
            ),
        )
        ready.set()
        timed_out = False
        deadline = time.monotonic() + timeout_for(steps)
        acked = None
        while not rec.done.is_set():
            if time.monotonic() > deadline:
                timed_out = True
                break
            await asyncio.sleep(0.02)
            if last[0] is not None and last[0] is not acked:
                acked = last[0]
                await acked.ack()
        await sub.unsubscribe()
        await js.delete_stream(stream)
    finally:
        await nc.close()
    return RunResult(rec.results(steps), consumer_timed_out=timed_out)


async def nats_producer(url: str, stream: str, steps: list[Step]) -> RunResult:
    import nats as natslib

    subject = f"{stream}.in"
    errors = 0

    def done(f: asyncio.Future[Any]) -> None:
        nonlocal errors
        if f.cancelled() or f.exception() is not None:
            errors += 1

    nc = await natslib.connect(url)
    try:
        js = nc.jetstream(publish_async_max_pending=100_000)

        async def send(value: bytes) -> None:
            fut = await js.publish_async(subject, value)
            fut.add_done_callback(done)

        async def flush() -> None:
            return None

        sent = await pace(steps, send, flush)
        await js.publish_async_completed()
    finally:
        await nc.close()
    return _producer_result(steps, sent, errors)

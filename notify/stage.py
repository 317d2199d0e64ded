"""The stage loop every engine of the core runs: consume a batch, compute its outputs, append
them (batched per partition, ``acks=all``), and only then commit the batch's offsets. The
LMDB rows the outputs depend on (timers, batch windows, dedupe rows) are written while the
batch is handled, before the commit, and LMDB makes transactions durable in order, so those
rows are durable no later than the offset that relies on them. A crash anywhere before the
commit is durable redoes the batch; outputs carry stable ids (``notify.ids``), so a redo is
harmless downstream.

:class:`Outbox` gathers output records per (topic, partition) and appends each partition's
records as one batch (split at ``max_batch_bytes``) through the idempotent producer of the
in-process client (``broker/local.py``).

:class:`Stage` is a consumer-group member (``broker.client.Consumer`` over a
:class:`~broker.local.LocalClient`) running :meth:`Stage.handle` per batch. A failed batch
(a storage error, the node refusing appends while it stops) is abandoned: its positions go
back to the batch's start and it is tried again after a pause, or by the next owner. Stopping
lets the batch in hand finish (bounded by ``stop_timeout``), else abandons it.

Pipelining: batch N+1 is handled and its outputs appended while batch N's are still being
synced; only its commit waits for N's outputs. Neither an append's sync nor a commit (a sync of the
state store) is on the way of the next batch. Order per partition needs no wait: appends to a
partition are placed in call order (one producer, handed to the log in the same loop turn it
is called), a failed write fails every append queued after it on that partition (the log is
cut back there), and the idempotent producer's sequence numbers refuse a batch that would
overtake an earlier one being retried; a failed batch is redone with every batch behind it.
Waiting for N's acknowledgement instead put the slowest of N's partitions' syncs (one a
second per partition also writes the recovery checkpoint) in front of every later event.

Commits: a stage's commit is stored in the state store (LMDB) without waiting for its sync
(``BrokerService.store_offsets``): a killed process keeps it, and it is durable at the
store's next sync, the node's periodic one (``storage.offsets-sync-interval-ms``, 1 s) at
the latest. A power cut can so take back at most that last second of commits, never an
output they relied on (those were durable first): the batches are redone, and their outputs
carry the same ids (the workers' dedupe rows and the receivers' ``webhook-id`` keep each
effect once), as for a crash between an output and its commit. Waiting for the sync cost
an fsync per batch (~0.3 ms of CPU here, and a batch is one event when events trickle in)
and put the sync of every other stage's and the audit indexer's LMDB writes in front of the
commit. The batches that queue their offsets in one loop turn share one commit (offsets
only grow, so it covers them all). A failed commit fails its batches (they are redone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import partial
from typing import Final, Protocol

from broker.client import BrokerError, Consumer, ConsumerRecord, Producer
from broker.local import LocalClient
from broker.protocol import partition_for_key
from storage import records
from storage.errors import StorageError
from storage.kv import KV

log = logging.getLogger("herald.notify")

TopicPartition = tuple[str, int]
_RECORD_OVERHEAD: Final = 32  # msgpack framing per record, generously
# bytes fetched per partition per batch: what bounds a batch's memory. A page (notify.pages)
# holds up to 1,000 deliveries in ~110 KB, so this is up to ~9,000 deliveries per partition,
# a few tens of MB decoded over 8 partitions; single records are ~300-600 bytes each.
FETCH_PARTITION_BYTES: Final = 1024 * 1024


class Group(Protocol):
    """Outputs gathered into few records (a page, ``notify.pages``): rows are added to it
    while it is open; :meth:`seal` encodes them, once, when the outbox is sent."""

    strict: bool  # a single record added to its partition seals it first (order kept)

    def __len__(self) -> int: ...  # rows

    def seal(self) -> list[bytes]: ...


class Outbox:
    """Output records waiting to be appended, per (topic, partition), in the order added,
    and groups (pages) of outputs that become records when the outbox is sent.

    Memory: the encoded values and keys of at most one flush's records and the rows of its
    open groups; the caller bounds it by flushing (``len(outbox)`` counts outputs: a record
    added, or a row added to a group)."""

    def __init__(self, partitions: Callable[[str], int], max_batch_bytes: int) -> None:
        self._partitions = partitions
        self._max_bytes = max_batch_bytes - records.HEADER_SIZE
        self._rows: dict[TopicPartition, tuple[list[bytes | None], list[bytes]]] = {}
        self._groups: dict[tuple[str, int, Hashable], Group] = {}
        self._open: dict[TopicPartition, int] = {}  # strict groups open per partition
        self._counts: dict[str, int] = {}
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def partitions(self, topic: str) -> int:
        """How many partitions ``topic`` has (asked once per topic)."""
        n = self._counts.get(topic)
        if n is None:
            n = self._counts[topic] = self._partitions(topic)
        return n

    def partition_of(self, topic: str, key: bytes) -> int:
        n = self._counts.get(topic)
        if n is None:
            n = self._counts[topic] = self._partitions(topic)
        return partition_for_key(key, n)

    def add(self, topic: str, key: bytes, value: bytes) -> None:
        """Queue one record for the partition of ``key`` (after the strict groups open on
        that partition: a user's deliveries stay in the order they were made)."""
        tp = (topic, self.partition_of(topic, key))
        if self._open and tp in self._open:
            self._seal(tp)
        rows = self._rows.get(tp)
        if rows is None:
            rows = self._rows[tp] = ([], [])
        rows[0].append(key)
        rows[1].append(value)
        self.count += 1

    def group(
        self,
        topic: str,
        key: bytes,
        ident: Hashable,
        make: Callable[[], Group],
        rows: int = 1,
    ) -> Group:
        """The open group ``ident`` on the partition of ``key`` (made by ``make`` if there is
        none), for the caller to add ``rows`` rows to: counted as that many outputs."""
        tp = (topic, self.partition_of(topic, key))
        gk = (topic, tp[1], ident)
        g = self._groups.get(gk)
        if g is None:
            g = self._groups[gk] = make()
            if g.strict:
                self._open[tp] = self._open.get(tp, 0) + 1
        self.count += rows
        return g

    def groups_of(self, topic: str) -> list[Group]:
        """The open groups of ``topic``, in the order they were opened."""
        return [g for k, g in self._groups.items() if k[0] == topic]

    def has_records(self, topic: str) -> bool:
        """Whether records of ``topic`` (not open groups) are queued."""
        return any(tp[0] == topic for tp in self._rows)

    def take_groups(self, topic: str) -> list[Group]:
        """The open groups of ``topic``, in the order they were opened, removed from the
        outbox (their rows no longer counted in it: the caller handles them itself)."""
        taken = [self._pop_group(k) for k in [k for k in self._groups if k[0] == topic]]
        self.count -= sum(len(g) for g in taken)
        return taken

    def _pop_group(self, gk: tuple[str, int, Hashable]) -> Group:
        g = self._groups.pop(gk)
        if g.strict:
            tp = (gk[0], gk[1])
            left = self._open[tp] - 1
            if left:
                self._open[tp] = left
            else:
                del self._open[tp]
        return g

    def _seal(self, only: TopicPartition | None = None) -> None:
        """Encode open groups (of partition ``only``, else all) into records, in the order
        the groups were opened."""
        for gk in [k for k in self._groups if only is None or (k[0], k[1]) == only]:
            g = self._pop_group(gk)
            tp = (gk[0], gk[1])
            rows = self._rows.get(tp)
            if rows is None:
                rows = self._rows[tp] = ([], [])
            for value in g.seal():
                rows[0].append(None)
                rows[1].append(value)

    async def send(self, producer: Producer) -> int:
        """Append everything queued (one batch per partition unless it exceeds the batch
        limit) and wait for every acknowledgement. Returns the outputs appended. On
        failure nothing is cleared: the caller abandons its batch."""
        if self._groups:
            self._seal()
        if not self._rows:
            sent, self.count = self.count, 0
            return sent
        batches: list[tuple[str, int, list[bytes | None], list[bytes]]] = []
        for (topic, partition), (keys, values) in self._rows.items():
            start = size = 0
            for i, v in enumerate(values):
                need = len(v) + len(keys[i] or b"") + _RECORD_OVERHEAD
                if i > start and size + need > self._max_bytes:
                    batches.append((topic, partition, keys[start:i], values[start:i]))
                    start, size = i, 0
                size += need
            batches.append((topic, partition, keys[start:], values[start:]))
        # appended now, one wake-up once all are acknowledged (no task per batch: a loop
        # turn of a busy node is on every notification's way, twice per batch here)
        await producer.send_batches(batches)
        sent = self.count
        self._rows.clear()
        self.count = 0
        return sent

    def clear(self) -> None:
        self._rows.clear()
        self._groups.clear()
        self._open.clear()
        self.count = 0

    def take(self) -> Outbox:
        """Everything queued, moved to a new outbox (this one is left empty)."""
        if self._groups:
            self._seal()
        other = Outbox(self._partitions, self._max_bytes + records.HEADER_SIZE)
        other._counts = self._counts
        other._rows, self._rows = self._rows, {}
        other.count, self.count = self.count, 0
        return other


class Stage:
    """One consumer-group member of the core. Subclasses implement :meth:`handle` (and may
    call :meth:`flush` mid-batch to bound memory); everything else is here."""

    name = "stage"
    retry_pause_s = 1.0
    # after a batch smaller than ``batch``, wait this long before the next fetch: the audit
    # indexer (nobody waits on it) 50 ms, to take its records in fewer, larger batches; the
    # fan-out and the delivery workers ``notify.linger-ms`` (1 ms), which lowered the in-app
    # path's latency under load (docs/NOTIFY.md, *Linger*). A record that finds the stage
    # waiting in its fetch is taken at once: only those arriving during a linger wait.
    linger_s = 0.0

    def __init__(
        self,
        client: LocalClient,
        kv: KV,
        *,
        group: str,
        topics: list[str],
        batch: int,
        max_batch_bytes: int,
        stopping: Callable[[], bool] = lambda: False,
        stop_timeout: float = 5.0,
    ) -> None:
        self.client = client
        self.kv = kv
        self.group = group
        self.topics = topics
        self.batch = batch
        self.stopping_node = stopping
        self.stop_timeout = stop_timeout
        self.outbox = Outbox(self._partition_count, max_batch_bytes)
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = False
        self._busy = False
        self._polling = False  # waiting in a fetch (what stop may cut short)
        self._slice_end = 0.0  # perf_counter() when the batch in hand owes the loop a turn
        self._inflight: deque[_Finishing] = deque()
        # offsets whose batches' outputs are acknowledged, for the next commit, and the
        # future that commit answers
        self._to_commit: dict[TopicPartition, int] = {}
        self._commit_next: asyncio.Future[None] | None = None
        # what the batch in hand writes once its outputs are acknowledged (:meth:`after_sent`)
        self._after_outputs: list[Callable[[], object]] = []
        self.batches = 0
        self.records_in = 0
        self.records_out = 0

    def _partition_count(self, topic: str) -> int:
        n = self.client._partition_counts.get(topic)
        if n is None:
            raise KeyError(f"unknown partition count for {topic}")
        return n

    async def start(self) -> None:
        """Join the group and start the loop; returns once the stage is consuming. On a node
        that cannot write now (a full disk: the idempotent producer's id cannot be reserved)
        the stage still starts and gets its producer once the disk has room again."""
        try:
            self.producer = await self.client.producer(acks=-1, linger_ms=0)
        except BrokerError as exc:
            if not _storage_trouble(exc):
                raise
            log.warning("event=stage_producer_deferred stage=%s error=%s", self.name, exc.code)
        await self.client.metadata(None)  # partition counts of every topic, for the outbox
        self.consumer = Consumer(
            self.client,
            self.topics,
            group=self.group,
            auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_bytes=FETCH_PARTITION_BYTES,
        )
        await self.consumer.start()
        await self.started()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def started(self) -> None:
        """Called once the consumer has joined (subclasses: resume state)."""

    async def stop(self) -> None:
        self._stop = True
        task = self._task
        if task is not None:
            if self._polling:  # waiting in an empty fetch, nothing in hand: wake it now
                task.cancel()
            try:
                await asyncio.wait_for(asyncio.shield(task), self.stop_timeout)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not task.cancelled() or (current is not None and current.cancelling()):
                    raise  # this stop itself was cancelled, not only the stage's fetch
        if self.consumer is not None:
            with contextlib.suppress(BrokerError):
                await self.consumer.close()
        await self.stopped()

    async def stopped(self) -> None:
        """Called after the loop ended (subclasses: release resources)."""

    # ------------------------------------------------------------------------ the loop
    @property
    def settled(self) -> bool:
        """No batch in hand and every batch handled so far committed."""
        return not self._busy and all(f.task.done() for f in self._inflight)

    async def _run(self) -> None:
        """Handle batch N+1 while batch N's outputs are synced and its offsets committed:
        N+1's outputs are appended at once (see the module's *Pipelining*: the log keeps a
        user's deliveries in order on their partition), and N+1 commits only after N did.
        At most :data:`MAX_FINISHING` batches are finishing while one is handled, so memory
        stays a few batches deep. A failed batch fails the ones behind it (they never
        commit); every open batch is then given up from the oldest start."""
        consumer = self.consumer
        assert consumer is not None
        inflight = self._inflight
        while self.producer is None and not self._stop:
            try:
                self.producer = await self.client.producer(acks=-1, linger_ms=0)
            except BrokerError as exc:
                if not _storage_trouble(exc):
                    raise
                await asyncio.sleep(self.retry_pause_s)
        try:
            while not self._stop:
                failure = self._reap()
                if failure is not None:
                    await self._give_up(failure[0], failure[1])
                    continue
                if self.stopping_node():
                    await asyncio.sleep(0.05)
                    continue
                try:
                    self._polling = True
                    recs = await consumer.getmany(timeout_ms=IDLE_POLL_MS, max_records=self.batch)
                except BrokerError as exc:
                    log.warning("event=stage_fetch_failed stage=%s error=%s", self.name, exc)
                    await asyncio.sleep(self.retry_pause_s)
                    continue
                finally:
                    self._polling = False
                if not recs:
                    if not inflight:
                        await self.idle()
                    else:
                        await asyncio.wait([inflight[-1].task], timeout=0.1)
                    continue
                starts: dict[TopicPartition, int] = {}
                ends: dict[TopicPartition, int] = {}
                for r in recs:
                    tp = (r.topic, r.partition)
                    starts.setdefault(tp, r.offset)
                    ends[tp] = r.offset + 1
                try:
                    self._busy = True
                    self._slice_end = time.perf_counter() + SLICE_S
                    handled = await self.handle(recs)
                except Exception as exc:
                    # a storage or broker error is retried; anything else is a bug that
                    # must not kill the stage silently: logged loudly, and retried too
                    if not isinstance(exc, BrokerError | StorageError | OSError):
                        log.exception("event=stage_batch_failed stage=%s", self.name)
                    await self._give_up(starts, exc)
                    continue
                finally:
                    self._busy = False
                if handled is not None:
                    ends = handled
                if inflight and inflight[-1].task.done() and not _succeeded(inflight[-1].task):
                    await self._give_up(starts, None)  # nothing goes out behind a failure
                    continue
                while len(inflight) >= MAX_FINISHING:
                    await asyncio.wait([inflight[0].task])
                    failure = self._reap()
                    if failure is not None:
                        break
                if failure is not None:
                    await self._give_up(starts, failure[1])
                    continue
                taken = self.outbox.take()
                after, self._after_outputs = self._after_outputs, []
                loop = asyncio.get_running_loop()
                before = inflight[-1].queued if inflight else None
                queued: asyncio.Future[bool] = loop.create_future()
                task = loop.create_task(self._finish(taken, after, ends, len(recs), before, queued))
                task.add_done_callback(partial(_not_queued, queued))  # if cancelled unstarted
                inflight.append(_Finishing(task, starts, queued))
                if self.linger_s and self.trickle(recs) and not self._stop:
                    await asyncio.sleep(self.linger_s)
        finally:
            left = [f.task for f in inflight]
            if left:
                await asyncio.wait(left)
                if any(not _succeeded(t) for t in left):
                    # stopping: the batch stays uncommitted and is redone after the restart
                    log.info("event=stage_batch_left stage=%s", self.name)

    def _reap(self) -> tuple[dict[TopicPartition, int], BaseException | None] | None:
        """Forget the finished batches at the head (in order). If one failed: the starts
        of every open batch from it on (oldest first) and its error."""
        inflight = self._inflight
        while inflight and inflight[0].task.done():
            head = inflight[0]
            if _succeeded(head.task):
                inflight.popleft()
                continue
            failure = None if head.task.cancelled() else head.task.exception()
            return self._oldest_starts({}), failure
        return None

    def _oldest_starts(self, current: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Per partition, the start of the oldest open batch (finishing, or ``current``)."""
        starts: dict[TopicPartition, int] = {}
        for f in self._inflight:
            for tp, off in f.starts.items():
                starts.setdefault(tp, off)
        for tp, off in current.items():
            starts.setdefault(tp, off)
        return starts

    async def _give_up(self, current: dict[TopicPartition, int], exc: BaseException | None) -> None:
        """Abandon every open batch: wait for those finishing (the ones behind a failed
        one fail without committing), then seek back to the oldest start of those that did
        not commit (and of ``current``, the batch in hand)."""
        inflight = self._inflight
        if inflight:
            await asyncio.wait([f.task for f in inflight])
        while inflight and _succeeded(inflight[0].task):
            inflight.popleft()
        if exc is None:
            for f in inflight:
                exc = None if f.task.cancelled() else f.task.exception()
                break
        starts = self._oldest_starts(current)
        inflight.clear()
        await self._abandon(starts, exc)

    async def _finish(
        self,
        taken: Outbox,
        after: list[Callable[[], object]],
        ends: dict[TopicPartition, int],
        count: int,
        before: asyncio.Future[bool] | None,
        queued: asyncio.Future[bool],
    ) -> None:
        """Append the batch's outputs; once they are acknowledged, write what waited for
        them (``after``, :meth:`after_sent`), and once the batch before it is queued for a
        commit (``before``), queue its offsets (``queued`` says so, or that the batch
        failed) and wait for the commit that covers them."""
        assert self.producer is not None
        ok = False
        commit = None
        try:
            self.records_out += await taken.send(self.producer)
            for write in after:
                write()
            if before is not None and not await before:
                raise _Behind("the batch before this one failed")
            if ends:
                commit = self._queue_commit(ends)
            ok = True
        finally:
            if not queued.done():
                queued.set_result(ok)
        if commit is not None:
            await commit
        self.batches += 1
        self.records_in += count

    def _queue_commit(self, ends: dict[TopicPartition, int]) -> asyncio.Future[None]:
        """Offsets to commit (batches queue in order, so they only grow): the future of
        the commit that carries them, made at the end of this loop turn with whatever
        else is queued by then."""
        self._to_commit.update(ends)
        fut = self._commit_next
        if fut is None:
            loop = asyncio.get_running_loop()
            fut = self._commit_next = loop.create_future()
            loop.call_soon(self._commit_queued)
        return fut

    def _commit_queued(self) -> None:
        """Store the queued offsets in the state store without waiting for its sync (see
        the module's *Commits*); a failure fails the batches the commit carried."""
        consumer = self.consumer
        assert consumer is not None and consumer.group is not None
        offsets, self._to_commit = self._to_commit, {}
        fut, self._commit_next = self._commit_next, None
        assert fut is not None
        try:
            self.client.store_offsets(
                consumer.group, consumer.member_id, consumer.generation, offsets
            )
        except Exception as exc:
            if not fut.done():
                fut.set_exception(exc)
            return
        if not fut.done():
            fut.set_result(None)

    async def _abandon(self, starts: dict[TopicPartition, int], exc: BaseException | None) -> None:
        """Give up the open batches: positions go back to the oldest one's start."""
        consumer = self.consumer
        assert consumer is not None
        self.outbox.clear()
        self._after_outputs = []
        for (t, p), off in starts.items():
            if (t, p) in consumer.positions:
                consumer.seek(t, p, off)
        if not (self._stop or self.stopping_node()):
            log.warning("event=stage_batch_abandoned stage=%s error=%r", self.name, exc)
            await asyncio.sleep(self.retry_pause_s)
        await self.abandoned()

    def after_sent(self, write: Callable[[], object]) -> None:
        """Run ``write`` (LMDB rows) once the outputs of the batch in hand are acknowledged,
        before its commit: for rows that record an effect those outputs are (a delivery
        worker's dedupe row of a message it appended rather than sent): written earlier,
        a crash before the outputs are durable would leave the row saying done and no
        effect. A failed write fails the batch (it is redone)."""
        self._after_outputs.append(write)

    async def flush(self) -> None:
        """Append every queued output now (``acks=all``): what a progress mark written next
        may rely on (the fan-out of a large audience)."""
        assert self.producer is not None
        self.records_out += await self.outbox.send(self.producer)

    async def handle(self, recs: list[ConsumerRecord]) -> dict[TopicPartition, int] | None:
        """Process a batch: LMDB writes in short transactions, outputs to ``self.outbox``.
        Returns None when the whole batch is done, else the offsets to commit (the next
        offset per partition; a stage that handled only a prefix seeks back itself)."""
        raise NotImplementedError

    async def take_turn(self) -> None:
        """Let the loop serve the rest of the node for one turn (connections, timers, the
        other stages) if the batch in hand has run :data:`SLICE_S` since it last did.
        Called between the units of a batch (an event, a page of recipients, a user's
        deliveries): a batch is then run in slices, and what waits behind it on the loop
        waits a slice, not the batch. Only at points where the batch may already be
        suspended (its appends are awaited there too), so no state is seen half-done that
        could not be before."""
        if time.perf_counter() >= self._slice_end:
            await asyncio.sleep(0)
            self._slice_end = time.perf_counter() + SLICE_S

    def trickle(self, recs: list[ConsumerRecord]) -> bool:
        """Whether the batch just handled was small enough to linger after (``linger_s``)."""
        return len(recs) < self.batch

    async def idle(self) -> None:
        """Called when a fetch brought nothing (subclasses: periodic work)."""

    async def abandoned(self) -> None:
        """Called after a batch was given up (subclasses: drop in-memory state of it)."""


# how long a stage's fetch waits for records when there are none: a record wakes it at
# once, so this is only how often an idle stage turns round (for its idle() upkeep). At
# 100 ms the node's 18 stages woke the loop ~180 times a second for nothing: 1.7% of a
# core on an idle node, 0.8% at 1 s. Stopping cuts such a wait short (Stage.stop).
IDLE_POLL_MS: Final = 1000

# how long a stage's batch runs on the loop before it gives the loop a turn (Stage.take_turn).
# A fan-out batch of 200 events took 10-14 ms of loop at HTTP ingest saturation and a
# delivery batch of 2,000 in-app deliveries more: every connection of the node waited that
# long (the node logged loop stalls of 20-35 ms, issue 12's stall budget being 20 ms). A turn
# costs a few microseconds when nothing else is ready.
SLICE_S: Final = 0.004

# batches finishing (outputs being synced, offsets committing) at once: each holds its
# outputs until they are acknowledged (a fan-out's at most ``fanout-flush-records``, larger
# ones are flushed while handled), so memory stays a few batches deep
MAX_FINISHING: Final = 4


class _Behind(Exception):
    """A batch whose predecessor failed: it must not commit (redone with it)."""


@dataclass(slots=True)
class _Finishing:
    """A handled batch being finished: its outputs appended and acknowledged, then its
    offsets committed with or after the batch before it (``task``)."""

    task: asyncio.Task[None]
    starts: dict[TopicPartition, int]
    queued: asyncio.Future[bool]  # True once its offsets are queued to commit; False: failed


def _not_queued(queued: asyncio.Future[bool], _task: asyncio.Task[None]) -> None:
    if not queued.done():
        queued.set_result(False)


def _succeeded(task: asyncio.Task[None]) -> bool:
    return not task.cancelled() and task.exception() is None


def _storage_trouble(exc: BrokerError) -> bool:
    """The node cannot write right now (a full or failing disk): wait, do not die."""
    return exc.retriable or exc.code.startswith("storage")


def now_ms() -> int:
    return time.time_ns() // 1_000_000

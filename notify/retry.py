"""Retries: the backoff schedule (pure) and the tier workers.

**Schedule.** After attempt ``n`` fails, attempt ``n + 1`` comes ``delays[n-1]`` later,
stretched by a random factor in ``[1, 1 + jitter)`` (so failed deliveries do not all come
back together), or after the provider's own ``Retry-After`` if that is longer. With the
default seven delays (1 min ... 14 h) a delivery gets 8 attempts over about 23 hours; then
(or at once, for a permanent failure) it goes to the dead-letter queue.

**Tiers.** Each distinct delay is a tier, a topic ``__retry.<channel>.<delay>`` (e.g.
``__retry.webhook.5m``). A failed delivery is appended to the tier of the longest delay not
above its wait, carrying its own due time; the tier's worker (group
``notify.retry.<channel>.<delay>``) hands records back to ``__deliver.<channel>`` once due.
Within a tier records arrive in append order with nearly the same delay, so due times stay
ordered (a record waits behind an earlier one by at most the jitter), and a tier worker only
ever waits for its head record: no timer per delivery, no scan.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Final

import msgspec

from broker.client import ConsumerRecord
from broker.config import RetrySchedule
from broker.local import LocalClient
from notify.durations import format_duration
from notify.model import Delivery
from notify.stage import Stage, TopicPartition
from storage.kv import KV

MAX_WAIT_S: Final = 0.5  # a tier worker looks again at least this often (stop, clock moves)


def tier_delays(schedule: RetrySchedule) -> list[int]:
    """The schedule's tiers: its distinct delays, shortest first."""
    return sorted(set(schedule.delays_ms))


def tier_topic(channel: str, delay_ms: int) -> str:
    return f"__retry.{channel}.{format_duration(delay_ms)}"


def next_attempt(
    schedule: RetrySchedule,
    failed_attempt: int,
    now_ms: int,
    rand: float,
    after_s: float | None = None,
) -> tuple[int, int] | None:
    """When attempt ``failed_attempt + 1`` is due and the tier (its delay) that holds it
    meanwhile, or None when attempts are exhausted. ``rand`` in [0, 1) draws the jitter;
    ``after_s`` is the provider's Retry-After (honoured when longer than the schedule's)."""
    delays = schedule.delays_ms
    if failed_attempt > len(delays) or failed_attempt < 1:
        return None
    wait = int(delays[failed_attempt - 1] * (1 + schedule.jitter * rand))
    if after_s is not None:
        wait = max(wait, int(after_s * 1000))
    tiers = tier_delays(schedule)
    tier = tiers[0]
    for d in tiers:
        if d <= wait:
            tier = d
    return tier, now_ms + wait


def max_attempts(schedule: RetrySchedule) -> int:
    return len(schedule.delays_ms) + 1


class RetryTier(Stage):
    """Hands due deliveries of one tier back to ``__deliver.<channel>``, in order."""

    def __init__(
        self,
        client: LocalClient,
        kv: KV,
        *,
        channel: str,
        delay_ms: int,
        clock: Callable[[], int],
        max_batch_bytes: int,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        topic = tier_topic(channel, delay_ms)
        super().__init__(
            client,
            kv,
            group=f"notify.retry.{channel}.{format_duration(delay_ms)}",
            topics=[topic],
            batch=1000,
            max_batch_bytes=max_batch_bytes,
            stopping=stopping,
        )
        self.name = f"notify-{topic}"
        self.channel = channel
        self.clock = clock
        self.target = f"__deliver.{channel}"
        self._due = msgspec.json.Decoder(_Due).decode
        self._wake = asyncio.Event()
        self.handed = 0

    def poke(self) -> None:
        self._wake.set()

    async def handle(self, recs: list[ConsumerRecord]) -> dict[TopicPartition, int] | None:
        now = self.clock()
        ends: dict[TopicPartition, int] = {}
        waiting: dict[TopicPartition, int] = {}
        first_due: int | None = None
        for rec in recs:
            tp = (rec.topic, rec.partition)
            if tp in waiting:
                continue
            due = self._due(rec.value).due_ms or 0
            if due > now:
                waiting[tp] = rec.offset
                first_due = due if first_due is None else min(first_due, due)
                continue
            assert rec.key is not None
            self.outbox.add(self.target, rec.key, rec.value)
            ends[tp] = rec.offset + 1
            self.handed += 1
        assert self.consumer is not None
        for (t, p), off in waiting.items():
            self.consumer.seek(t, p, off)
        if not ends and first_due is not None:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wake.wait(), min(MAX_WAIT_S, max(0.0, (first_due - now) / 1000))
                )
        return ends


class _Due(msgspec.Struct):
    due_ms: int | None = None


def retried(delivery: Delivery, *, due_ms: int) -> Delivery:
    """The record a retry tier holds: the next attempt, due at ``due_ms``."""
    return msgspec.structs.replace(delivery, attempt=delivery.attempt + 1, due_ms=due_ms)

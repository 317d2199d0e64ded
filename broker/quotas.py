"""Per-tenant quotas, so that one tenant's key cannot take the node from every other tenant.

Two kinds, as Kafka's client quotas:

- **Counts** (topics, partitions, groups, producer ids, state-store bytes) and the node's own
  totals (topics, partitions): what a tenant holds. Taking one more past the quota is refused
  with :class:`~broker.errors.QuotaExceeded`, whose message names the quota; nothing is
  created or stored. The owner of each kind of state keeps its count here (topics in
  ``broker/topics.py``, groups and offsets in ``broker/groups.py``, producer ids in
  ``broker/producer_ids.py``, event ids in ``broker/events.py``), checking before it takes.
- **Rates** (produce and fetch bytes per second): never refused, throttled. Each tenant has a
  token bucket per direction holding up to ``rate-burst-ms`` worth of bytes. A produce is
  appended, charged, and its answer delayed by the time the bucket needs to pay the debt
  back (the *throttle time*, reported in the answer); a fetch waits out the debt of earlier
  fetches before reading (so no reply is held in memory meanwhile), then is charged for what
  it read. A client that waits for its answers (every Kafka-style client does, with a bounded
  number in flight) is thereby held to the rate; one that pipelines is stopped by the
  connection's in-flight cap. A delay is capped at ``max-throttle-ms``: the debt stays, so
  the next answers wait too.

The operator (tenant ``*``, and the node's own engines) has no quotas. Everything here is
O(1) per request and allocates nothing on the hot path when a tenant has no rate quota.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any, Final

from broker.config import OPERATOR_TENANT, QUOTA_NAMES, QuotasConfig
from broker.errors import QuotaExceeded

UNLIMITED: Final = sys.maxsize
COUNTS: Final = ("topics", "partitions", "groups", "producer_ids", "state_store_bytes")
_WHAT: Final = {
    "topics": "topics",
    "partitions": "partitions",
    "groups": "consumer groups",
    "producer_ids": "producer ids",
    "state_store_bytes": "bytes of state-store rows",
}


def quota_key(name: str) -> str:
    """A quota's name as the config file and messages spell it."""
    return name.replace("_", "-")


class RateBucket:
    """A token bucket of ``rate`` bytes per second holding at most ``capacity`` bytes. It may
    go into debt (a request is charged whole); :meth:`delay` is how long until the debt is
    paid. Pure: the caller passes the clock's reading."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = now

    def _refill(self, now: float) -> None:
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.tokens = tokens if tokens < self.capacity else self.capacity
        self.stamp = now

    def charge(self, nbytes: int, now: float) -> float:
        """Take ``nbytes``; returns the seconds until the bucket is out of debt (0 if not)."""
        self._refill(now)
        self.tokens -= nbytes
        return -self.tokens / self.rate if self.tokens < 0 else 0.0

    def delay(self, now: float) -> float:
        self._refill(now)
        return -self.tokens / self.rate if self.tokens < 0 else 0.0


class TenantUsage:
    """What one tenant holds and has done, against its limits (``UNLIMITED`` for none)."""

    __slots__ = (
        "exempt",
        "fetch",
        "fetched_bytes",
        "groups",
        "limits",
        "partitions",
        "produce",
        "produced_bytes",
        "producer_ids",
        "refused",
        "state_store_bytes",
        "tenant",
        "throttle_ms",
        "topics",
    )

    def __init__(self, tenant: str, limits: dict[str, int], exempt: bool) -> None:
        self.tenant = tenant
        self.exempt = exempt
        self.limits = limits
        self.topics = 0
        self.partitions = 0
        self.groups = 0
        self.producer_ids = 0
        self.state_store_bytes = 0
        self.produce: RateBucket | None = None
        self.fetch: RateBucket | None = None
        self.produced_bytes = 0
        self.fetched_bytes = 0
        self.throttle_ms = {"produce": 0, "fetch": 0}
        self.refused: dict[str, int] = {}

    def used(self, quota: str) -> int:
        value: int = getattr(self, quota)
        return value


class Quotas:
    """Every tenant's usage and the node's totals. One instance per node, on the loop."""

    def __init__(self, config: QuotasConfig, *, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self.tenants: dict[str, TenantUsage] = {}
        self.node_topics = 0
        self.node_partitions = 0
        self.node_refused: dict[str, int] = {}
        self.max_throttle_s = config.max_throttle_ms / 1000

    def of(self, tenant: str) -> TenantUsage:
        usage = self.tenants.get(tenant)
        if usage is None:
            usage = self.tenants[tenant] = self._new(tenant)
        return usage

    def _new(self, tenant: str) -> TenantUsage:
        exempt = tenant == OPERATOR_TENANT
        q = self.config.for_tenant(tenant)
        limits = {n: (getattr(q, n) or UNLIMITED) if not exempt else UNLIMITED for n in QUOTA_NAMES}
        usage = TenantUsage(tenant, limits, exempt)
        burst = self.config.rate_burst_ms / 1000
        now = self.clock()
        if not exempt and limits["produce_bytes_per_second"] != UNLIMITED:
            rate = limits["produce_bytes_per_second"]
            usage.produce = RateBucket(rate, rate * burst, now)
        if not exempt and limits["fetch_bytes_per_second"] != UNLIMITED:
            rate = limits["fetch_bytes_per_second"]
            usage.fetch = RateBucket(rate, rate * burst, now)
        return usage

    # ------------------------------------------------------------------------ counts
    def admit(
        self, usage: TenantUsage, quota: str, more: int = 1, *, field: str | None = None
    ) -> None:
        """Raise :class:`QuotaExceeded` unless ``usage`` may hold ``more`` of ``quota``.
        The caller takes them (adds to the count) once they exist."""
        limit = usage.limits[quota]
        if usage.used(quota) + more > limit:
            usage.refused[quota] = usage.refused.get(quota, 0) + 1
            raise QuotaExceeded(
                f"tenant {usage.tenant!r} is at its quota of {limit} {_WHAT[quota]} "
                f"(quotas.{quota_key(quota)}; holds {usage.used(quota)}, asked for {more} more)",
                quota=quota_key(quota),
                field=field,
            )

    def admit_node(self, topics: int, partitions: int) -> None:
        """Raise :class:`QuotaExceeded` unless the node may hold ``topics`` and ``partitions``
        more (``quotas.node-topics`` / ``node-partitions``: open files and memory are the
        node's, whoever asks)."""
        cfg = self.config
        for name, used, more, limit in (
            ("node_topics", self.node_topics, topics, cfg.node_topics),
            ("node_partitions", self.node_partitions, partitions, cfg.node_partitions),
        ):
            if limit and used + more > limit:
                self.node_refused[name] = self.node_refused.get(name, 0) + 1
                raise QuotaExceeded(
                    f"the node is at its limit of {limit} {name[5:]} "
                    f"(quotas.{quota_key(name)}; holds {used}, asked for {more} more)",
                    quota=quota_key(name),
                )

    # ------------------------------------------------------------------------- rates
    def throttle_produce(self, usage: TenantUsage, nbytes: int) -> float:
        """Charge ``nbytes`` produced; the seconds to delay the answer (0: none)."""
        usage.produced_bytes += nbytes
        bucket = usage.produce
        if bucket is None:
            return 0.0
        return self.throttle(usage, bucket, nbytes, "produce")

    def throttle(self, usage: TenantUsage, bucket: RateBucket, nbytes: int, what: str) -> float:
        """Charge ``nbytes`` to ``bucket``; the seconds to delay the answer, capped (the hot
        path calls this only for a tenant with a rate quota)."""
        delay = bucket.charge(nbytes, self.clock())
        if delay:
            delay = delay if delay < self.max_throttle_s else self.max_throttle_s
            usage.throttle_ms[what] += int(delay * 1000)
        return delay

    def throttle_fetch(self, usage: TenantUsage) -> float:
        """The seconds a fetch waits before reading (the debt of earlier fetches)."""
        bucket = usage.fetch
        if bucket is None:
            return 0.0
        delay = bucket.delay(self.clock())
        if delay:
            delay = delay if delay < self.max_throttle_s else self.max_throttle_s
            usage.throttle_ms["fetch"] += int(delay * 1000)
        return delay

    def fetched(self, usage: TenantUsage, nbytes: int) -> None:
        usage.fetched_bytes += nbytes
        if usage.fetch is not None and nbytes:
            usage.fetch.charge(nbytes, self.clock())


def delayed(ack: asyncio.Future[Any] | None, seconds: float) -> asyncio.Future[Any]:
    """A future that resolves like ``ack`` (at once if None), but not before ``seconds``
    have passed: a throttled answer. A failure is passed on at once (an error is not
    throttled: nothing was stored)."""
    loop = asyncio.get_running_loop()
    out: asyncio.Future[Any] = loop.create_future()
    timer_done = False
    ack_done = ack is None

    def finish() -> None:
        if not out.done() and timer_done and ack_done:
            out.set_result(None)

    def on_timer() -> None:
        nonlocal timer_done
        timer_done = True
        finish()

    handle = loop.call_later(seconds, on_timer)

    def on_ack(fut: asyncio.Future[Any]) -> None:
        nonlocal ack_done
        ack_done = True
        if out.done():
            return
        if fut.cancelled():
            handle.cancel()
            out.cancel()
        elif (exc := fut.exception()) is not None:
            handle.cancel()
            out.set_exception(exc)
        else:
            finish()

    if ack is not None:
        ack.add_done_callback(on_ack)
    return out

"""Idempotent producer ids: issued by the broker, never twice, to one tenant, and forgotten
once idle.

A producer id names a producer's sequence numbers in the log (batch headers and each
partition's producer table). If an id came back after a power cut, the new producer's first
batch would collide with the old one's records: answered as a duplicate and never stored,
or refused as out of order forever. So an id is durable before it is handed out.

Syncing the state store for every producer would cost an fsync per connection; instead ids
are reserved in blocks (as Kafka's ``ProducerIdManager`` does): the end of the current block
is written and synced once per :attr:`ProducerIds.BLOCK` ids, and ids are then issued from
memory. After a restart issuing resumes at the durable end of the last block, so the ids of
a block cut short by a crash are skipped, never reused.

Only ids the broker issued are accepted, and only from the tenant they were issued to
(:meth:`ProducerIds.check`): a client-chosen id would grow every partition's producer table
without bound (each id is remembered with its last five batches) and dodge the tenant's
``producer-ids`` quota. Each issued id is a row of the ``producer_ids`` table (its tenant
and when it was issued; counted in the tenant's state-store bytes) and an entry in memory
with its last use. An id unused for ``expiration_ms`` (Kafka's
``transactional.id.expiration.ms`` / ``producer.id.expiration.ms``) is forgotten by
:meth:`ProducerIds.expire`; a batch that still carries it is refused with
``unknown_producer_id`` and the client asks for a new one. The partitions forget the id's
sequence state after the same time (``storage/producers.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec

from broker.errors import UnknownProducerId
from broker.quotas import Quotas
from storage.kv import KV, ROW_OVERHEAD

log = logging.getLogger("herald.broker")

# a producer_ids row: 8-byte key, msgpack [tenant, issued_ms] of at most 12 bytes + tenant
_ROW_FIXED = 8 + 12 + ROW_OVERHEAD


class _Reserved(msgspec.Struct, array_like=True):
    value: int


class IssuedId(msgspec.Struct, array_like=True):
    tenant: str
    issued_ms: int


class _Live:
    __slots__ = ("last_used_ms", "row_bytes", "tenant")

    def __init__(self, tenant: str, last_used_ms: int, row_bytes: int) -> None:
        self.tenant = tenant
        self.last_used_ms = last_used_ms
        self.row_bytes = row_bytes


def _key(pid: int) -> bytes:
    return pid.to_bytes(8, "big")


class ProducerIds:
    BLOCK = 1000
    _KEY = "producer_id"  # the row kept the last issued id before blocks; same meaning now

    def __init__(
        self,
        kv: KV,
        quotas: Quotas | None = None,
        *,
        expiration_ms: int = 24 * 3600 * 1000,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._kv = kv
        self._table = kv.table("counters", _Reserved)
        self._issued = kv.table("producer_ids", IssuedId)
        self.quotas = quotas
        self.expiration_ms = expiration_ms
        self._wall = wall_ms
        row = self._table.get(self._KEY)
        # ids up to the stored end may have been issued: start after it
        self._next = (row.value if row else 0) + 1
        self._end = self._next  # exclusive end of the block issued from memory
        self._lock = asyncio.Lock()
        self.live: dict[int, _Live] = {}

    @property
    def issued_below(self) -> int:
        """Every id ever issued (by this or an earlier run) is below this."""
        return self._end

    def load(self) -> int:
        """Read the issued ids (at start-up; in a worker thread for a large table). Their
        last use counts from now: a restart never expires an id sooner than its idle time
        says. Returns how many."""
        now = self._wall()
        for key, issued, size in self._issued.scan_sized():
            pid = int.from_bytes(key, "big")
            self.live[pid] = _Live(issued.tenant, now, size)
            if self.quotas is not None:
                usage = self.quotas.of(issued.tenant)
                usage.producer_ids += 1
                usage.state_store_bytes += size
        return len(self.live)

    async def issue(self, tenant: str = "*") -> int:
        """The next id, issued to ``tenant``: durable before it is returned (raises the
        state store's error if the reservation cannot be synced), within the tenant's
        ``producer-ids`` and state-store quotas (:class:`~broker.errors.QuotaExceeded`)."""
        usage = None
        if self.quotas is not None:
            usage = self.quotas.of(tenant)
            self.quotas.admit(usage, "producer_ids")
            self.quotas.admit(usage, "state_store_bytes", _ROW_FIXED + len(tenant.encode()))
            usage.producer_ids += 1  # taken before the wait, so waiters cannot all pass
        try:
            while self._next >= self._end:  # a loop: more than a block's worth may wait
                async with self._lock:
                    if self._next >= self._end:
                        end = self._next + self.BLOCK
                        self._table.put(self._KEY, _Reserved(end - 1))
                        await self._kv.sync()
                        self._end = end
            pid = self._next
            self._next += 1
            now = self._wall()
            change = self._issued.put_many([(_key(pid), IssuedId(tenant, now))])
        except BaseException:
            if usage is not None:
                usage.producer_ids -= 1
            raise
        self.live[pid] = _Live(tenant, now, change.bytes)
        if usage is not None:
            usage.state_store_bytes += change.bytes
        return pid

    def check(self, tenant: str, pid: int, now_ms: int) -> None:
        """Accept a batch of producer ``pid`` from ``tenant`` at ``now_ms`` (its last use),
        or raise :class:`UnknownProducerId`. O(1)."""
        live = self.live.get(pid)
        if live is None or live.tenant != tenant:
            raise UnknownProducerId(
                f"producer id {pid} was not issued to this tenant or has expired after "
                f"{self.expiration_ms} ms unused; get a new one with init_producer"
            )
        live.last_used_ms = now_ms

    def expire(self, now_ms: int | None = None) -> list[int]:
        """Forget ids unused for longer than ``expiration_ms``. Returns them."""
        now = self._wall() if now_ms is None else now_ms
        cutoff = now - self.expiration_ms
        gone = [pid for pid, live in self.live.items() if live.last_used_ms < cutoff]
        if not gone:
            return gone
        self._issued.delete_many([_key(pid) for pid in gone])
        for pid in gone:
            live = self.live.pop(pid)
            if self.quotas is not None:
                usage = self.quotas.of(live.tenant)
                usage.producer_ids -= 1
                usage.state_store_bytes -= live.row_bytes
        log.info("event=producer_ids_expired count=%d", len(gone))
        return gone

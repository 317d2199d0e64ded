"""Idempotent producer ids: issued by the broker, never twice.

A producer id names a producer's sequence numbers in the log (batch headers and each
partition's producer table). If an id came back after a power cut, the new producer's first
batch would collide with the old one's records: answered as a duplicate and never stored,
or refused as out of order forever. So an id is durable before it is handed out.

Syncing the state store for every producer would cost an fsync per connection; instead ids
are reserved in blocks (as Kafka's ``ProducerIdManager`` does): the end of the current block
is written and synced once per :attr:`ProducerIds.BLOCK` ids, and ids are then issued from
memory. After a restart issuing resumes at the durable end of the last block, so the ids of
a block cut short by a crash are skipped, never reused.
"""

from __future__ import annotations

import asyncio

import msgspec

from storage.kv import KV


class _Reserved(msgspec.Struct, array_like=True):
    value: int


class ProducerIds:
    BLOCK = 1000
    _KEY = "producer_id"  # the row kept the last issued id before blocks; same meaning now

    def __init__(self, kv: KV) -> None:
        self._kv = kv
        self._table = kv.table("counters", _Reserved)
        row = self._table.get(self._KEY)
        # ids up to the stored end may have been issued: start after it
        self._next = (row.value if row else 0) + 1
        self._end = self._next  # exclusive end of the block issued from memory
        self._lock = asyncio.Lock()

    @property
    def issued_below(self) -> int:
        """Every id ever issued (by this or an earlier run) is below this."""
        return self._end

    async def issue(self) -> int:
        """The next id, durable before it is returned (raises the state store's error if
        the reservation cannot be synced)."""
        while self._next >= self._end:  # a loop: more than a block's worth may be waiting
            async with self._lock:
                if self._next >= self._end:
                    end = self._next + self.BLOCK
                    self._table.put(self._KEY, _Reserved(end - 1))
                    await self._kv.sync()
                    self._end = end
        pid = self._next
        self._next += 1
        return pid

"""Dead letters: ``__dlq.<channel>`` holds every delivery that failed for good (a permanent
answer, or attempts exhausted) with the reason and every attempt; an LMDB index makes them
listable per tenant and channel, showable, replayable and purgeable.

Index: ``notify_dlq``: ``tenant\\0channel\\0delivery_id`` -> :class:`DeadIndex` (the dead
letter's JSON and where it is in the topic). The delivery worker writes the row in the same
step that appends the record, synced before it commits its input.

Replay re-appends the delivery to ``__deliver.<channel>`` with a fresh attempt count and the
same delivery id (so the receiver can still deduplicate) and a higher replay generation (so
the worker's dedupe set lets it through once), then drops the index row. Everything is
scoped by tenant: a tenant lists, shows, replays and purges only its own dead letters.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Final

import msgspec

from broker.client import Producer
from notify import ids
from notify.model import AuditRecord, DeadIndex, DeadLetter, Delivery
from storage.kv import KV, Txn

_encode = msgspec.json.Encoder().encode
_decode_letter = msgspec.json.Decoder(DeadLetter).decode
_audit = msgspec.msgpack.Encoder().encode
MAX_PAGE: Final = 1000


def dlq_topic(channel: str) -> str:
    return f"__dlq.{channel}"


def _key(tenant: str, channel: str, delivery_id: str = "") -> bytes:
    return f"{tenant}\0{channel}\0{delivery_id}".encode()


class DeadLetters:
    def __init__(self, kv: KV) -> None:
        self.kv = kv
        self.index = kv.table("notify_dlq", DeadIndex)

    def record(self, txn: Txn | None, letter: DeadLetter, partition: int) -> bytes:
        """Index a dead letter (the caller appends the same bytes to the topic)."""
        d = letter.delivery
        raw = _encode(letter)
        self.index.put(
            _key(d.tenant, d.channel, d.delivery_id),
            DeadIndex(letter=raw, partition=partition, dead_ms=letter.dead_ms),
            txn=txn,
        )
        return raw

    def page(
        self, tenant: str, channel: str, *, after: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        """Dead letters of ``tenant`` on ``channel`` in delivery-id order, after the id
        ``after`` (paging), at most ``limit`` (capped at 1000)."""
        prefix = _key(tenant, channel)
        start = prefix + after.encode() if after is not None else None
        rows = self.index.scan(prefix, after=start, limit=min(limit, MAX_PAGE))
        return [_decode_letter(row.letter) for _k, row in rows]

    def show(self, tenant: str, channel: str, delivery_id: str) -> DeadLetter | None:
        row = self.index.get(_key(tenant, channel, delivery_id))
        return None if row is None else _decode_letter(row.letter)

    def purge(self, tenant: str, channel: str, delivery_id: str) -> bool:
        return self.index.delete(_key(tenant, channel, delivery_id))

    async def replay(
        self,
        producer: Producer,
        tenant: str,
        channel: str,
        delivery_ids: Sequence[str] | None,
        *,
        now_ms: int,
    ) -> list[str]:
        """Send dead letters again (``delivery_ids``, or all of the tenant's on the
        channel). Returns the ids replayed; unknown ids are skipped. The index rows go only
        once the re-appended deliveries are durable."""
        if delivery_ids is None:
            letters: list[DeadLetter] = []
            after = None
            while True:
                page = self.page(tenant, channel, after=after, limit=MAX_PAGE)
                letters.extend(page)
                if len(page) < MAX_PAGE:
                    break
                after = page[-1].delivery.delivery_id
        else:
            found = (self.show(tenant, channel, i) for i in delivery_ids)
            letters = [x for x in found if x is not None]
        if not letters:
            return []
        acks = []
        for letter in letters:
            d = msgspec.structs.replace(
                letter.delivery,
                attempt=1,
                attempts=[],
                first_attempt_ms=None,
                due_ms=None,
                last_error=None,
                replay=letter.delivery.replay + 1,
            )
            key = ids.user_key(d.tenant, d.user)
            acks.append(producer.send_nowait(f"__deliver.{channel}", _encode(d), key=key))
            acks.append(
                producer.send_nowait(
                    "__audit",
                    _audit(
                        AuditRecord(
                            tenant=d.tenant,
                            event_id=d.event_id,
                            user=d.user,
                            run_id=d.run_id,
                            channel=channel,
                            delivery_id=d.delivery_id,
                            status="queued",
                            reason="replay",
                            detail=f"replay {d.replay} of a dead letter ({letter.reason})",
                            topic=d.topic,
                            at_ms=now_ms,
                        )
                    ),
                    key=f"{d.tenant}\0{d.event_id}".encode(),
                )
            )
        await asyncio.gather(*acks)
        self.index.delete_many([_key(tenant, channel, x.delivery.delivery_id) for x in letters])
        return [x.delivery.delivery_id for x in letters]


def letter_of(delivery: Delivery, reason: str, now_ms: int) -> DeadLetter:
    return DeadLetter(
        delivery=delivery, reason=reason, attempts=list(delivery.attempts), dead_ms=now_ms
    )

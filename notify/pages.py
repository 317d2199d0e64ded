"""Pages: what one event does to many recipients alike, as one record instead of one each.

A fan-out of one event to 10,000 subscribers makes 10,000 deliveries that differ only in the
user and two ids, and 10,000 ``queued`` audit transitions that differ in the same; a delivery
worker's batch makes as many ``delivered`` ones. Encoding, appending, fetching, decoding and
folding each as a record of its own was most of the engine's cost per delivery. A page says
the shared part once and the per-user part as parallel lists, encoded with one msgspec call:

- :class:`~notify.model.DeliveryPage` in ``__deliver.<channel>``: deliveries of one event on
  one channel to the users of one partition (a user's deliveries stay on the user's
  partition, so order per user holds exactly as with one record each). The worker expands a
  page into the :class:`~notify.model.Delivery` each user would have had (:func:`expand`).
  The page is also the record of its deliveries' ``queued`` transition: the audit indexer
  reads it as the ``queued`` audit page it stands for (``notify.audit.queued_page``).
- :class:`~notify.model.AuditPage` in ``__audit``: one transition of one event on one
  channel for many users (``delivered`` at the first attempt, ``shed``); the audit indexer
  folds it as the records it stands for (``notify.audit``).

Single forms stay for everything else (retries, replays, batch digests, suppressions,
deferrals): a page is a msgpack array, a Delivery a JSON object and an AuditRecord a msgpack
map, so the first byte tells them apart (:func:`is_page`). Builders are groups of the stage's
:class:`~notify.stage.Outbox`: rows go in while the outbox fills, and each builder is
encoded once when the outbox is sent, at most :data:`MAX_PAGE_ROWS` rows per record.
"""

from __future__ import annotations

from typing import Final

import msgspec

from notify.model import AuditPage, Delivery, DeliveryPage

MAX_PAGE_ROWS: Final = 1000  # rows per page record (~100 bytes each, plus the event's data)

_encode = msgspec.msgpack.Encoder().encode
decode_delivery_page = msgspec.msgpack.Decoder(DeliveryPage).decode
decode_audit_page = msgspec.msgpack.Decoder(AuditPage).decode


def is_page(value: bytes) -> bool:
    """Whether a record's value is a page (a msgpack array) rather than a single record."""
    if not value:
        return False
    first = value[0]
    return 0x90 <= first <= 0x9F or first == 0xDC or first == 0xDD


def _chunks(n: int) -> range:
    return range(0, n, MAX_PAGE_ROWS)


class DeliveryRows:
    """An open :class:`DeliveryPage` (a strict group: a single delivery added to its
    partition after it seals it first, so one user's deliveries keep their order)."""

    __slots__ = ("delivery_ids", "head", "run_ids", "steps", "users")
    strict = True

    def __init__(
        self,
        *,
        tenant: str,
        event_id: str,
        topic: str,
        channel: str,
        priority: str,
        category: str | None,
        data: bytes,
        created_ms: int,
        strict_order: bool,
    ) -> None:
        self.head = (
            tenant,
            event_id,
            topic,
            channel,
            priority,
            category,
            data,
            created_ms,
            strict_order,
        )
        self.users: list[str] = []
        self.run_ids: list[str] = []
        self.delivery_ids: list[str] = []
        self.steps: list[int] = []

    def add(self, user: str, run_id: str, delivery_id: str, step: int) -> None:
        self.users.append(user)
        self.run_ids.append(run_id)
        self.delivery_ids.append(delivery_id)
        self.steps.append(step)

    def __len__(self) -> int:
        return len(self.users)

    def pages(self) -> list[DeliveryPage]:
        """The pages (of at most :data:`MAX_PAGE_ROWS` rows) this group stands for."""
        return [
            DeliveryPage(
                *self.head,
                self.users[i : i + MAX_PAGE_ROWS],
                self.run_ids[i : i + MAX_PAGE_ROWS],
                self.delivery_ids[i : i + MAX_PAGE_ROWS],
                self.steps[i : i + MAX_PAGE_ROWS],
            )
            for i in _chunks(len(self.users))
        ]

    def seal(self) -> list[bytes]:
        return [_encode(page) for page in self.pages()]


class AuditRows:
    """An open :class:`AuditPage`. Not strict: the indexer folds each (event, user,
    channel) by the rank of its statuses, and the single records that may interleave with
    a page (a suppression, a deferral) concern other users or channels of the event."""

    __slots__ = ("delivery_ids", "head", "run_ids", "users")
    strict = False

    def __init__(
        self,
        *,
        tenant: str,
        event_id: str,
        topic: str | None,
        channel: str,
        status: str,
        reason: str | None,
        detail: str | None,
        attempt: int | None,
        at_ms: int,
    ) -> None:
        self.head = (tenant, event_id, topic, channel, status, reason, detail, attempt, at_ms)
        self.users: list[str] = []
        self.run_ids: list[str] = []
        self.delivery_ids: list[str] = []

    def add(self, user: str, run_id: str, delivery_id: str) -> None:
        self.users.append(user)
        self.run_ids.append(run_id)
        self.delivery_ids.append(delivery_id)

    def extend(self, users: list[str], run_ids: list[str], delivery_ids: list[str]) -> None:
        self.users.extend(users)
        self.run_ids.extend(run_ids)
        self.delivery_ids.extend(delivery_ids)

    def __len__(self) -> int:
        return len(self.users)

    def seal(self) -> list[bytes]:
        return [
            _encode(
                AuditPage(
                    *self.head,
                    self.users[i : i + MAX_PAGE_ROWS],
                    self.run_ids[i : i + MAX_PAGE_ROWS],
                    self.delivery_ids[i : i + MAX_PAGE_ROWS],
                )
            )
            for i in _chunks(len(self.users))
        ]


def encode_audit_page(page: AuditPage) -> bytes:
    return _encode(page)


def expand(page: DeliveryPage) -> list[Delivery]:
    """The deliveries a page stands for, as the single form carries them."""
    data = msgspec.Raw(page.data)
    return [
        Delivery(
            delivery_id=did,
            run_id=run_id,
            event_id=page.event_id,
            tenant=page.tenant,
            user=user,
            channel=page.channel,
            topic=page.topic,
            step=step,
            priority=page.priority,
            category=page.category,
            data=data,
            created_ms=page.created_ms,
            strict_order=page.strict_order,
        )
        for user, run_id, did, step in zip(
            page.users, page.run_ids, page.delivery_ids, page.steps, strict=True
        )
    ]

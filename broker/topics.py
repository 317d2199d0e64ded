"""Topics as the broker sees them: names, ownership, visibility, creation and deletion, and
partition choice.

Names: 1-200 characters of ``[A-Za-z0-9._-]``, not ``.`` or ``..``. Names starting with
``__`` are reserved for Herald's internal topics (the product's queues: ``__events``,
``__deliver.<channel>``, ...), which live in the same log but are created only by the node
and shown only to the operator.

Ownership: each topic belongs to the tenant that created it, recorded in the topic's own
``topic.meta`` (storage writes it with the topic, fsynced before the create is answered), so
a topic never outlives or predates its owner after a power cut.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Final

import msgspec

from broker import protocol as p
from broker.auth import OPERATOR_TENANT, Principal
from broker.config import Config
from broker.errors import InvalidRequest, InvalidTopic, TopicExists, UnknownTopic
from broker.protocol import partition_for_key
from storage.kv import KV
from storage.log import Log

log = logging.getLogger("herald.broker")

INTERNAL_PREFIX: Final = "__"
EVENTS_TOPIC: Final = "__events"
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


def validate_topic_name(name: str, *, internal: bool = False) -> str:
    if not _NAME.match(name) or name in (".", ".."):
        raise InvalidTopic(
            f"invalid topic name {name!r}: use 1-200 characters of letters, digits, '.', '_', '-'"
        )
    if name.startswith(INTERNAL_PREFIX) and not internal:
        raise InvalidTopic(f"topic names starting with {INTERNAL_PREFIX!r} are reserved")
    return name


def is_internal(name: str) -> bool:
    return name.startswith(INTERNAL_PREFIX)


class TopicOwner(msgspec.Struct, array_like=True):
    tenant: str


__all__ = ["partition_for_key"]  # the wire's contract (broker/protocol.py), re-exported here


class Topics:
    """The node's topics as tenants see them (wraps :class:`storage.log.Log`)."""

    def __init__(self, config: Config, log_: Log, kv: KV) -> None:
        self.config = config
        self.log = log_
        # owners of topics created before the owner moved into topic.meta
        self._legacy_owners = kv.table("topic_owners", TopicOwner)
        self._legacy_cache: dict[str, str | None] = {}
        self.on_change: Callable[[], None] = lambda: None

    def owner_of(self, topic: str) -> str | None:
        meta = self.log.topics.get(topic)
        if meta is None:
            return None
        if meta.owner is not None:
            return meta.owner
        try:
            return self._legacy_cache[topic]
        except KeyError:
            row = self._legacy_owners.get(topic)
            owner = self._legacy_cache[topic] = row.tenant if row else None
            return owner

    def visible(self, principal: Principal, topic: str) -> bool:
        if topic not in self.log.topics:
            return False
        if principal.operator:
            return True
        if is_internal(topic):
            return False
        return self.owner_of(topic) == principal.tenant

    def partition_count(self, topic: str) -> int | None:
        meta = self.log.topics.get(topic)
        return meta.partitions if meta else None

    def ensure_internal(self, name: str, partitions: int) -> None:
        """Create the internal topic ``name`` if it does not exist yet."""
        if name not in self.log.topics:
            self.log.create_topic(
                name,
                partitions,
                self.config.partition_config(),
                internal=True,
                owner=OPERATOR_TENANT,
            )
            self.on_change()

    def create(
        self,
        principal: Principal,
        name: str,
        *,
        partitions: int | None = None,
        retention_ms: int | None = None,
        retention_bytes: int | None = None,
        exist_ok: bool = False,
    ) -> tuple[p.TopicInfo, bool]:
        validate_topic_name(name)
        n = self.config.topics.partitions if partitions is None else partitions
        if not 1 <= n <= 10_000:
            raise InvalidRequest("partitions must be in [1, 10000]", field="partitions")
        for fld, val in (("retention_ms", retention_ms), ("retention_bytes", retention_bytes)):
            if val is not None and val <= 0:
                raise InvalidRequest(f"{fld} must be positive", field=fld)
        if name in self.log.topics:
            if exist_ok and self.visible(principal, name):
                return self.info(name), False
            raise TopicExists(f"topic {name!r} already exists")
        cfg = self.config.partition_config(
            retention_ms=retention_ms if retention_ms is not None else "default",
            retention_bytes=retention_bytes if retention_bytes is not None else "default",
        )
        self.log.create_topic(name, n, cfg, owner=principal.tenant)
        self.on_change()
        log.info("event=topic_created topic=%s partitions=%d tenant=%s", name, n, principal.tenant)
        return self.info(name), True

    async def delete(self, principal: Principal, name: str) -> None:
        if not self.visible(principal, name) or is_internal(name):
            raise UnknownTopic(f"unknown topic {name!r}")
        await self.log.delete_topic(name)
        self._legacy_cache.pop(name, None)
        self._legacy_owners.delete(name)
        self.on_change()
        log.info("event=topic_deleted topic=%s tenant=%s", name, principal.tenant)

    def usable(self, principal: Principal, topic: str, *, produce: bool) -> int:
        """Partition count of a topic the principal may use, auto-creating it on produce
        when the config allows. Raises :class:`UnknownTopic` otherwise."""
        if self.visible(principal, topic):
            return self.log.topics[topic].partitions
        if (
            produce
            and topic not in self.log.topics
            and self.config.topics.auto_create
            and not is_internal(topic)
        ):
            try:
                validate_topic_name(topic)
            except InvalidTopic:
                raise UnknownTopic(f"unknown topic {topic!r}") from None
            self.log.create_topic(
                topic,
                self.config.topics.partitions,
                self.config.partition_config(),
                owner=principal.tenant,
            )
            self.on_change()
            log.info("event=topic_auto_created topic=%s tenant=%s", topic, principal.tenant)
            return self.log.topics[topic].partitions
        raise UnknownTopic(f"unknown topic {topic!r}")

    def info(self, name: str) -> p.TopicInfo:
        meta = self.log.topics[name]
        parts = []
        for i in range(meta.partitions):
            part = self.log.partition(name, i)
            parts.append(
                p.PartitionInfo(
                    partition=i,
                    leader=self.config.node_id,
                    log_start_offset=part.log_start_offset,
                    high_watermark=part.high_watermark,
                    size_bytes=part.size_bytes,
                    segments=len(part.segments),
                )
            )
        return p.TopicInfo(
            name=name,
            partitions=parts,
            internal=meta.internal,
            retention_ms=meta.config.retention_ms,
            retention_bytes=meta.config.retention_bytes,
        )

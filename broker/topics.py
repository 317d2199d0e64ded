"""Topic names, ownership and partition choice.

Names: 1-200 characters of ``[A-Za-z0-9._-]``, not ``.`` or ``..``. Names starting with
``__`` are reserved for Herald's internal topics (the product's queues: ``__events``,
``__deliver.<channel>``, ...), which live in the same log but are created only by the node
and shown only to the operator.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final, Protocol

import msgspec
import xxhash

INTERNAL_PREFIX: Final = "__"
EVENTS_TOPIC: Final = "__events"
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


class InvalidTopic(Exception):
    code = "invalid_topic"


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


def partition_for_key(key: bytes, partitions: int) -> int:
    """Stable key -> partition: xxh3_64 of the key modulo the partition count. Clients and
    the broker use the same function, so either may choose."""
    return xxhash.xxh3_64_intdigest(key) % partitions


class PendingSync(Protocol):
    """What the sticky partitioner reads of a partition (``storage.partition.Partition``)."""

    @property
    def high_watermark(self) -> int: ...

    @property
    def log_end_offset(self) -> int: ...

    @property
    def offline(self) -> bool: ...


class StickyPartitioner:
    """Where records without a key go, so that those arriving together share one fsync.

    Hashing a fresh id per keyless record spreads one round of concurrent appends over every
    partition, and each partition touched costs its own ``fdatasync``. Instead (like Kafka's
    sticky partitioner, KIP-480) keyless records stay on the current partition while it has an
    append waiting for its sync (``high_watermark < log_end_offset``): they join that sync.
    Once it has none, the next keyless record moves on to the next partition in turn, so over
    time every partition gets its share. Two more reasons to move on: the current partition is
    offline (its appends would all fail), or it has taken ``switch_bytes`` since it was chosen
    (under unbroken load a partition never catches up, and one partition would take every
    keyless record, leaving the consumers of the others idle). Keyless records have no order
    to keep, so any partition is right for them.
    """

    def __init__(self, switch_bytes: int = 1 << 20) -> None:
        self.switch_bytes = switch_bytes
        self._current = -1
        self._taken = 0  # bytes sent to the current partition since it was chosen

    def choose(self, partitions: Sequence[PendingSync], size: int) -> int:
        """The partition for one keyless record of ``size`` bytes."""
        n = len(partitions)
        cur = self._current
        if 0 <= cur < n and self._taken < self.switch_bytes:
            part = partitions[cur]
            if part.high_watermark < part.log_end_offset and not part.offline:
                self._taken += size
                return cur
        nxt = (cur + 1) % n
        for step in range(1, n + 1):
            if not partitions[(cur + step) % n].offline:
                nxt = (cur + step) % n
                break
        self._current, self._taken = nxt, size
        return nxt

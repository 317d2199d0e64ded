"""Topic names, ownership and partition choice.

Names: 1-200 characters of ``[A-Za-z0-9._-]``, not ``.`` or ``..``. Names starting with
``__`` are reserved for Herald's internal topics (the product's queues: ``__events``,
``__deliver.<channel>``, ...), which live in the same log but are created only by the node
and shown only to the operator.
"""

from __future__ import annotations

import re
from typing import Final

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

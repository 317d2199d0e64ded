"""Stable identities of the notifications core (``docs/NOTIFY.md`` § Identities). Pure.

Every id is a hash of what the thing *is*, never of when or where it was computed, so a stage
that redoes its input after a crash produces the same ids and everything downstream (the
delivery workers' dedupe set, a receiver deduplicating on ``webhook-id``) sees each thing once.

- ``run_id`` = xxh3_128(tenant, event_id, user): one workflow run per recipient; also the
  user-facing notification id (feed entry).
- ``delivery_id`` = xxh3_128(seed, channel, step index) where the seed is the run id, or for
  the message a closed batch sends, the batch id.
- ``batch_id`` = xxh3_128(tenant, user, topic, step index, batch key, the opening run's id).
- ``timer_id`` = xxh3_128(run or batch id, kind, step index): one parked wait per place.

Fields are joined with NUL, which no id, tenant or user name contains.
"""

from __future__ import annotations

import xxhash

_h = xxhash.xxh3_128_hexdigest


def run_id(tenant: str, event_id: str, user: str) -> str:
    return _h(f"{tenant}\0{event_id}\0{user}".encode())


def delivery_id(seed: str, channel: str, step: int) -> str:
    return _h(f"{seed}\0{channel}\0{step}".encode())


def batch_id(tenant: str, user: str, topic: str, step: int, key: str, opener: str) -> str:
    return _h(f"b\0{tenant}\0{user}\0{topic}\0{step}\0{key}\0{opener}".encode())


def timer_id(owner: str, kind: str, step: int) -> str:
    return _h(f"t\0{owner}\0{kind}\0{step}".encode())


def user_key(tenant: str, user: str) -> bytes:
    """The record key of a user's deliveries: one user's records share a partition."""
    return f"{tenant}\0{user}".encode()

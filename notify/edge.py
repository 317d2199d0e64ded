"""What the WebSocket gateway asks the notifications core, answered from the engine, the
registry and the policy (the gateway imports none of them: ``herald/node.py`` hands it these).

- :class:`EngineEngagement`: a client's ``seen`` / ``read`` / ``archived`` of an in-app
  message becomes the engine's engagement mark of the user's notification of that event
  (``Engine.mark``: the audit, ``GET /events/{id}``, ``wait_seen``), and the counts the
  gateway sends come from the user's feed.
- :class:`EdgeAudience`: which connected users a broadcast may reach, decided at the edge by
  the same rules a fanned-out in-app delivery meets (``docs/NOTIFY.md`` § Policy order) where
  they apply to a message that is already being shown: a legal opt-out of ``inapp`` (always),
  then, unless the topic is mandatory, a plain opt-out and the preference rules for
  (topic or category) x ``inapp``. Caps and quiet hours do not apply to a broadcast.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Final

from notify import ids, policy
from notify.engine import Engine
from notify.registry import Registry

CHANNEL: Final = "inapp"
FEED_SCAN: Final = 200  # feed items read to count the unseen ones


class EngineEngagement:
    """Engagement marks and counts through the engine.

    A client may mark a message the instant it is shown, before the audit indexer has
    folded the notification's ``queued`` record into the feed (a few ms after the fan-out,
    more under load); the mark is then tried again for up to ``wait_s`` rather than lost,
    since a lost ``seen`` would let ``wait_seen`` escalate a message the user saw."""

    def __init__(self, engine: Engine, *, wait_s: float = 3.0) -> None:
        self.engine = engine
        self.wait_s = wait_s

    async def mark(self, tenant: str, user: str, event_id: str, what: str) -> bool:
        notification = ids.run_id(tenant, event_id, user)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while True:
            if await self.engine.mark(tenant, user, notification, what):
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)

    def counts(self, tenant: str, user: str) -> tuple[int, int]:
        """(unseen, unread): unread is the feed's count; unseen is counted over the newest
        ``FEED_SCAN`` notifications (a bound on the cost of a connect)."""
        feed = self.engine.feed(tenant, user, limit=FEED_SCAN)
        unseen = sum(1 for item in feed["items"] if not item["seen"])
        return unseen, int(feed["unread"])

    def counts_after(
        self, tenant: str, user: str, before: tuple[int, int], missing: int
    ) -> tuple[int, int]:
        """(unseen, unread) after new notifications reached the user, from the counts sent
        ``before`` and ``missing`` (shown, not in the feed yet): one read of the unread count
        instead of a feed scan; every notification new to the feed is unseen and unread,
        so unseen grows by as much as unread did (read implies seen: never above unread)."""
        n = self.engine.index.unread.get(f"{tenant}\0{user}")
        unread = (n.count if n is not None else 0) + missing
        unseen = before[0] + unread - before[1]
        return max(0, min(unseen, unread, FEED_SCAN)), unread

    def not_in_feed(self, tenant: str, user: str, event_ids: list[str]) -> list[str]:
        """Those of ``event_ids`` whose notification to the user the audit indexer has not
        folded into the feed yet (one state-store read each)."""
        notes = self.engine.index.notes
        return [
            event_id
            for event_id in event_ids
            if notes.get(f"{tenant}\0{user}\0{ids.run_id(tenant, event_id, user)}") is None
        ]


class EdgeAudience:
    """``audience(tenant, users, topic, category)`` for the gateway's broadcasts."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def __call__(
        self, tenant: str, users: Iterable[str], topic: str, category: str | None
    ) -> set[str]:
        reg = self.registry
        defaults = reg.defaults(tenant)
        mandatory = reg.is_mandatory(tenant, topic)
        out = set()
        for user in users:
            profile = reg.profile(tenant, user)
            if profile is not None:
                if policy.legal_opt_out(profile, CHANNEL) is not None:
                    continue
                if not mandatory and policy.plain_opt_out(profile, CHANNEL) is not None:
                    continue
            if not mandatory and (profile is not None or defaults is not None):
                prefs = profile.preferences if profile is not None else None
                if policy.preference(prefs, defaults, topic, category, CHANNEL) is not None:
                    continue
            out.add(user)
        return out

"""A computed audience for the notification benchmarks (the engine's directory seam,
``notify.ports.Directory``): topic ``crowd-<n>`` has the ``n`` subscribers ``u0000000`` ..
``u<n-1>`` on one channel; every user's webhook is ``<base>/hook/<user>``; ``slow-<n>``
topics have the same audience behind a one-hour delay. Nothing is stored, so the benchmark
measures the engine, not a registry (the registry's own cost is measured on its own)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from channels.base import WebhookAddress
from notify.model import Workflow
from notify.ports import Occasion, Ruling, Subscriber
from notify.runs import Go, Verdict
from notify.workflows import Send

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class _Person:
    __slots__ = ("user",)

    def __init__(self, user: str) -> None:
        self.user = user

    def fields(self) -> dict[str, Any]:
        return {"id": self.user}


class Audience:
    def __init__(self, channel: str, base: str = "http://127.0.0.1:9") -> None:
        self.channel = channel
        self.base = base
        self._go = Go()

    @staticmethod
    def size(topic: str) -> int:
        try:
            return int(topic.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            return 0

    def workflow(self, tenant: str, topic: str) -> Workflow | None:
        if topic.startswith("slow-"):
            return Workflow(steps=[{"delay": "1h"}, {"channel": self.channel}])
        return None

    def subscribers(
        self, tenant: str, topic: str, after: str | None, limit: int
    ) -> Sequence[Subscriber]:
        n = self.size(topic)
        start = int(after[1:]) + 1 if after is not None else 0
        chans = (self.channel,)
        return [Subscriber(f"u{i:07d}", chans) for i in range(start, min(n, start + limit))]

    def subscriptions(
        self, tenant: str, users: Sequence[str], topic: str
    ) -> Mapping[str, Subscriber]:
        return {u: Subscriber(u, (self.channel,)) for u in users}

    def rulings(self, tenant: str, users: Sequence[str]) -> Mapping[str, Ruling]:
        return {u: _Person(u) for u in users}

    def decide(
        self, occasion: Occasion, ruling: Ruling, step: Send, now_ms: int, tag: str
    ) -> Verdict:
        return self._go

    def throttle(
        self, tenant: str, user: str, key: str, max_: int, per_ms: int, now_ms: int, tag: str
    ) -> bool:
        return True

    def record(
        self, tenant: str, user: str, charges: Sequence[object], now_ms: int, tag: str
    ) -> None:
        return None

    def address(self, tenant: str, user: str, channel: str) -> object | None:
        return WebhookAddress(url=f"{self.base}/hook/{user}", secrets=(SECRET,))

    def legal_opt_out(
        self,
        tenant: str,
        user: str,
        channel: str,
        *,
        topic: str | None = None,
        category: str | None = None,
    ) -> str | None:
        return None

    def invalidate(
        self,
        tenant: str,
        user: str,
        channel: str,
        what: str,
        detail: str,
        *,
        tokens: Sequence[str] = (),
    ) -> None:
        return None

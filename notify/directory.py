"""Directories: the answers to the engine's questions (``notify.ports.Directory``).

:class:`EmptyDirectory` is what a node has before a registry is plugged in: no workflows, no
subscribers, no contact data, no preferences. Events with explicit ``users`` still flow (the
default channels, e.g. the console), which is what ``make serve`` shows. The registry's adapter
(``notify.registry`` + ``notify.policy``) replaces it in ``herald/node.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from notify.model import Workflow
from notify.ports import Occasion, Ruling, Subscriber
from notify.runs import Go, Verdict
from notify.workflows import Send


class _Nobody:
    __slots__ = ("user",)

    def __init__(self, user: str) -> None:
        self.user = user

    def fields(self) -> dict[str, Any]:
        return {"id": self.user}


class EmptyDirectory:
    def workflow(self, tenant: str, topic: str) -> Workflow | None:
        return None

    def subscribers(
        self, tenant: str, topic: str, after: str | None, limit: int
    ) -> Sequence[Subscriber]:
        return []

    def subscriptions(
        self, tenant: str, users: Sequence[str], topic: str
    ) -> Mapping[str, Subscriber]:
        return {}

    def rulings(self, tenant: str, users: Sequence[str]) -> Mapping[str, Ruling]:
        return {u: _Nobody(u) for u in users}

    def decide(
        self, occasion: Occasion, ruling: Ruling, step: Send, now_ms: int, tag: str
    ) -> Verdict:
        return Go()

    def throttle(
        self, tenant: str, user: str, key: str, max_: int, per_ms: int, now_ms: int, tag: str
    ) -> bool:
        return True

    def record(
        self, tenant: str, user: str, charges: Sequence[object], now_ms: int, tag: str
    ) -> None:
        return None

    def address(self, tenant: str, user: str, channel: str) -> object | None:
        return None

    def legal_opt_out(self, tenant: str, user: str, channel: str) -> str | None:
        return None

    def invalidate(self, tenant: str, user: str, channel: str, what: str, detail: str) -> None:
        return None

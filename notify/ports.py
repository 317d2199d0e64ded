"""The engine's one seam to the registry and the policy: :class:`Directory`.

The engine (fan-out, timers, delivery) asks the registry and the policy only these questions,
batched where it matters (one call per page of recipients). ``notify/directory.py`` answers
them from ``notify.registry`` and ``notify.policy``; tests answer them from plain dicts. A
change in the registry's or the policy's API is a change to that adapter, not to the engine.

Every call is synchronous and quick (LMDB reads, pure decisions): the engine calls them on the
event loop between awaits. Writes (:meth:`Directory.record`, :meth:`Directory.invalidate`)
go into LMDB without a sync; the caller syncs before it commits its input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from notify.conditions import Predicate
from notify.model import Workflow
from notify.runs import Verdict
from notify.workflows import Send


class Subscriber(NamedTuple):
    """One subscriber of a topic: the channels they subscribed with and their filter
    (None: every event of the topic). A named tuple: a page of a thousand is made per
    page of a fan-out, and a tuple costs a fraction of a frozen dataclass to build."""

    user: str
    channels: tuple[str, ...]
    filter: Predicate | None = None


@dataclass(frozen=True, slots=True)
class Occasion:
    """What the policy knows of one event (built once per event)."""

    tenant: str
    topic: str
    category: str | None
    priority: str
    data: Any
    fields: Mapping[str, Any]


class Ruling(Protocol):
    """What the directory holds on one recipient for the policy (opaque to the engine)
    and the ``recipient.*`` fields conditions see."""

    def fields(self) -> dict[str, Any]: ...


class Directory(Protocol):
    def workflow(self, tenant: str, topic: str) -> Workflow | None:
        """The topic's workflow body, None when the topic has none (default plan)."""

    def subscribers(
        self, tenant: str, topic: str, after: str | None, limit: int
    ) -> Sequence[Subscriber]:
        """At most ``limit`` subscribers of ``topic`` in user order, strictly after the
        user ``after`` (None: from the first). Costs one seek per page."""

    def subscriptions(
        self, tenant: str, users: Sequence[str], topic: str
    ) -> Mapping[str, Subscriber]:
        """The subscriptions of ``users`` (explicit recipients) to ``topic``: absent when
        a user has none."""

    def rulings(self, tenant: str, users: Sequence[str]) -> Mapping[str, Ruling]:
        """What the policy needs of each user (one read per user), for :meth:`decide`."""

    def decide(
        self, occasion: Occasion, ruling: Ruling, step: Send, now_ms: int, tag: str
    ) -> Verdict:
        """The policy's verdict for one channel step (``docs/NOTIFY.md`` § Policy order).
        ``tag`` is the delivery id (cap windows count a delivery once)."""

    def throttle(
        self,
        tenant: str,
        user: str,
        key: str,
        max_: int,
        per_ms: int,
        now_ms: int,
        tag: str,
    ) -> bool:
        """Whether a run passes a throttle window (``key`` names it), counting it if so
        (idempotent per ``tag``: a redone run passes again). Written without a sync."""

    def record(
        self, tenant: str, user: str, charges: Sequence[object], now_ms: int, tag: str
    ) -> None:
        """Count one queued delivery in the policy's cap windows (``charges`` from a
        :class:`~notify.runs.Go`); idempotent per ``tag``. Written without a sync."""

    def address(self, tenant: str, user: str, channel: str) -> object | None:
        """Where ``channel`` reaches ``user`` now (``channels.base.Address``), None if
        nowhere (looked up at send time, so a retry goes to the current address)."""

    def legal_opt_out(
        self,
        tenant: str,
        user: str,
        channel: str,
        *,
        topic: str | None = None,
        category: str | None = None,
    ) -> str | None:
        """The legal opt-out of ``channel`` (or of the channel for ``topic`` or ``category``)
        in force for ``user`` (its detail), else None. Checked again just before each send:
        it wins over mandatory and critical."""

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
        """A channel said the contact data is dead (``endpoint``, ``token``, ``address``), or
        that the user revoked consent at the provider (``consent``: recorded as a legal
        opt-out). ``tokens`` names the push device tokens found dead. Written without a sync
        (the worker syncs before it commits)."""

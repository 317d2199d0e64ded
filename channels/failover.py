"""Provider failover: a channel's providers in order, each behind its own circuit breaker.

A send goes to the first provider whose breaker admits it. A provider whose breaker is open
is skipped without a request, so while the primary is down the next one takes the traffic.
When the primary's cool-down has passed its breaker lets one probe through (half-open): the
next send is tried there first, and if it succeeds the breaker closes and traffic is back on
the primary; if it fails the breaker opens again (for twice as long) and that same send goes
on to the next provider.

Within one send, a failure moves on to the next provider only when the message certainly
was not taken (the attempt says ``failover``: a refused connection, an HTTP error answer).
A timeout or a connection lost after the request left does not: the provider may have taken
the message, and a second provider would send it twice; the core retries later instead.

When every breaker refuses, the answer is ``retry(circuit_open)`` after the shortest
remaining cool-down.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from channels.base import Outcome, Retry
from channels.breaker import BreakerState, CircuitBreaker
from channels.config import BreakerConfig
from channels.responses import Health

log = logging.getLogger("herald.channels.failover")

P = TypeVar("P")


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one provider made of one send: the outcome, what it says of the provider's
    health, and whether the next provider may be tried at once (the message was not taken)."""

    outcome: Outcome
    health: Health
    failover: bool = False


@dataclass(slots=True)
class Member(Generic[P]):
    name: str
    provider: P
    breaker: CircuitBreaker
    sent: int = 0


class ProviderChain(Generic[P]):
    """The providers of one channel, in failover order. Not thread-safe; asyncio-safe."""

    def __init__(
        self,
        channel: str,
        providers: Sequence[tuple[str, P]],
        breaker: BreakerConfig,
        monotonic: Callable[[], float],
    ) -> None:
        self.channel = channel
        self.members: list[Member[P]] = []
        for name, provider in providers:
            self.members.append(
                Member(name, provider, CircuitBreaker(breaker, monotonic, self._logger(name)))
            )

    def breaker_states(self) -> list[str]:
        """Each provider's breaker state (``closed``, ``open``, ``half_open``), in order."""
        return [m.breaker.state.value for m in self.members]

    def _logger(self, name: str) -> Callable[[BreakerState, BreakerState, str], None]:
        def on_transition(old: BreakerState, new: BreakerState, why: str) -> None:
            log.warning(
                "event=breaker_%s channel=%s provider=%s from=%s why=%s",
                new.value,
                self.channel,
                name,
                old.value,
                why,
            )

        return on_transition

    def states(self) -> dict[str, str]:
        """Each provider's breaker state, by name (for logs, metrics and tests)."""
        return {m.name: m.breaker.state.value for m in self.members}

    async def send(self, attempt: Callable[[P], Awaitable[Attempt]]) -> Outcome:
        """Try ``attempt`` on the providers in order, as the module docstring says."""
        if not self.members:
            return Outcome.retry(None, "no_provider", detail=f"no {self.channel} provider set")
        waits: list[float] = []
        last: Outcome | None = None
        for m in self.members:
            ticket = m.breaker.admit()
            if ticket is None:
                waits.append(m.breaker.retry_after())
                continue
            result: Attempt | None = None
            try:
                result = await attempt(m.provider)
            finally:
                health = result.health if result is not None else "unknown"
                if health == "success":
                    m.breaker.success(ticket)
                elif health == "failure":
                    m.breaker.failure(ticket)
                else:
                    m.breaker.release(ticket)
            m.sent += 1
            outcome = result.outcome
            if result.failover and isinstance(outcome, Retry):
                last = _named(outcome, m.name)
                waits.append(m.breaker.retry_after())
                continue
            return outcome if not isinstance(outcome, Retry) else _named(outcome, m.name)
        if last is not None:
            return last
        return Outcome.retry(
            min(waits) if waits else None,
            "circuit_open",
            detail=f"every {self.channel} provider's breaker is open",
        )


def _named(outcome: Retry, provider: str) -> Retry:
    detail = f"{provider}: {outcome.detail}" if outcome.detail else provider
    return Outcome.retry(outcome.after_s, outcome.reason, detail=detail[:300])

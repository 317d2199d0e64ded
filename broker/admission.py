"""Admission control, pure: which connections the node takes, which it sheds, and how many
bytes it holds for clients. No sockets and no event loop; the clock is an argument.
``broker/listener.py`` applies it to every listener (TCP, HTTP, later the WebSocket gateway),
so every door of the node obeys one policy (uvicorn's ``flow_control`` is the model: one
small class every protocol shares).

The threat (``docs/SECURITY.md``): a client without a key must not be able to take what the
node needs to serve the clients that have one. So:

- **Connections** come out of one budget derived from the open-files limit minus a reserve
  for the node's own files (segments, indexes, LMDB, logs), so no flood of sockets can leave
  the storage without a descriptor. Each listener has its own cap inside it.
- A connection is **pending** until it proves itself (a valid ``hello`` or HTTP request with
  a key; on a node without keys, its first well-formed request). Pending connections may
  hold at most a share of the budget and a few per source address, and must prove themselves
  within the handshake timeout. When the budget or the pending share is full, a new
  connection evicts the *oldest pending* one rather than being refused: an anonymous flood
  then only churns its own connections, and a client that proved a key is never evicted.
- **Bytes**: :class:`ByteBudget` bounds, node-wide and per tenant (all unauthenticated
  connections count as one holder), the request bytes being received (HTTP bodies, partial
  TCP frames) and the reply bytes queued for clients.
- **Key guessing**: :class:`AuthThrottle` allows each source address a few failed keys a
  minute; past that its keys are not even checked until the allowance refills.
- **Logs**: :class:`LogLimiter` keeps a flood from becoming a flood of log lines.

Source addresses are compared by :func:`address_key`: an IPv4 address, or the /64 prefix of
an IPv6 one (one host commonly owns a whole /64).
"""

from __future__ import annotations

import contextlib
import ipaddress
import resource
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Final

Clock = Callable[[], float]

# refusal reasons, as counted in metrics and logged
PER_ADDRESS: Final = "per_address"
PER_ADDRESS_UNAUTHENTICATED: Final = "per_address_unauthenticated"
LISTENER_FULL: Final = "listener_full"
NODE_FULL: Final = "node_full"
# the byte-budget holder of every connection that has not shown a key
ANONYMOUS: Final = "-"


def address_key(host: str) -> str:
    """The unit per-address limits count: the IPv4 address, or an IPv6 address's /64 prefix
    (an IPv4-mapped IPv6 address counts as its IPv4 address). A non-IP peer (a Unix socket)
    is ``"local"``."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return "local"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (as far as allowed);
    returns the soft limit now in force, the figure :func:`connection_capacity` starts from.
    The node and each gateway worker process call it once at start."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def connection_capacity(open_files_limit: int, reserve: int) -> int:
    """Connections the node may hold at once: every file descriptor but the reserve kept for
    its own files, and the reserve never more than half the limit (a node run with a small
    limit still takes connections: half of them, the other half for its files)."""
    return max(1, open_files_limit - min(reserve, open_files_limit // 2))


class Ticket:
    """One admitted connection. ``close`` drops it (the transport's ``abort``); the
    connection calls :meth:`Admission.release` once it is gone, which may be after
    :meth:`Admission.evict` already released it (release is idempotent)."""

    __slots__ = ("address", "close", "listener", "proven", "released", "since")

    def __init__(self, listener: str, address: str, since: float, close: Callable[[], None]):
        self.listener = listener
        self.address = address
        self.since = since
        self.close = close
        self.proven = False
        self.released = False


class _Listener:
    __slots__ = ("cap", "count", "pending")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.count = 0
        # pending tickets in arrival order: the oldest is first, to evict or expire
        self.pending: OrderedDict[Ticket, None] = OrderedDict()


class Admission:
    """Connection counts and the decisions on them. ``capacity`` is the node-wide budget
    (:func:`connection_capacity`); ``listeners`` maps each listener to its own cap.

    Costs: O(1) per admit, prove and release; :meth:`expire` is O(connections expired)."""

    def __init__(
        self,
        *,
        capacity: int,
        listeners: dict[str, int],
        unauthenticated_share: float,
        max_unauthenticated_per_address: int,
        max_per_address: int,
        handshake_timeout_s: float,
        clock: Clock,
    ) -> None:
        self.capacity = capacity
        self.pending_cap = max(1, int(capacity * unauthenticated_share))
        self.max_unauthenticated_per_address = max_unauthenticated_per_address
        self.max_per_address = max_per_address
        self.handshake_timeout_s = handshake_timeout_s
        self.clock = clock
        self.listeners = {name: _Listener(min(cap, capacity)) for name, cap in listeners.items()}
        self.total = 0
        self.pending = 0
        # address -> [connections, of which pending]; entries go when both reach 0
        self._addresses: dict[str, list[int]] = {}
        self.refused: dict[str, int] = {}
        self.evicted = 0
        self.expired = 0

    # ------------------------------------------------------------------ decisions
    def admit(
        self, listener: str, address: str, close: Callable[[], None]
    ) -> tuple[Ticket | None, str]:
        """A new connection on ``listener`` from ``address``: its :class:`Ticket`, or None and
        the reason it is refused. Making room may evict older pending connections (their
        ``close`` is called now)."""
        counts = self._addresses.get(address)
        if counts is not None:
            if counts[0] >= self.max_per_address:
                return self._refuse(PER_ADDRESS)
            if counts[1] >= self.max_unauthenticated_per_address:
                return self._refuse(PER_ADDRESS_UNAUTHENTICATED)
        lst = self.listeners[listener]
        if lst.count >= lst.cap and not self._evict_oldest(lst.pending):
            return self._refuse(LISTENER_FULL)
        if self.total >= self.capacity and not self._evict_oldest_anywhere():
            return self._refuse(NODE_FULL)
        if self.pending >= self.pending_cap:
            self._evict_oldest_anywhere()
        ticket = Ticket(listener, address, self.clock(), close)
        lst.count += 1
        lst.pending[ticket] = None
        self.total += 1
        self.pending += 1
        # read again: making room may have evicted this address's last connection (and
        # dropped its entry), so the counts read above can be stale
        counts = self._addresses.get(address)
        if counts is None:
            self._addresses[address] = [1, 1]
        else:
            counts[0] += 1
            counts[1] += 1
        return ticket, ""

    def prove(self, ticket: Ticket) -> None:
        """The connection showed a valid key (or, without keys, a valid request): it no
        longer counts as pending and is never evicted for room."""
        if ticket.proven or ticket.released:
            return
        ticket.proven = True
        del self.listeners[ticket.listener].pending[ticket]
        self.pending -= 1
        self._addresses[ticket.address][1] -= 1

    def release(self, ticket: Ticket) -> None:
        """The connection is gone. Idempotent."""
        if ticket.released:
            return
        ticket.released = True
        lst = self.listeners[ticket.listener]
        lst.count -= 1
        self.total -= 1
        counts = self._addresses[ticket.address]
        counts[0] -= 1
        if not ticket.proven:
            del lst.pending[ticket]
            self.pending -= 1
            counts[1] -= 1
        if counts[0] == 0:
            del self._addresses[ticket.address]

    def evict(self, ticket: Ticket) -> None:
        """Release ``ticket`` now and close its connection."""
        self.release(ticket)
        ticket.close()

    def expire(self, now: float) -> int:
        """Close the pending connections older than the handshake timeout; returns how many."""
        deadline = now - self.handshake_timeout_s
        n = 0
        for lst in self.listeners.values():
            while lst.pending:
                ticket = next(iter(lst.pending))
                if ticket.since > deadline:
                    break
                self.evict(ticket)
                n += 1
        self.expired += n
        return n

    # -------------------------------------------------------------------- helpers
    def _refuse(self, reason: str) -> tuple[None, str]:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        return None, reason

    def _evict_oldest(self, pending: OrderedDict[Ticket, None]) -> bool:
        if not pending:
            return False
        self.evict(next(iter(pending)))
        self.evicted += 1
        return True

    def _evict_oldest_anywhere(self) -> bool:
        oldest: Ticket | None = None
        for lst in self.listeners.values():
            if lst.pending:
                first = next(iter(lst.pending))
                if oldest is None or first.since < oldest.since:
                    oldest = first
        if oldest is None:
            return False
        self.evict(oldest)
        self.evicted += 1
        return True

    def open_by_listener(self) -> dict[str, int]:
        return {name: lst.count for name, lst in self.listeners.items()}


class ByteBudget:
    """A number of bytes many holders share (the node's request bytes in flight; its queued
    reply bytes), with a cap per holder: a tenant, all unauthenticated connections together,
    or, on a node without keys, a source address. So one tenant's key (or an anonymous
    flood) can take at most ``per_holder`` and the rest stays for the others.
    :meth:`take` never blocks: it succeeds or says no, and the caller decides whether to
    refuse or to wait with :meth:`when_available`.

    Waiters are called, in order, by the :meth:`give` that frees bytes; they must not take
    bytes inside the call (the I/O layer schedules its work with ``call_soon``)."""

    __slots__ = ("_waiters", "by_holder", "capacity", "per_holder", "used")

    def __init__(self, capacity: int, per_holder: int | None = None) -> None:
        self.capacity = capacity
        self.per_holder = capacity if per_holder is None else per_holder
        self.used = 0
        self.by_holder: dict[str, int] = {}
        self._waiters: list[Callable[[], None]] = []

    @property
    def available(self) -> int:
        return self.capacity - self.used

    def take(self, n: int, holder: str = "") -> bool:
        held = self.by_holder.get(holder, 0)
        if self.used + n > self.capacity or held + n > self.per_holder:
            return False
        self.used += n
        self.by_holder[holder] = held + n
        return True

    def force(self, n: int, holder: str = "") -> None:
        """Take ``n`` even past the caps (what was already received or produced)."""
        self.used += n
        self.by_holder[holder] = self.by_holder.get(holder, 0) + n

    def give(self, n: int, holder: str = "") -> None:
        self.used -= n
        left = self.by_holder.get(holder, 0) - n
        if left > 0:
            self.by_holder[holder] = left
        else:
            self.by_holder.pop(holder, None)
        if self._waiters and self.used < self.capacity:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter()

    def when_available(self, waiter: Callable[[], None]) -> None:
        """Call ``waiter`` once after the next :meth:`give` (then ask again)."""
        self._waiters.append(waiter)


class AuthThrottle:
    """Failed API-key attempts per source address, as a token bucket: an address may fail
    ``per_minute`` times in a burst and then once every ``60 / per_minute`` seconds. While its
    bucket is empty its keys are not checked at all (a guess cannot succeed), so brute force
    gets ``per_minute`` guesses a minute per address. Remembers at most ``max_addresses``
    addresses (the least recently failed are forgotten first)."""

    def __init__(self, per_minute: int, clock: Clock, max_addresses: int = 65_536) -> None:
        self.burst = float(per_minute)
        self.rate = per_minute / 60.0
        self.clock = clock
        self.max_addresses = max_addresses
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self.throttled = 0

    def _tokens(self, address: str) -> float:
        bucket = self._buckets.get(address)
        if bucket is None:
            return self.burst
        now = self.clock()
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[0], bucket[1] = tokens, now
        return tokens

    def allowed(self, address: str) -> bool:
        """May a key from ``address`` be checked now?"""
        if address not in self._buckets:
            return True
        if self._tokens(address) >= 1.0:
            return True
        self.throttled += 1
        return False

    def failed(self, address: str) -> None:
        tokens = self._tokens(address) - 1.0
        self._buckets[address] = [max(0.0, tokens), self.clock()]
        self._buckets.move_to_end(address)
        while len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)


class LogLimiter:
    """At most ``per_second`` lines a second (and as many in a burst) for each kind of event;
    :meth:`allow` says whether to write this one and how many were dropped since the last
    one written, so the log stays truthful about what it skipped."""

    def __init__(self, per_second: float, clock: Clock) -> None:
        self.per_second = per_second
        self.clock = clock
        self._state: dict[str, list[float]] = {}  # kind -> [tokens, last, suppressed]

    def allow(self, kind: str) -> int | None:
        """None to drop this line; else the number of lines of this kind dropped before it."""
        now = self.clock()
        state = self._state.get(kind)
        if state is None:
            self._state[kind] = [self.per_second - 1.0, now, 0.0]
            return 0
        tokens = min(self.per_second, state[0] + (now - state[1]) * self.per_second)
        state[1] = now
        if tokens < 1.0:
            state[0] = tokens
            state[2] += 1
            return None
        state[0] = tokens - 1.0
        dropped, state[2] = int(state[2]), 0.0
        return dropped


def pending_tickets(admission: Admission) -> Iterable[Ticket]:
    """Every pending ticket, oldest first per listener (for tests and diagnostics)."""
    for lst in admission.listeners.values():
        yield from lst.pending

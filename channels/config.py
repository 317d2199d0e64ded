"""The channels' settings: ``msgspec.Struct``s with defaults, one per channel.

Meant to be a section of the node's TOML (``[channels.webhook]``, ``[channels.console]``,
``[channels.webhook.breaker]``) in the style of ``broker/config.py``: keys are kebab-case,
unknown keys are errors naming the key, and a bad value (a negative timeout, a network that
does not parse) is a ``msgspec.ValidationError`` naming the field. Durations are integer
milliseconds (``*-ms``) like the rest of the node's configuration.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

import msgspec

Positive = Annotated[int, msgspec.Meta(gt=0)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Fraction = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, rename="kebab", kw_only=True):
    pass


class BreakerConfig(_Section):
    """When a circuit breaker opens, how long it stays open, how it closes again.

    A breaker guards one provider or one webhook endpoint (scheme, host, port). While it is
    open, sends answer ``retry(circuit_open)`` at once instead of waiting on a dead endpoint, so
    one failing receiver does not hold the channel's workers.
    """

    failure_threshold: Positive = 5
    """Open after this many consecutive failures (5xx, 429, timeouts, connection errors)."""

    failure_rate: Fraction = 0.5
    """Also open when at least this fraction of the calls in the rolling window failed
    (catches an endpoint that fails every other call, which never makes 5 in a row)."""

    rate_min_calls: Positive = 20
    """The failure rate counts only once the window holds this many calls, so two failures of
    three calls do not open a quiet endpoint's breaker."""

    rate_window_ms: Positive = 60_000
    """Length of the rolling window for the failure rate (kept in 10 buckets)."""

    open_ms: Positive = 30_000
    """Cool-down after opening, before one probe call is let through (half-open)."""

    max_open_ms: Positive = 300_000
    """Each failed probe doubles the cool-down, up to this: a receiver down for hours is
    probed every 5 minutes, not every 30 s."""

    half_open_probes: Positive = 1
    """Calls let through at once while half-open; the others answer ``retry(circuit_open)``."""

    probes_to_close: Positive = 1
    """Successful probes needed to close the breaker again."""


class WebhookConfig(_Section):
    """The webhook channel: one shared HTTP client, its limits, and the SSRF guard."""

    connect_timeout_ms: Positive = 5_000
    """TCP (and TLS) connect timeout per attempt. A connect timeout is a retry."""

    timeout_ms: Positive = 15_000
    """Total time for one attempt: waiting for a pooled connection, connecting, sending, the
    response headers and the (capped) body. Standard Webhooks suggests 15-30 s. A timeout is a
    retry; the receiver may have acted on the request, and deduplicates on ``webhook-id``."""

    pool_size: Positive = 256
    """Open connections kept by the shared client, across all endpoints (each costs one file
    descriptor and ~40 KiB of buffers). Idle ones are reused (keep-alive)."""

    keepalive_ms: Positive = 15_000
    """How long an idle pooled connection is kept for reuse."""

    concurrency_per_endpoint: Positive = 16
    """Requests in flight at once to one endpoint (scheme, host, port): one tenant's slow
    receiver cannot take the whole pool, and a receiver is not flooded."""

    endpoint_wait_ms: NonNegative = 10_000
    """How long a send waits for a free slot at a busy endpoint before answering
    ``retry(endpoint_busy)``; bounds how long the core's workers queue behind one receiver."""

    max_response_bytes: Positive = 65_536
    """Bytes of a response body read at most (kept only for the outcome's detail); past it the
    connection is closed rather than drained, so a huge or endless body costs nothing."""

    max_retry_after_ms: NonNegative = 3_600_000
    """Cap on a receiver's Retry-After (seconds or HTTP date): at most an hour."""

    max_endpoints: Positive = 10_000
    """Endpoints whose breaker and concurrency state are kept (least recently used idle ones
    are forgotten past this); about 1 KiB each."""

    dns_cache_ms: NonNegative = 10_000
    """How long resolved (and checked) addresses are cached; 0 resolves on every connect."""

    disable_after_ms: Positive = 5 * 24 * 3600 * 1000
    """An endpoint failing for this long (no success at all since, or the delivery's first
    attempt this long ago and still failing) answers ``permanent(endpoint_failing,
    invalidates="endpoint")``: the core disables it with an audit record (Svix: 5 days)."""

    failure_gap_ms: Positive = 24 * 3600 * 1000
    """Two failures further apart than this (a day) with no attempt between do not make one
    failing span: an idle endpoint that failed last week and fails again now is not disabled."""

    allow_networks: list[str] = []
    """Networks (CIDR, e.g. ``"127.0.0.1/32"``, ``"10.1.0.0/16"``) that webhooks may reach even
    though they are not global: by default private, loopback, link-local, multicast, reserved
    and unspecified addresses are refused (SSRF guard), checked on the resolved address at
    connect time."""

    require_https: bool = False
    """Refuse ``http://`` endpoints (permanent ``insecure_url``)."""

    user_agent: str = "Herald-Webhooks/0.1"
    """The ``User-Agent`` header of every webhook request."""

    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    """The per-endpoint circuit breaker."""

    def __post_init__(self) -> None:
        for net in self.allow_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"allow-networks: {exc}") from None
        if self.connect_timeout_ms > self.timeout_ms:
            raise ValueError("connect-timeout-ms is longer than timeout-ms")


class ConsoleConfig(_Section):
    """The console channel: one log line per delivery (``make serve``'s default)."""

    max_payload_bytes: NonNegative = 1024
    """Bytes of the payload written into the line at most (the rest is cut, marked ``...``)."""


class ChannelsConfig(_Section):
    """Every channel's settings: ``[channels.*]`` in the node's TOML."""

    webhook: WebhookConfig = msgspec.field(default_factory=WebhookConfig)
    console: ConsoleConfig = msgspec.field(default_factory=ConsoleConfig)

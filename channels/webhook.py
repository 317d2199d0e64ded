"""The webhook channel: a Standard Webhooks signed HTTP POST per delivery.

One request per attempt::

    POST <the user's webhook URL>
    content-type: application/json
    webhook-id: <delivery id>          (stable across retries: the receiver's idempotency key)
    webhook-timestamp: <unix seconds of this attempt>
    webhook-signature: v1,<base64 HMAC-SHA256> [v1,<...> for each further active secret]

    {"type": "<topic>", "timestamp": "<event time, RFC 3339>",
     "data": {"event_id": ..., "user": ..., "topic": ..., "category"?: ...,
              "payload": <the event's data, as given>, "activities"?: [<a digest's events>]}}

The body is the same bytes on every attempt; only the timestamp header and the signatures
change. The answer becomes an outcome by :func:`channels.responses.classify` (2xx delivered;
429, 5xx, timeouts and connection errors retry, honouring Retry-After; 410 permanent and
invalidates the endpoint; other 4xx and 3xx permanent; redirects are never followed).

Around each request:

- the SSRF guard (:mod:`channels.ssrf`) refuses non-global addresses not on the allow-list,
  on the address actually connected to (permanent ``ssrf_refused``, invalidates the endpoint);
- each endpoint (origin: scheme, host, port) has a circuit breaker, which answers
  ``retry(circuit_open, after_s=<rest of the cool-down>)`` without a request while open, and a
  concurrency limit, which answers ``retry(endpoint_busy)`` when no slot frees in time;
- an endpoint failing for ``disable-after-ms`` answers ``permanent(endpoint_failing,
  invalidates="endpoint")``.

One shared HTTP client for every endpoint (:class:`channels.http1.HttpClient`, HTTP/1.1 on
asyncio Protocols with llhttp; on aiohttp's ``ClientSession`` a webhook cost ~125 us of CPU, on
it ~50 us): a bounded pool of keep-alive connections, the request's bytes built in one piece,
no cookies kept (tenants must not share state through a cookie jar), no proxy from the
environment, no decompression (a compressed body cannot expand), response bodies read up to
``max-response-bytes`` and the connection dropped past that. A pooled connection the receiver
closed while the request was on its way is retried once on a new one, not counted as a
failed attempt (safe: the receiver deduplicates on ``webhook-id``).
"""

from __future__ import annotations

import functools
import logging
import ssl
import time
from collections.abc import Callable
from typing import NamedTuple

import msgspec
from aiohttp.abc import AbstractResolver
from yarl import URL

from channels import signing
from channels.base import Delivery, Outcome, Permanent, Retry, WebhookAddress
from channels.breaker import BreakerState, CircuitBreaker, Ticket
from channels.config import WebhookConfig
from channels.endpoints import Endpoint, Endpoints
from channels.errors import ChannelClosed, ForbiddenAddress, InvalidSecret, RequestError
from channels.http1 import HttpClient, Route, route
from channels.responses import Health, classify, detail_of
from channels.ssrf import AddressPolicy, GuardedResolver

log = logging.getLogger("herald.channels.webhook")


# ------------------------------------------------------------------------------ the body
class _Data(msgspec.Struct, omit_defaults=True):
    event_id: str
    user: str
    topic: str
    payload: msgspec.Raw
    category: str | None = None
    activities: tuple[msgspec.Raw, ...] | None = None


class _Body(msgspec.Struct):
    type: str
    timestamp: str
    data: _Data


_encode = msgspec.json.Encoder().encode


def rfc3339_ms(ms: int) -> str:
    """``2026-11-25T21:43:00.123Z`` for Unix milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def webhook_body(delivery: Delivery) -> bytes:
    """The JSON body for ``delivery`` (Standard Webhooks' ``{type, timestamp, data}``); the
    same bytes for every attempt. The payload is embedded as given, not re-encoded."""
    d = delivery
    data = _Data(d.event_id, d.user, d.topic, d.payload, d.category, d.activities)
    return _encode(_Body(d.topic, rfc3339_ms(d.created_ms), data))


# ---------------------------------------------------------------------------- the target
class _Target(NamedTuple):
    url: URL
    endpoint: str  # the origin: what shares a breaker, a concurrency limit and connections
    route: Route  # the request's first lines, built once


@functools.lru_cache(maxsize=4096)
def _parse_target(url: str, require_https: bool) -> _Target | str:
    """The parsed URL and its endpoint key, or the reason it cannot be used."""
    try:
        parsed = URL(url)
        scheme, host, port = parsed.scheme, parsed.host, parsed.port
        raw_host = parsed.raw_host
    except (ValueError, TypeError):
        return "invalid_url"
    if scheme not in ("http", "https") or not host or not raw_host or port is None:
        return "invalid_url"
    if require_https and scheme != "https":
        return "insecure_url"
    parsed = parsed.with_fragment(None)
    r = route(scheme, host, port, raw_host, parsed.is_default_port(), parsed.raw_path_qs)
    return _Target(parsed, r.key, r)


# --------------------------------------------------------------------------- the channel
class WebhookChannel:
    """Signed webhooks over one shared HTTP client. See the module docstring.

    ``clock`` is wall-clock Unix seconds (``webhook-timestamp``, Retry-After dates, a
    delivery's age); ``monotonic`` drives the breakers. ``resolver`` replaces the DNS lookup
    (its answers still pass the SSRF guard); ``ssl_context`` the TLS verification (tests).
    """

    name = "webhook"

    def __init__(
        self,
        config: WebhookConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        resolver: AbstractResolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = cfg = config or WebhookConfig()
        self._clock = clock
        self._monotonic = monotonic
        self._policy = AddressPolicy(cfg.allow_networks)
        self._resolver = resolver
        self._ssl = ssl_context
        if not cfg.user_agent.isprintable():
            raise ValueError("channels.webhook.user-agent must be printable (no CR, LF)")
        # sent with every request, after the request line and Host
        self._fixed_headers = (
            f"User-Agent: {cfg.user_agent}\r\nContent-Type: application/json\r\n".encode()
        )
        self.endpoints = Endpoints(
            cfg.breaker,
            cfg.concurrency_per_endpoint,
            cfg.max_endpoints,
            monotonic,
            self._on_transition,
            streak_gap_s=cfg.failure_gap_ms / 1000,
        )
        self._client: HttpClient | None = None
        self._closed = False
        self._wait_s = cfg.endpoint_wait_ms / 1000
        self._cap_s = cfg.max_retry_after_ms / 1000
        self._disable_s = cfg.disable_after_ms / 1000

    # ---------------------------------------------------------------- lifecycle
    def _open_client(self) -> HttpClient:
        cfg = self.config
        return HttpClient(
            policy=self._policy,
            resolver=GuardedResolver(self._policy, self._resolver),
            ssl_context=self._ssl,
            pool_size=cfg.pool_size,
            timeout_s=cfg.timeout_ms / 1000,
            connect_timeout_s=cfg.connect_timeout_ms / 1000,
            keepalive_s=cfg.keepalive_ms / 1000,
            dns_cache_s=cfg.dns_cache_ms / 1000,
            max_body=cfg.max_response_bytes,
            headers=self._fixed_headers,
        )

    @property
    def client(self) -> HttpClient | None:
        """The HTTP client, once the first send has made it (tests, metrics)."""
        return self._client

    def breaker_states(self) -> list[str]:
        """One per endpoint known now (``endpoint-capacity`` at most)."""
        return self.endpoints.breaker_states()

    async def close(self) -> None:
        """Close every pooled connection; later sends raise ``ChannelClosed``. Idempotent."""
        self._closed = True
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    # --------------------------------------------------------------------- send
    async def send(self, delivery: Delivery) -> Outcome:
        if self._closed:
            raise ChannelClosed("the webhook channel is closed")
        address = delivery.address
        if not isinstance(address, WebhookAddress):
            return Outcome.permanent("no_endpoint", None, detail="the user has no webhook")
        target = _parse_target(address.url, self.config.require_https)
        if isinstance(target, str):
            return Outcome.permanent(target, "endpoint", detail=address.url[:200])
        if not address.secrets:
            return Outcome.permanent("no_secret", None, detail="the webhook has no secret")
        try:
            keys = [signing.decode_secret(s) for s in address.secrets]
        except InvalidSecret as exc:
            return Outcome.permanent("invalid_secret", "endpoint", detail=str(exc))

        ep = self.endpoints.get(target.endpoint)
        breaker = ep.breaker
        if breaker.state is BreakerState.OPEN:
            outcome: Outcome = self._circuit_open(ep)
        elif not await ep.limit.acquire(self._wait_s):
            return Outcome.retry(None, "endpoint_busy", detail=f"{ep.limit.limit} in flight")
        else:
            try:
                ticket = breaker.admit()
                if ticket is None:
                    outcome = self._circuit_open(ep)
                else:
                    outcome = await self._attempt(delivery, target, keys, breaker, ticket)
            finally:
                ep.limit.release()
        if isinstance(outcome, Retry):
            return self._maybe_disable(delivery, ep, outcome)
        if isinstance(outcome, Permanent) and outcome.reason == "ssrf_refused":
            log.warning(
                "event=webhook_refused delivery_id=%s tenant=%s user=%s endpoint=%s why=%s",
                delivery.delivery_id,
                delivery.tenant,
                delivery.user,
                target.endpoint,
                outcome.detail.replace(" ", "_"),
            )
        return outcome

    async def _attempt(
        self,
        delivery: Delivery,
        target: _Target,
        keys: list[bytes],
        breaker: CircuitBreaker,
        ticket: Ticket,
    ) -> Outcome:
        """One request under a breaker ticket; the ticket is settled whatever happens."""
        health: Health = "unknown"
        try:
            outcome, health = await self._post(delivery, target, keys)
            return outcome
        finally:
            if health == "success":
                breaker.success(ticket)
            elif health == "failure":
                breaker.failure(ticket)
            else:
                breaker.release(ticket)

    async def _post(
        self, delivery: Delivery, target: _Target, keys: list[bytes]
    ) -> tuple[Outcome, Health]:
        client = self._client
        if client is None:
            client = self._client = self._open_client()
        body = webhook_body(delivery)
        msg_id = delivery.delivery_id
        if not msg_id.isprintable():  # it goes into a header line
            raise ValueError(f"a delivery id must be printable: {msg_id!r}")
        timestamp = int(self._clock())
        headers = b"webhook-id: %s\r\nwebhook-timestamp: %d\r\nwebhook-signature: %s\r\n" % (
            msg_id.encode(),
            timestamp,
            signing.signature_header(keys, msg_id, timestamp, body).encode("ascii"),
        )
        try:
            answer = await client.post(target.route, headers, body)
        except ForbiddenAddress as exc:
            return _refused(exc), "unknown"
        except RequestError as exc:
            return Outcome.retry(None, exc.reason, detail=_short(exc)), "failure"
        status = answer.status
        if answer.cut_short is not None:  # the head arrived, not the whole body
            if 200 <= status < 300:  # the receiver has answered: delivered
                detail = f"HTTP {status}; body cut short: {answer.detail}"
                return Outcome.delivered(None, detail=detail), "success"
            return Outcome.retry(None, answer.cut_short, detail=answer.detail), "failure"
        return classify(
            status,
            answer.retry_after,
            now=self._clock(),
            max_retry_after_s=self._cap_s,
            detail=detail_of(status, answer.body, truncated=answer.truncated),
            location=answer.location,
        )

    # ----------------------------------------------------------------- helpers
    def _circuit_open(self, ep: Endpoint) -> Outcome:
        after = ep.breaker.retry_after()
        return Outcome.retry(after, "circuit_open", detail=f"endpoint {ep.key} is failing")

    def _maybe_disable(self, delivery: Delivery, ep: Endpoint, outcome: Retry) -> Outcome:
        """An endpoint failing for ``disable-after-ms`` is given up: permanent, invalidated."""
        span = None
        since = ep.breaker.failing_since
        if since is not None and self._monotonic() - since >= self._disable_s:
            span = self._monotonic() - since
        first = delivery.first_attempt_ms
        if span is None and first is not None and self._clock() - first / 1000 >= self._disable_s:
            span = self._clock() - first / 1000
        if span is None:
            return outcome
        return Outcome.permanent(
            "endpoint_failing",
            "endpoint",
            detail=f"failing for {span / 3600:.1f} h; last: {outcome.reason} {outcome.detail}",
        )

    def _on_transition(self, endpoint: str, old: BreakerState, new: BreakerState, why: str) -> None:
        log.warning(
            "event=breaker_%s channel=webhook endpoint=%s from=%s why=%s",
            new.value,
            endpoint,
            old.value,
            why,
        )


def _refused(exc: ForbiddenAddress) -> Outcome:
    return Outcome.permanent("ssrf_refused", "endpoint", detail=str(exc))


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:200]

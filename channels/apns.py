"""APNs over HTTP/2 with token-based auth: the request, and its answer as an outcome.

One request per device::

    :method POST  :path /3/device/<device token>   (HTTP/2 only: APNs refuses HTTP/1.1)
    authorization: bearer <provider token>         (channels.push_auth.ApnsTokens)
    apns-topic: <bundle id>
    apns-push-type: alert | background
    apns-priority: 10 (high, critical; alert) | 5 (low, normal; always for background)
    apns-expiration: <unix seconds until which APNs stores it for an offline device>
    apns-collapse-id: <delivery id, <= 64 bytes>    (a re-sent attempt replaces, not repeats)
    apns-id: <UUID derived from the delivery id>    (stable across retries)

    {"aps": {"alert": {"title": ..., "body": ...}}, "herald": {"event_id", "topic", "data"}}

(background: ``{"aps": {"content-available": 1}, "herald": ...}``). The ``herald.data``
member is left out when the payload would pass APNs' 4,096 bytes.

Answers (:func:`classify`):

=====================================  ===========================================  ========
answer                                 outcome                                      health
=====================================  ===========================================  ========
200                                    delivered, ``apns-id`` as the provider id    success
410 Unregistered / ExpiredToken        permanent ``unregistered``, invalidates      success
                                       the token
400 BadDeviceToken,                    permanent ``bad_device_token`` /             success
DeviceTokenNotForTopic                 ``token_not_for_topic``, invalidates token
other 400, 413                         permanent ``apns_<reason>``                  success
403 ExpiredProviderToken               the provider token is signed again and the   -
                                       request sent once more
other 403                              retry ``apns_<reason>`` (our credentials)    failure
429 TooManyRequests                    retry after Retry-After (one device is sent  unknown
                                       too much: says nothing of APNs' health)
429 (other), 5xx                       retry after Retry-After, fail over           failure
=====================================  ===========================================  ========
"""

from __future__ import annotations

import ssl
import time
import uuid
from collections.abc import Callable

import httpx
import msgspec

from channels.base import Delivery, Outcome
from channels.config import ApnsConfig
from channels.failover import Attempt
from channels.push_auth import ApnsTokens
from channels.responses import Health, parse_retry_after

MAX_PAYLOAD = 4096
_DELIVERY_NS = uuid.UUID("6f1c2a52-3b7e-4c55-9a31-2a4f0d1e8b10")
_INVALID_TOKEN = {
    "BadDeviceToken": "bad_device_token",
    "DeviceTokenNotForTopic": "token_not_for_topic",
}
_encode = msgspec.json.Encoder().encode


class _Reason(msgspec.Struct):
    reason: str = ""
    timestamp: int | None = None


def apns_id(delivery_id: str) -> str:
    """The ``apns-id`` of a delivery: a UUID derived from its id, the same on every attempt."""
    return str(uuid.uuid5(_DELIVERY_NS, delivery_id))


def priority(delivery: Delivery, push_type: str) -> str:
    if push_type == "background":
        return "5"
    return "10" if delivery.priority in ("high", "critical") else "5"


def payload(delivery: Delivery, title: str, body: str, push_type: str) -> bytes:
    """The JSON payload, at most :data:`MAX_PAYLOAD` bytes (the event's data left out
    first, then the body cut)."""
    aps: dict[str, object] = (
        {"content-available": 1}
        if push_type == "background"
        else {"alert": {"title": title, "body": body}}
    )
    herald: dict[str, object] = {"event_id": delivery.event_id, "topic": delivery.topic}
    full = _encode({"aps": aps, "herald": {**herald, "data": delivery.payload}})
    if len(full) <= MAX_PAYLOAD:
        return full
    small = _encode({"aps": aps, "herald": herald})
    while len(small) > MAX_PAYLOAD and push_type != "background" and body:
        body = body[: max(0, len(body) - (len(small) - MAX_PAYLOAD) - 8)]
        aps = {"alert": {"title": title, "body": body + "…"}}
        small = _encode({"aps": aps, "herald": herald})
    return small


def classify(
    status: int, body: bytes, headers: httpx.Headers, *, now: float, cap_s: float
) -> tuple[Outcome, Health, bool]:
    """(outcome, health, failover) for one APNs answer (see the module docstring)."""
    if status == 200:
        return Outcome.delivered(headers.get("apns-id"), detail="HTTP 200"), "success", False
    try:
        reason = msgspec.json.decode(body, type=_Reason).reason if body else ""
    except (msgspec.DecodeError, msgspec.ValidationError):
        reason = ""
    detail = f"HTTP {status} {reason}".strip()
    code = f"apns_{reason or status}"
    if status == 410:
        return Outcome.permanent("unregistered", "token", detail=detail), "success", False
    if status == 400 and reason in _INVALID_TOKEN:
        return Outcome.permanent(_INVALID_TOKEN[reason], "token", detail=detail), "success", False
    if status in (400, 404, 405, 413):
        return Outcome.permanent(code, None, detail=detail), "success", False
    after = parse_retry_after(headers.get("retry-after"), now=now, cap_s=cap_s)
    if status == 429 and reason == "TooManyRequests":
        return Outcome.retry(after, code, detail=detail), "unknown", False
    if status == 403:
        return Outcome.retry(after, code, detail=detail), "failure", False
    return Outcome.retry(after, f"http_{status}", detail=detail), "failure", True


class ApnsHost:
    """One APNs host (a member of the push channel's APNs failover chain)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")


class ApnsClient:
    """Sends to APNs over one shared HTTP/2 client (connections multiplex many streams)."""

    def __init__(
        self,
        config: ApnsConfig,
        tokens: ApnsTokens,
        *,
        clock: Callable[[], float] = time.time,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.tokens = tokens
        self._clock = clock
        self._verify: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._client: httpx.AsyncClient | None = None

    def _open(self) -> httpx.AsyncClient:
        cfg = self.config
        return httpx.AsyncClient(
            http1=False,
            http2=True,
            verify=self._verify,
            timeout=httpx.Timeout(cfg.timeout_ms / 1000),
            limits=httpx.Limits(max_connections=cfg.max_connections),
            trust_env=False,
            follow_redirects=False,
        )

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def headers(self, delivery: Delivery, bearer: str) -> dict[str, str]:
        cfg = self.config
        expiration = 0 if cfg.expiration_ms == 0 else int(self._clock() + cfg.expiration_ms / 1000)
        return {
            "authorization": f"bearer {bearer}",
            "apns-topic": cfg.topic,
            "apns-push-type": cfg.push_type,
            "apns-priority": priority(delivery, cfg.push_type),
            "apns-expiration": str(expiration),
            "apns-collapse-id": delivery.delivery_id.encode()[:64].decode("utf-8", "ignore"),
            "apns-id": apns_id(delivery.delivery_id),
            "content-type": "application/json",
        }

    async def send(
        self, host: ApnsHost, delivery: Delivery, token: str, title: str, body: str
    ) -> Attempt:
        client = self._client
        if client is None:
            client = self._client = self._open()
        data = payload(delivery, title, body, self.config.push_type)
        url = f"{host.url}/3/device/{token}"
        for _ in range(2):  # a second time only after an expired provider token
            bearer = self.tokens.token()
            try:
                resp = await client.post(url, content=data, headers=self.headers(delivery, bearer))
            except httpx.ConnectTimeout as exc:
                return _transport("connect_timeout", exc, failover=True)
            except httpx.ConnectError as exc:
                return _transport("connect_error", exc, failover=True)
            except httpx.TimeoutException as exc:
                return _transport("timeout", exc, failover=False)
            except httpx.HTTPError as exc:
                return _transport("connection_lost", exc, failover=False)
            if resp.status_code == 403 and b"ExpiredProviderToken" in resp.content:
                self.tokens.expired(bearer)
                continue
            break
        outcome, health, failover = classify(
            resp.status_code,
            resp.content,
            resp.headers,
            now=self._clock(),
            cap_s=self.config.max_retry_after_ms / 1000,
        )
        return Attempt(outcome, health, failover)


def _transport(reason: str, exc: BaseException, *, failover: bool) -> Attempt:
    detail = " ".join((str(exc) or type(exc).__name__).split())[:200]
    return Attempt(Outcome.retry(None, reason, detail=detail), "failure", failover)

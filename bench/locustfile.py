"""Locust load test for Herald's HTTP ingest and its WebSocket gateway.

- ``EventProducer``: ``POST /events`` (one event per request) and ``POST /events/batch`` (100
  events per request), as many as the users can send (no wait).
- ``GatewayUser``: holds a WebSocket to the gateway as its own user (``u-<n>``), posts an
  event to itself once a second and reports the time from just before the POST to the
  notification's arrival on its socket as the request ``WS receipt`` (locust's percentiles
  are the receipt latency). Its token is minted with the node's token secret, which the
  node and locust share through ``HERALD_TOKEN_SECRET`` (set ``gateway.token-secret`` in the
  node's config to the same value); ``HERALD_WS_URL`` is the gateway (default: the host's
  address on port 8765).

Start a node, then run locust headless against it::

    printf '[gateway]\ntoken-secret = "a-secret-of-at-least-32-characters!!"\n' > /tmp/gw.toml
    .venv/bin/herald serve --config /tmp/gw.toml --data-dir /tmp/herald-locust &
    HERALD_TOKEN_SECRET='a-secret-of-at-least-32-characters!!' .venv/bin/locust \
        -f bench/locustfile.py GatewayUser --headless -u 200 -r 50 -t 30s \
        --host http://127.0.0.1:8080 --only-summary

Locust's own per-request cost (gevent, requests) is high: on a small machine the locust
process, not the node, is usually the bound, which is why ``bench.run``'s ``http`` scenario
drives the node with a lean raw-socket client from several processes instead, and
``bench.gateway`` measures the gateway with a minimal asyncio client. This file is for load
shapes (ramps, mixes, many users). Events per second = the ``/events`` request rate + 100 x
the ``/events/batch`` request rate.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

from locust import HttpUser, constant, events, task
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

BATCH_EVENTS = 100


def _event() -> dict[str, object]:
    # ~200 bytes of JSON, no key: the node partitions by the event_id it assigns
    return {
        "topic": "bench.orders",
        "payload": {"order": 1234, "user": "user-1", "note": os.urandom(56).hex()},
    }


SINGLE = json.dumps(_event()).encode()
BATCH = json.dumps({"events": [_event() for _ in range(BATCH_EVENTS)]}).encode()
HEADERS = {"Content-Type": "application/json"}


class EventProducer(HttpUser):
    """Posts events back to back: nine single events for every batch of 100."""

    wait_time = constant(0)

    @task(9)
    def post_event(self) -> None:
        self.client.post("/events", data=SINGLE, headers=HEADERS, name="/events")

    @task(1)
    def post_batch(self) -> None:
        self.client.post(
            "/events/batch", data=BATCH, headers=HEADERS, name=f"/events/batch [{BATCH_EVENTS}]"
        )


_user_numbers = itertools.count()


def _token(secret: bytes, user: str, ttl_s: int = 86_400) -> str:
    """An HS256 token as ``gateway/auth.py`` mints it, written out here: locust puts
    ``bench/`` first on ``sys.path``, where ``bench/storage.py`` shadows the ``storage``
    package that ``gateway.auth`` imports."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    now = int(time.time())
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(
        json.dumps({"sub": user, "tenant": "default", "iat": now, "exp": now + ttl_s}).encode()
    )
    sig = b64(hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest())
    return f"{head}.{body}.{sig}"


class GatewayUser(HttpUser):
    """One device of one user: a WebSocket held for the whole run; once a second an event
    to itself, timed from just before the POST to its arrival on the socket."""

    wait_time = constant(1)

    def on_start(self) -> None:
        secret = os.environ.get("HERALD_TOKEN_SECRET", "")
        if not secret:
            raise RuntimeError("set HERALD_TOKEN_SECRET to the node's gateway.token-secret")
        self.user_id = f"u-{next(_user_numbers)}"
        token = _token(secret.encode(), self.user_id)
        ws = (
            os.environ.get("HERALD_WS_URL")
            or f"ws://{urlsplit(cast(str, self.host)).hostname}:8765/"
        )
        self._held = contextlib.ExitStack()
        self.ws: ClientConnection = self._held.enter_context(
            connect(f"{ws}?token={token}", compression=None)
        )
        while json.loads(self.ws.recv(timeout=10))["type"] != "ready":
            pass

    def on_stop(self) -> None:
        self._held.close()

    @task
    def receipt(self) -> None:
        mark = uuid.uuid4().hex
        body = json.dumps({"topic": "bench.inapp", "users": [self.user_id], "payload": {"m": mark}})
        started = time.perf_counter()
        exc: Exception | None = None
        size = 0
        try:
            with self.client.post(
                "/events", data=body, headers=HEADERS, name="/events [to self]", catch_response=True
            ) as r:
                if r.status_code >= 300:
                    r.failure(f"{r.status_code}")
                    return
            deadline = started + 10
            while True:
                raw = self.ws.recv(timeout=max(0.01, deadline - time.perf_counter()))
                frame: dict[str, Any] = json.loads(raw)
                if frame["type"] == "notification" and frame["payload"].get("m") == mark:
                    size = len(raw)
                    break
        except (TimeoutError, ConnectionClosed) as e:
            exc = e
        cast("Callable[..., object]", events.request.fire)(
            request_type="WS",
            name="receipt",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=size,
            exception=exc,
            context={},
        )

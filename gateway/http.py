"""The gateway's one HTTP route, handed to the node's HTTP app as a :class:`broker.openapi.Route`
(so ``GET /openapi.json`` documents it) by ``herald/node.py``:

``DELETE /events/{event_id}/inapp`` takes back every in-app message and broadcast of the event
(``Gateway.retract``): gone from every inbox and backfill, ``retract`` sent to every connected
device. Answers ``200 {"event_id", "retracted": n}`` once durable (``n`` = 0 for an event with
no in-app message: it is still tombstoned, so one on its way is dropped). Scope: ``produce``
or ``admin`` (who publishes an event may take it back, as with ``POST /events/cancel``);
the caller's tenant only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

from broker.auth import Principal
from broker.errors import Forbidden, InvalidRequest
from broker.openapi import Route

MAX_EVENT_ID_BYTES = 200
SCOPES = ("produce", "admin")


class Retracted(msgspec.Struct, kw_only=True):
    """What ``DELETE /events/{event_id}/inapp`` answers: how many in-app messages and
    broadcasts of the event were taken back."""

    event_id: str
    retracted: int


_encode = msgspec.json.Encoder().encode


def retract_route(
    retract: Callable[[str, str], Awaitable[int]],
    principal: Callable[[web.Request], Principal],
) -> Route:
    """The route (errors raised here are answered by the app's own error middleware with
    the usual ``{"error": ...}`` body)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        who = principal(request)
        if not who.scopes & set(SCOPES):
            raise Forbidden("retracting an event needs the 'produce' or 'admin' scope")
        event_id = request.match_info["event_id"]
        raw = event_id.encode()
        if not raw or len(raw) > MAX_EVENT_ID_BYTES or b"\0" in raw:
            raise InvalidRequest(
                f"event_id: 1-{MAX_EVENT_ID_BYTES} bytes without NUL", field="event_id"
            )
        n = await retract(who.tenant, event_id)
        return web.Response(
            body=_encode(Retracted(event_id=event_id, retracted=n)),
            content_type="application/json",
        )

    return Route(
        "DELETE",
        "/events/{event_id}/inapp",
        handler,
        "Retract an event's in-app messages",
        "events",
        scopes=SCOPES,
        answer=Retracted,
        path_params={"event_id": "the event's id"},
        description=(
            "Every in-app message and broadcast of the event leaves every inbox and backfill; "
            "connected devices get a retract message (docs/GATEWAY.md)."
        ),
    )

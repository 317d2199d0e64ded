"""The plumbing the notification HTTP API's handlers share (``notify/api.py`` composes
them): the scopes, :class:`Call` (who calls, on which tenant, with which path ids and
body), :class:`Api` (authentication, scope checks, decoding, encoding, the route table
entries) and the id checks. The handlers live by resource in ``notify/api_registry.py``
and ``notify/api_engine.py``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from aiohttp import web

from broker.auth import Principal
from broker.errors import Forbidden, InvalidRequest
from broker.openapi import Method, Param, Route
from notify.engine import Engine
from notify.registry import MAX_USER_BYTES, Registry

READ: Final = ("consume", "admin")
WRITE: Final = ("admin",)
CANCEL: Final = ("produce", "admin")
ENGAGE: Final = ("engage", "admin")
MAX_ID_BYTES: Final = 200


@dataclass(frozen=True, slots=True)
class Call:
    """One request as a handler sees it: the caller, its tenant, the path parameters, the
    query (typed by the route's :class:`Param` s) and the decoded body."""

    principal: Principal
    path: Mapping[str, str]
    query: Mapping[str, Any]
    body: Any

    @property
    def tenant(self) -> str:
        return self.principal.tenant

    def id(self, name: str, max_bytes: int = MAX_ID_BYTES) -> str:
        """The path parameter ``name``, checked like the registry checks ids: 1 to
        ``max_bytes`` bytes of UTF-8 without NUL. Raises :class:`InvalidRequest` naming it."""
        return checked_id(self.path[name], name, max_bytes)


Handler = Callable[[Call], Awaitable[Any]]


def checked_id(value: str, field: str, max_bytes: int = MAX_ID_BYTES) -> str:
    raw = value.encode()
    if not raw or len(raw) > max_bytes or b"\0" in raw:
        raise InvalidRequest(f"{field}: 1-{max_bytes} bytes of UTF-8 text without NUL", field=field)
    return value


class Api:
    """What the handlers share: the registry, the engine, the caller's principal and the
    wall clock (Unix ms) that stamps writes."""

    def __init__(
        self,
        registry: Registry,
        engine: Engine,
        principal: Callable[[web.Request], Principal],
        clock: Callable[[], int],
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.principal = principal
        self.clock = clock
        self._enc = msgspec.json.Encoder()

    def route(
        self,
        method: Method,
        path: str,
        handler: Handler,
        summary: str,
        tag: str,
        *,
        scopes: tuple[str, ...],
        body: Any = None,
        body_optional: bool = False,
        answer: Any = None,
        status: int = 200,
        query: Sequence[Param] = (),
        path_params: Mapping[str, str] | None = None,
        errors: tuple[int, ...] = (),
        description: str = "",
    ) -> Route:
        """A :class:`Route` whose aiohttp handler authenticates, checks ``scopes`` (any one),
        parses ``query``, decodes ``body`` (an empty body is ``{}`` when ``body_optional``)
        and encodes what ``handler`` returns with ``status``."""
        decoder = msgspec.json.Decoder(body) if body is not None else None
        params = tuple(query)
        encode = self._enc.encode

        async def aiohttp_handler(request: web.Request) -> web.StreamResponse:
            principal = self.principal(request)
            if not any(s in principal.scopes for s in scopes):
                raise Forbidden(f"this API key lacks the {' or '.join(map(repr, scopes))} scope")
            decoded = None
            if decoder is not None:
                raw = await request.read() if request.can_read_body else b""
                if not raw.strip():
                    if not body_optional:
                        raise InvalidRequest("a JSON body is required")
                    raw = b"{}"
                decoded = decoder.decode(raw)
            call = Call(principal, request.match_info, _query(request, params), decoded)
            result = await handler(call)
            return web.Response(body=encode(result), status=status, content_type="application/json")

        return Route(
            method,
            path,
            aiohttp_handler,
            summary,
            tag,
            scopes=scopes,
            body=body,
            body_optional=body_optional,
            answer=answer,
            status=status,
            query=params,
            path_params=dict(path_params or {}),
            errors=errors,
            description=description,
        )


def _query(request: web.Request, params: Sequence[Param]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in params:
        raw = request.query.get(p.name)
        if raw is None:
            if p.required:
                raise InvalidRequest(f"query parameter {p.name} is required", field=p.name)
            continue
        if p.type is int:
            try:
                value: Any = int(raw)
            except ValueError:
                raise InvalidRequest(f"{p.name}: an integer", field=p.name) from None
            if (p.minimum is not None and value < p.minimum) or (
                p.maximum is not None and value > p.maximum
            ):
                raise InvalidRequest(f"{p.name}: {p.minimum} to {p.maximum}", field=p.name)
        else:
            value = checked_id(raw, p.name, MAX_USER_BYTES)
        out[p.name] = value
    return out

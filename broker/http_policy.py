"""What the HTTP listener decides from a request's head alone, pure: whether a web page may
have sent it (on a node without keys), whether its body is JSON, and how to rebuild the head
for aiohttp. No sockets; tested byte by byte.

Why the site checks: a node without API keys serves loopback only, but the operator's browser
is on loopback too. A web page can make the browser send a cross-site ``text/plain`` POST
(no CORS preflight) to ``127.0.0.1:8080``, and with DNS rebinding (a name of the attacker's
that resolves to 127.0.0.1) even read the answers. So such a node answers only requests whose
``Host`` names the node (``localhost``, a loopback address, the listen address, or
``admission.allowed-hosts``), whose ``Origin``, if any, is one of those (or in
``admission.allowed-origins``), and whose ``Sec-Fetch-Site`` is not ``cross-site``; and every
node takes only ``application/json`` bodies, which a page cannot send cross-site without a
preflight the node never approves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from broker.errors import CrossSiteRequest, HeraldError, UnsupportedMediaType

_LOOPBACK_NAMES: Final = frozenset({b"localhost", b"127.0.0.1", b"[::1]", b"::1"})
_JSON: Final = b"application/json"


def host_of(authority: bytes) -> bytes:
    """The host part of a ``Host`` value or an origin's authority, lower-cased, without the
    port (``[::1]:8080`` -> ``[::1]``)."""
    value = authority.strip().lower()
    if value.startswith(b"["):
        end = value.find(b"]")
        return value[: end + 1] if end > 0 else value
    return value.partition(b":")[0]


class SitePolicy:
    """The hosts and origins a node without keys answers (see the module docstring)."""

    def __init__(self, listen_host: str, hosts: Iterable[str], origins: Iterable[str]) -> None:
        names = set(_LOOPBACK_NAMES)
        listen = listen_host.lower().encode()
        names.add(b"[%s]" % listen if b":" in listen else listen)
        names.update(host_of(h.encode()) for h in hosts)
        self.hosts = frozenset(names)
        self.origins = frozenset(o.rstrip("/").lower().encode() for o in origins)

    def check(self, host: bytes | None, origin: bytes | None, fetch_site: bytes | None) -> None:
        """Raise :class:`CrossSiteRequest` unless the request may come from this node's own
        clients. A missing ``Host`` (HTTP/1.0) is allowed: a browser always sends one."""
        if host is not None and host_of(host) not in self.hosts:
            raise CrossSiteRequest(
                "Host does not name this node (a node without API keys answers only "
                "localhost, its loopback address and admission.allowed-hosts)"
            )
        if origin is not None:
            value = origin.strip().lower().rstrip(b"/")
            scheme, sep, authority = value.partition(b"://")
            allowed = value in self.origins or (
                sep and scheme in (b"http", b"https") and host_of(authority) in self.hosts
            )
            if not allowed:
                raise CrossSiteRequest(
                    "Origin is not this node (a web page of another site cannot use a node "
                    "without API keys; see admission.allowed-origins)"
                )
        if fetch_site is not None and fetch_site.strip().lower() == b"cross-site":
            raise CrossSiteRequest("a web page of another site sent this request")


def media_type(content_type: bytes | None) -> bytes | None:
    """The media type of a ``Content-Type`` value, lower-cased, without its parameters."""
    if content_type is None:
        return None
    return content_type.partition(b";")[0].strip().lower()


def check_json(content_type: bytes | None) -> None:
    """Raise :class:`UnsupportedMediaType` unless ``content_type`` is ``application/json``
    (parameters such as ``charset`` allowed)."""
    if media_type(content_type) != _JSON:
        raise UnsupportedMediaType(
            "request bodies must be JSON, sent with Content-Type: application/json"
        )


@dataclass(frozen=True, slots=True)
class RouteRule:
    """How one route departs from the listener's defaults (a body needs an API key and is
    JSON; ``Authorization`` carries an API key).

    ``keyless_body``: a body is read without an API key, because the route proves the caller
    itself (a one-click unsubscribe's signed token, a hook's own secret). ``own_auth``:
    ``Authorization`` carries the route's own secret, not an API key: the listener neither
    checks it as a key nor counts it as a failed guess. ``body_types``: the media types the
    body may have besides JSON (a mail provider's RFC 8058 form)."""

    keyless_body: bool = False
    own_auth: bool = False
    body_types: frozenset[bytes] = frozenset()

    def check_type(self, content_type: bytes | None) -> None:
        """Raise :class:`UnsupportedMediaType` unless the body is JSON or of ``body_types``."""
        if media_type(content_type) not in self.body_types:
            check_json(content_type)


class RouteRules:
    """The few routes with a :class:`RouteRule`, found by method and path from a request's
    head alone (``{name}`` in a path matches one path segment). The listener asks only when
    a head fails a default (no key with a body, a key that matches none, a body that is not
    JSON), so the requests that pass the defaults never pay for the lookup."""

    def __init__(self, rules: Iterable[tuple[str, str, RouteRule]]) -> None:
        self._rules = [
            (method.encode(), re.compile(_PARAM.sub("[^/]+", re.escape(path)).encode()), rule)
            for method, path, rule in rules
        ]

    def __bool__(self) -> bool:
        return bool(self._rules)

    def find(self, method: bytes, target: bytes) -> RouteRule | None:
        path = target.partition(b"?")[0]
        for m, pattern, rule in self._rules:
            if m == method and pattern.fullmatch(path):
                return rule
        return None


# a path parameter as re.escape leaves it ({ and } are escaped since Python 3.7)
_PARAM: Final = re.compile(r"\\\{[a-z_]+\\\}")


# headers the listener sets itself on a request it hands to aiohttp: a client's own are dropped
INTERNAL_PREFIX: Final = b"x-herald-"
REJECT_HEADER: Final = "X-Herald-Reject"
_DROP_ON_REJECT: Final = frozenset(
    {b"content-length", b"transfer-encoding", b"expect", b"connection", b"upgrade"}
)
_DROP_ON_UPGRADE: Final = frozenset({b"connection", b"upgrade"})


def rebuild_head(
    method: bytes,
    target: bytes,
    version: str,
    headers: list[tuple[bytes, bytes]],
    *,
    reject: HeraldError | None = None,
    upgrade: bool = False,
) -> bytes:
    """The request head to hand aiohttp for a request the listener parsed: the same method,
    target, version and headers, in order, minus any ``X-Herald-*`` header the client sent.

    With ``reject``, the body is not passed on (``Content-Length: 0``) and the head carries
    ``X-Herald-Reject: <code> <message>`` and ``Connection: close``: aiohttp answers that
    error, in order with the requests before it, and closes. An ``upgrade`` request (which
    Herald's HTTP API does not offer) loses its ``Upgrade`` and is answered, then closed."""
    lines = [b"%s %s HTTP/%s\r\n" % (method, target, version.encode())]
    drop = _DROP_ON_REJECT if reject is not None else _DROP_ON_UPGRADE if upgrade else None
    for name, value in headers:
        lower = name.lower()
        if lower.startswith(INTERNAL_PREFIX) or (drop is not None and lower in drop):
            continue
        lines.append(b"%s: %s\r\n" % (name, value))
    if reject is not None:
        message = str(reject).encode("ascii", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
        lines.append(b"Content-Length: 0\r\nConnection: close\r\n")
        lines.append(b"%s: %s %s\r\n" % (REJECT_HEADER.encode(), reject.code.encode(), message))
    elif upgrade:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)

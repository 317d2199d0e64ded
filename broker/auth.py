"""API keys, scopes and tenants.

A key from the config grants a tenant and scopes (``produce``, ``consume``, ``admin``,
``engage``, ``metrics``; docs/API.md says which calls take which). With no keys configured
the node runs open but binds to loopback only (the node refuses to start otherwise) and every
client acts as tenant ``default`` with every scope.

Tenancy: each topic belongs to the tenant that created it; a principal sees only its own
tenant's topics and groups (another tenant's topic is answered as unknown, so its existence
does not leak). The tenant ``*`` is the operator: it sees everything, internal topics too.

Keys are compared as bytes, in constant time over every configured key: a header that is not
UTF-8 is just a key that matches none (401), never an error of the node.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from typing import Final

from broker.config import ApiKey
from broker.errors import Forbidden, Unauthenticated

DEFAULT_TENANT: Final = "default"
OPERATOR_TENANT: Final = "*"
# engage: record engagement (seen, read, ...) with a user's notifications, nothing else;
# metrics: scrape /metrics (every tenant's names and lag), nothing else
ALL_SCOPES: Final = frozenset({"produce", "consume", "admin", "engage", "metrics"})
_BEARER: Final = b"bearer "


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    scopes: frozenset[str]
    name: str = ""

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise Forbidden(f"this API key lacks the {scope!r} scope")

    @property
    def operator(self) -> bool:
        return self.tenant == OPERATOR_TENANT

    def qualify_group(self, group: str) -> str:
        """Groups are per tenant: the coordinator sees ``tenant/group``."""
        return f"{self.tenant}/{group}"


OPEN_PRINCIPAL: Final = Principal(DEFAULT_TENANT, ALL_SCOPES, "open")
# the node's own engines (broker/local.py) act as the operator: internal topics are theirs
NODE_PRINCIPAL: Final = Principal(OPERATOR_TENANT, ALL_SCOPES, "node")


def _as_bytes(value: str | bytes) -> bytes:
    # aiohttp decodes header bytes as UTF-8 with surrogateescape: encoding back the same way
    # gives the bytes the client sent, whatever they were
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


class Authenticator:
    def __init__(self, keys: list[ApiKey]) -> None:
        self._keys = [
            (k.key.encode(), Principal(k.tenant, frozenset(k.scopes), k.name)) for k in keys
        ]

    @property
    def open(self) -> bool:
        """True when no keys are configured (loopback-only mode)."""
        return not self._keys

    def authenticate(self, api_key: str | bytes | None) -> Principal:
        """The principal for ``api_key``. Raises :class:`Unauthenticated`, with ``key_given``
        when a key was given and matches none (a failed attempt). Constant-time
        compare over every key, so timing does not reveal which prefix matched."""
        if self.open:
            return OPEN_PRINCIPAL
        if not api_key:
            raise Unauthenticated("an API key is required (Authorization: Bearer <key>)")
        given = _as_bytes(api_key)
        found = None
        for key, principal in self._keys:
            if hmac.compare_digest(key, given):
                found = principal
        if found is None:
            raise Unauthenticated("unknown API key", key_given=True)
        return found

    def bearer(self, header: str | bytes | None) -> Principal:
        """The principal for an ``Authorization`` header value (``Bearer <key>``; the scheme
        is case-insensitive, RFC 7235)."""
        if self.open:
            return OPEN_PRINCIPAL
        raw = _as_bytes(header) if header else b""
        if raw[:7].lower() != _BEARER:
            raise Unauthenticated("an API key is required (Authorization: Bearer <key>)")
        return self.authenticate(raw[7:].strip())


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

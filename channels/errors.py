"""The channels layer's errors.

A channel reports what happened to a delivery as an :class:`~channels.base.Outcome`, never as an
exception: these errors are for misuse (a closed channel, a breaker ticket settled twice), for
values that cannot be used (a malformed secret) and for Herald's own signature checks. Each
carries a stable ``code`` in the style of ``broker.errors``.
"""

from __future__ import annotations

from typing import ClassVar


class ChannelError(Exception):
    """Base of the channels layer's errors."""

    code: ClassVar[str] = "channel_error"


class ChannelClosed(ChannelError):
    """``send`` after ``close``."""

    code = "channel_closed"


class InvalidSecret(ChannelError, ValueError):
    """A webhook secret that is not ``whsec_`` + base64 of 24 to 64 bytes."""

    code = "invalid_secret"


class SignatureError(ChannelError):
    """A Standard Webhooks signature check failed: a header is missing or malformed, the
    timestamp is outside the tolerance, or no signature matches."""

    code = "signature_invalid"


class TicketAlreadySettled(ChannelError, RuntimeError):
    """A circuit-breaker ticket was settled twice: a caller bug, refused rather than counted."""

    code = "ticket_already_settled"


class ForbiddenAddress(ChannelError, OSError):
    """A connection to an address the SSRF policy refuses (private, loopback, link-local,
    multicast, unspecified or otherwise not global, and not on the allow-list).

    An ``OSError`` so that aiohttp's connector carries it through as the cause of its
    connection error, and so that the check can live in the resolver and the socket factory.
    """

    code = "forbidden_address"

    def __init__(self, address: str, why: str) -> None:
        super().__init__(f"{address} is {why}")
        self.address = address
        self.why = why


# ------------------------------------------------------------------- HTTP transport failures
class RequestError(ChannelError):
    """An HTTP request that got no (whole) answer; ``reason`` is the outcome's reason word.
    Raised by :mod:`channels.http1`, turned into a ``retry`` outcome by the channel."""

    code = "request_failed"
    reason: ClassVar[str] = "request_failed"


class DnsError(RequestError):
    """The host name did not resolve. Nothing was sent."""

    reason = "dns_error"


class ConnectError(RequestError):
    """No connection (refused, unreachable, TLS handshake or certificate refused). Nothing
    was sent."""

    reason = "connect_error"


class ConnectTimeout(RequestError):
    """No connection within the connect timeout. Nothing was sent."""

    reason = "connect_timeout"


class RequestTimeout(RequestError):
    """No answer within the request's total timeout; the request may have been acted on."""

    reason = "timeout"


class ConnectionLost(RequestError):
    """The connection closed or reset before the answer's head arrived."""

    reason = "connection_lost"


class BadResponse(RequestError):
    """Bytes that are not an HTTP/1.x response, or a response head past the size limit."""

    reason = "bad_response"

"""One error vocabulary for the broker, its transports and its clients.

Every error Herald answers on purpose is a class that carries three facts: its stable wire
``code`` (documented in docs/PROTOCOL.md and docs/HTTP.md), whether the client may simply
retry it (``retriable``) and the ``http_status`` the HTTP API answers with. The TCP server
and the HTTP API both map an exception through :func:`describe`; neither keeps a list of
codes of its own. The storage layer's errors (:mod:`storage.errors`) carry the same three
attributes (storage imports nothing from the broker, so it declares them itself), and
:func:`describe` reads them the same way.

Pure: no I/O. The client SDK imports this module to name codes (``errors.UnknownTopic.code``).
"""

from __future__ import annotations

import functools
import re
from typing import ClassVar, NamedTuple

import msgspec

from storage import errors as storage_errors

# the storage layer's errors are part of the vocabulary: named here so that callers (the
# client SDK among them) need only this module
from storage.errors import (
    CorruptBatch,
    CorruptData,
    IncompleteBatch,
    LogClosed,
    LogOffline,
    OffsetOutOfRange,
    OutOfOrderSequence,
    StorageError,
    StorageFull,
    TopicBeingDeleted,
    TopicExists,
    UnknownTopic,
)


class HeraldError(Exception):
    """Base of the broker's errors. ``field`` names the request field at fault, if any."""

    code: ClassVar[str] = "herald_error"
    retriable: ClassVar[bool] = True
    http_status: ClassVar[int] = 500

    def __init__(self, message: str = "", *, field: str | None = None) -> None:
        super().__init__(message or self.code.replace("_", " "))
        self.field = field

    @property
    def message(self) -> str:
        return str(self)


# ------------------------------------------------------------------- requests and framing
class ProtocolError(HeraldError):
    """A request the node cannot act on. A ``fatal`` one closes the connection after the
    error frame (the stream can no longer be parsed)."""

    code = "protocol_error"
    retriable = False
    http_status = 400
    fatal: ClassVar[bool] = False


class BadFrame(ProtocolError):
    """Not msgpack, not a map, or a string that is not UTF-8."""

    code = "bad_frame"


class InvalidRequest(ProtocolError):
    """A field is missing, of the wrong type or out of range; ``field`` names it."""

    code = "invalid_request"


class FrameTooLarge(ProtocolError):
    code = "frame_too_large"
    http_status = 413
    fatal = True


class UnsupportedVersion(ProtocolError):
    code = "unsupported_version"


class PayloadTooLarge(HeraldError):
    """A body, event or batch over its configured limit."""

    code = "payload_too_large"
    retriable = False
    http_status = 413


class TooManyBatches(PayloadTooLarge):
    code = "too_many_batches"


class BatchTooLarge(PayloadTooLarge):
    code = "batch_too_large"


class UnsupportedMediaType(HeraldError):
    """A POST body that is not declared ``application/json``: refusing other types is what
    keeps a web page from posting to the node (a cross-site ``text/plain`` or form POST needs
    no CORS preflight; ``application/json`` does, and the node never approves one)."""

    code = "unsupported_media_type"
    retriable = False
    http_status = 415


class HeadersTooLarge(ProtocolError):
    """An HTTP request line and headers over the head limit; the connection is closed."""

    code = "headers_too_large"
    http_status = 431
    fatal = True


class RequestTimeout(ProtocolError):
    """A request's head or body did not arrive in time (slow or stalled client); the
    connection is closed."""

    code = "request_timeout"
    http_status = 408
    fatal = True


class NotFound(HeraldError):
    """No such HTTP route."""

    code = "not_found"
    retriable = False
    http_status = 404


class MethodNotAllowed(HeraldError):
    code = "method_not_allowed"
    retriable = False
    http_status = 405


# ------------------------------------------------------------------------------- access
class Unauthenticated(HeraldError):
    """No key, or (``key_given``) a key that matches none: the failed attempt the
    per-address throttle counts."""

    code = "unauthenticated"
    retriable = False
    http_status = 401

    def __init__(
        self, message: str = "", *, field: str | None = None, key_given: bool = False
    ) -> None:
        super().__init__(message, field=field)
        self.key_given = key_given


class Forbidden(HeraldError):
    code = "forbidden"
    retriable = False
    http_status = 403


class CrossSiteRequest(Forbidden):
    """On a node without API keys (loopback only): a request whose ``Host`` is not a name of
    this node (DNS rebinding) or whose ``Origin`` / ``Sec-Fetch-Site`` says a web page of
    another site sent it."""

    code = "cross_site_request"


class AuthThrottled(HeraldError):
    """Too many failed API-key attempts from this source address: keys from it are not
    checked until its allowance refills (``admission.auth-failures-per-minute``)."""

    code = "auth_throttled"
    retriable = True
    http_status = 429


# ------------------------------------------------------------------------------- topics
class InvalidTopic(HeraldError):
    code = "invalid_topic"
    retriable = False
    http_status = 400


class UnknownPartition(HeraldError):
    code = "unknown_partition"
    retriable = False
    http_status = 404


# ------------------------------------------------------------------------------- groups
class GroupError(HeraldError):
    code = "group_error"
    retriable = False
    http_status = 409


class UnknownMember(GroupError):
    """The member left or missed its session timeout: join again."""

    code = "unknown_member"


class NotAssigned(GroupError):
    """A commit for a partition the member does not own."""

    code = "not_assigned"


class InvalidSessionTimeout(GroupError):
    code = "invalid_session_timeout"
    http_status = 400


class UnknownGroup(GroupError):
    code = "unknown_group"
    http_status = 404


class InvalidGroup(GroupError):
    """A group name that is empty, too long or has characters outside the allowed set."""

    code = "invalid_group"
    http_status = 400


class GroupFull(GroupError):
    """A join past ``groups.max-members`` (Kafka's GROUP_MAX_SIZE_REACHED)."""

    code = "group_max_size_reached"
    http_status = 409


class OffsetMetadataTooLarge(PayloadTooLarge):
    """Commit metadata over ``groups.max-commit-metadata-bytes``."""

    code = "offset_metadata_too_large"


# ------------------------------------------------------------------ producers and batches
class UnknownProducerId(HeraldError):
    """A batch names a producer id this node never issued to the tenant, or one that
    expired after ``quotas.producer-id-expiration-ms`` idle: get a new one (``init_producer``)."""

    code = "unknown_producer_id"
    retriable = False
    http_status = 400


class InvalidTimestamp(HeraldError):
    """A batch's timestamps are too far from the node's clock
    (``topics.timestamp-after-max-ms`` / ``timestamp-before-max-ms``)."""

    code = "invalid_timestamp"
    retriable = False
    http_status = 400


# --------------------------------------------------------------------------- quotas
class QuotaExceeded(HeraldError):
    """A tenant's count quota (topics, partitions, groups, producer ids, state-store bytes)
    or a node total is reached; the message names the quota. Rates never raise this: they
    throttle."""

    code = "quota_exceeded"
    retriable = False
    http_status = 429

    def __init__(self, message: str = "", *, quota: str, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.quota = quota


# ------------------------------------------------------------------------ node and load
class ShuttingDown(HeraldError):
    code = "shutting_down"
    retriable = True
    http_status = 503


class Timeout(HeraldError):
    code = "timeout"
    retriable = True
    http_status = 504


class TooManyInflight(HeraldError):
    code = "too_many_inflight"
    retriable = True
    http_status = 429


class TooManyConnections(HeraldError):
    code = "too_many_connections"
    retriable = True
    http_status = 503


class ServerBusy(HeraldError):
    """The node's budget for request bytes in flight (bodies and frames being received) is
    spent: the request is refused rather than buffered; retry shortly."""

    code = "server_busy"
    retriable = True
    http_status = 503


class StateStoreFailed(HeraldError):
    """The state store (LMDB) could not sync: the node cannot keep its promises and stops."""

    code = "state_store_failed"
    retriable = False
    http_status = 503


class Internal(HeraldError):
    code = "internal_error"
    retriable = True
    http_status = 500


class ErrorInfo(NamedTuple):
    code: str
    message: str
    retriable: bool
    http_status: int
    field: str | None


# an absolute file path in a message (not a topic/partition name such as ``orders/3``): the
# wire never learns where the node keeps its data
_PATH = re.compile(r"(?<![\w.~-])/[^\s'\",;:)]+")


def redact_paths(message: str) -> str:
    """``message`` with every absolute file path replaced by ``<path>``. The node's log keeps
    the full message; answers on the wire carry this one."""
    return _PATH.sub("<path>", message) if "/" in message else message


def describe(exc: BaseException) -> ErrorInfo:
    """The answer for ``exc``: a Herald or storage error answers with its own code, status
    and retriability; a msgspec validation error is ``invalid_request`` naming the field;
    anything else is an ``internal_error`` whose message does not leak internals. Messages
    never carry a file path (a storage error's ``OSError`` would name the data directory)."""
    if isinstance(exc, msgspec.ValidationError):
        message = str(exc)
        return ErrorInfo("invalid_request", message, False, 400, field_of(message))
    if isinstance(exc, msgspec.DecodeError):
        return ErrorInfo("invalid_request", f"body is not valid JSON: {exc}", False, 400, None)
    if isinstance(exc, HeraldError | storage_errors.StorageError):
        message = str(exc)
        if isinstance(exc, storage_errors.StorageError):
            message = redact_paths(message)
        return ErrorInfo(
            exc.code, message, exc.retriable, exc.http_status, getattr(exc, "field", None)
        )
    return ErrorInfo("internal_error", f"internal error: {type(exc).__name__}", True, 500, None)


def field_of(message: str) -> str | None:
    """The path of the field a msgspec validation message is about: ``at `$.a[1]``` gives
    the location, and a missing or unknown field is named only in the message itself."""
    path = ""
    at = message.find("at `$")
    if at >= 0:
        end = message.find("`", at + 5)
        path = message[at + 5 : end].lstrip(".") if end > 0 else ""
    for marker in ("missing required field `", "contains unknown field `"):
        i = message.find(marker)
        if i >= 0:
            j = message.find("`", i + len(marker))
            name = message[i + len(marker) : j]
            path = f"{path}.{name}" if path else name
    return path or None


def all_error_classes() -> list[type[BaseException]]:
    """Every error class of the vocabulary (broker and storage), for docs and tests."""
    out: list[type[BaseException]] = []
    stack: list[type[BaseException]] = [HeraldError, storage_errors.StorageError]
    while stack:
        cls = stack.pop()
        out.append(cls)
        stack.extend(cls.__subclasses__())
    return out


@functools.cache
def _statuses() -> dict[str, int]:
    return {
        c.code: c.http_status  # type: ignore[attr-defined]
        for c in all_error_classes()
    }


@functools.cache
def _classes() -> dict[str, type[BaseException]]:
    out: dict[str, type[BaseException]] = {}
    for c in all_error_classes():
        out.setdefault(c.code, c)  # type: ignore[attr-defined]
    return out


def error_class(code: str) -> type[BaseException]:
    """The error class for ``code`` (``Internal`` for a code nobody declared)."""
    return _classes().get(code, Internal)


def http_status_of(code: str) -> int:
    """The HTTP status for an error known only by its code (e.g. a fetch's per-partition
    error)."""
    return _statuses().get(code, 500)


__all__ = [
    "AuthThrottled",
    "BadFrame",
    "BatchTooLarge",
    "CorruptBatch",
    "CorruptData",
    "CrossSiteRequest",
    "ErrorInfo",
    "Forbidden",
    "FrameTooLarge",
    "GroupError",
    "GroupFull",
    "HeadersTooLarge",
    "HeraldError",
    "IncompleteBatch",
    "Internal",
    "InvalidGroup",
    "InvalidRequest",
    "InvalidSessionTimeout",
    "InvalidTimestamp",
    "InvalidTopic",
    "LogClosed",
    "LogOffline",
    "MethodNotAllowed",
    "NotAssigned",
    "NotFound",
    "OffsetMetadataTooLarge",
    "OffsetOutOfRange",
    "OutOfOrderSequence",
    "PayloadTooLarge",
    "ProtocolError",
    "QuotaExceeded",
    "RequestTimeout",
    "ServerBusy",
    "ShuttingDown",
    "StateStoreFailed",
    "StorageError",
    "StorageFull",
    "Timeout",
    "TooManyBatches",
    "TooManyConnections",
    "TooManyInflight",
    "TopicBeingDeleted",
    "TopicExists",
    "Unauthenticated",
    "UnknownGroup",
    "UnknownMember",
    "UnknownPartition",
    "UnknownProducerId",
    "UnknownTopic",
    "UnsupportedMediaType",
    "UnsupportedVersion",
    "_statuses",
    "all_error_classes",
    "describe",
    "error_class",
    "field_of",
    "http_status_of",
    "redact_paths",
]

"""Herald's binary protocol, sans-I/O: frames and messages, no sockets.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack. Every request
is a msgpack map with ``op`` (the message type) and ``id`` (a correlation id chosen by the
client); the response carries the same ``id``, so one connection can pipeline many requests
and responses may come back out of order. The full description is in ``docs/PROTOCOL.md``.

Decoding validates: a request that is not one of the known ops, lacks a field or has a field
of the wrong type becomes a :class:`ProtocolError` naming the field, answered with an
``Error`` frame; the connection stays usable. A frame larger than the configured maximum
cannot be skipped safely without reading it, so the connection is answered and closed.
"""

from __future__ import annotations

import struct
from typing import Any, Final, Literal

import msgspec
import xxhash

from broker import errors

PROTOCOL_VERSION: Final = 1
_LEN = struct.Struct(">I")


# Errors are the classes of broker/errors.py: each carries its code, retriability and HTTP
# status (codes documented in docs/PROTOCOL.md).
ProtocolError = errors.ProtocolError


def partition_for_key(key: bytes, partitions: int) -> int:
    """Stable key -> partition: xxh3_64 of the key modulo the partition count. Clients and
    the broker use the same function, so either may choose."""
    return xxhash.xxh3_64_intdigest(key) % partitions


# ------------------------------------------------------------------------------- framing


def encode_frame(payload: bytes) -> bytes:
    return _LEN.pack(len(payload)) + payload


class FrameDecoder:
    """Splits a byte stream into frames. Feed bytes with :meth:`feed`; it returns the
    complete frames' payloads. Raises a fatal :class:`ProtocolError` for a frame declared
    larger than ``max_frame_bytes`` (memory cost: at most one partial frame of that size is
    buffered per connection)."""

    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        end = len(data)
        if not buf and end >= 4:
            # fast path: no partial frame pending, parse straight from ``data``
            (size,) = _LEN.unpack_from(data)
            if size == end - 4 and size <= self.max_frame_bytes and type(data) is bytes:
                # the commonest read, one whole frame (a request, a reply): no view, no loop
                return [data[4:]]
            frames, pos = self._split(data)
            if pos < end:
                buf += data[pos:]
            return frames
        buf += data
        frames, pos = self._split(buf)
        if pos:
            del buf[:pos]
        return frames

    def _split(self, data: bytes | bytearray) -> tuple[list[bytes], int]:
        frames: list[bytes] = []
        pos = 0
        end = len(data)
        limit = self.max_frame_bytes
        view = memoryview(data)  # slicing a bytearray copies; a view's slice does not
        while end - pos >= 4:
            (size,) = _LEN.unpack_from(data, pos)
            if size > limit:
                raise errors.FrameTooLarge(f"frame of {size} bytes exceeds max_frame_bytes={limit}")
            if end - pos - 4 < size:
                break
            frames.append(bytes(view[pos + 4 : pos + 4 + size]))  # the one copy
            pos += 4 + size
        view.release()  # or ``del buf[:pos]`` in feed() fails: a view pins the bytearray
        return frames, pos


# ------------------------------------------------------------------------------ requests

Acks = Literal[0, 1, -1]
OffsetSpec = Literal["earliest", "latest"] | int


class _Req(msgspec.Struct, tag_field="op", forbid_unknown_fields=True, kw_only=True):
    id: int


class Hello(_Req, tag="hello"):
    """Optional first request: protocol version, client name and API key."""

    version: int = PROTOCOL_VERSION
    client_id: str = ""
    api_key: str | None = None


class Produce(_Req, tag="produce"):
    """Append ``batches`` (record batches as built by ``storage.records``) to one partition:
    ``partition`` if given, else the partition of ``key``'s xxhash, else round robin."""

    topic: str
    batches: list[bytes]
    partition: int | None = None
    key: bytes | None = None
    acks: Acks = -1


class FetchPartition(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    topic: str
    partition: int
    offset: int
    max_bytes: int = 1024 * 1024


class Fetch(_Req, tag="fetch"):
    """Raw batches from each partition at its offset. Waits up to ``max_wait_ms`` until at
    least ``min_bytes`` are available in total (long poll)."""

    partitions: list[FetchPartition]
    max_wait_ms: int = 0
    min_bytes: int = 1
    max_bytes: int = 16 * 1024 * 1024


class ListOffsets(_Req, tag="list_offsets"):
    topic: str
    partition: int
    spec: OffsetSpec = "latest"


class Metadata(_Req, tag="metadata"):
    """Describe ``topics`` (all visible ones if None). With ``auto_create``, missing topics
    are created as a produce would create them (when the node's policy allows)."""

    topics: list[str] | None = None
    auto_create: bool = False


class CreateTopic(_Req, tag="create_topic"):
    topic: str
    partitions: int | None = None
    retention_ms: int | None = None
    retention_bytes: int | None = None
    exist_ok: bool = False


class DeleteTopic(_Req, tag="delete_topic"):
    topic: str


class InitProducer(_Req, tag="init_producer"):
    pass


class JoinGroup(_Req, tag="join_group"):
    group: str
    topics: list[str]
    member_id: str | None = None
    session_timeout_ms: int | None = None
    assignor: Literal["range", "sticky"] | None = None
    client_id: str = ""


class Heartbeat(_Req, tag="heartbeat"):
    """Report the partitions this member is consuming; the answer is what it may consume
    now (cooperative hand-off: a partition moves only after its previous owner stopped
    reporting it)."""

    group: str
    member_id: str
    generation: int
    owned: list[tuple[str, int]] = []


class LeaveGroup(_Req, tag="leave_group"):
    group: str
    member_id: str


class CommitOffsets(_Req, tag="commit_offsets"):
    """Store offsets (the next offset to consume) for partitions the member owns. With
    ``member_id`` None the commit is accepted only while the group has no live members
    (a consumer managing its own assignment)."""

    group: str
    offsets: list[tuple[str, int, int]]
    member_id: str | None = None
    generation: int = -1
    metadata: str = ""


class FetchOffsets(_Req, tag="fetch_offsets"):
    group: str
    partitions: list[tuple[str, int]] | None = None


class ListGroups(_Req, tag="list_groups"):
    pass


class EventSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """An event as ``publish`` carries it (the same fields as ``POST /events``; ``payload``
    is any msgpack value that has a JSON form)."""

    topic: str
    payload: Any
    event_id: str | None = None
    key: str | None = None
    users: list[str] | None = None
    priority: Literal["low", "normal", "high", "critical"] = "normal"
    metadata: dict[str, str] | None = None


class Publish(_Req, tag="publish"):
    """Publish notification events into ``__events`` (the event front door, as ``POST
    /events/batch``). Answered once they are durable."""

    events: list[EventSpec]


class DescribeGroup(_Req, tag="describe_group"):
    group: str


Request = (
    Hello
    | Produce
    | Fetch
    | ListOffsets
    | Metadata
    | CreateTopic
    | DeleteTopic
    | InitProducer
    | JoinGroup
    | Heartbeat
    | LeaveGroup
    | CommitOffsets
    | FetchOffsets
    | ListGroups
    | DescribeGroup
    | Publish
)

# ----------------------------------------------------------------------------- responses


class _Resp(msgspec.Struct, tag_field="op", kw_only=True):
    id: int


class Error(_Resp, tag="error"):
    code: str
    message: str
    retriable: bool = False


class HelloOk(_Resp, tag="hello_ok"):
    version: int
    node_id: int
    tenant: str
    scopes: list[str]


class Produced(_Resp, tag="produced", omit_defaults=True):
    topic: str
    partition: int
    base_offset: int
    last_offset: int
    duplicate: bool = False
    # how long the answer was held back because the tenant is over its produce rate
    throttle_ms: int = 0


class FetchedPartition(msgspec.Struct, array_like=True):
    topic: str
    partition: int
    high_watermark: int
    log_start_offset: int
    records: bytes
    error: str | None = None
    # with error "corrupt_data": the first offset after the damaged (quarantined) range, where
    # a consumer that decides to skip the damage goes on; -1 otherwise
    resume_offset: int = -1


class Fetched(_Resp, tag="fetched", omit_defaults=True):
    partitions: list[FetchedPartition]
    # how long the fetch waited because the tenant is over its fetch rate
    throttle_ms: int = 0


class Offsets(_Resp, tag="offsets"):
    topic: str
    partition: int
    offset: int


class PartitionInfo(msgspec.Struct):
    partition: int
    leader: int
    log_start_offset: int
    high_watermark: int
    size_bytes: int
    segments: int


class TopicInfo(msgspec.Struct):
    name: str
    partitions: list[PartitionInfo]
    internal: bool
    retention_ms: int | None
    retention_bytes: int | None


class MetadataResult(_Resp, tag="metadata_result"):
    node_id: int
    topics: list[TopicInfo]


class TopicCreated(_Resp, tag="topic_created"):
    topic: TopicInfo
    created: bool


class TopicDeleted(_Resp, tag="topic_deleted"):
    topic: str


class ProducerId(_Resp, tag="producer_id"):
    producer_id: int


class Joined(_Resp, tag="joined"):
    group: str
    member_id: str
    generation: int
    session_timeout_ms: int
    heartbeat_interval_ms: int
    assignment: list[tuple[str, int]]


class HeartbeatResult(_Resp, tag="heartbeat_result"):
    generation: int
    assignment: list[tuple[str, int]]
    # true while partitions are still moving: heartbeat again soon
    rebalancing: bool


class Left(_Resp, tag="left"):
    pass


class Committed(_Resp, tag="committed"):
    count: int


class CommittedOffset(msgspec.Struct, array_like=True):
    topic: str
    partition: int
    offset: int  # -1: none committed
    metadata: str


class OffsetsFetched(_Resp, tag="offsets_fetched"):
    offsets: list[CommittedOffset]


class MemberInfo(msgspec.Struct):
    member_id: str
    client_id: str
    assignment: list[tuple[str, int]]
    last_heartbeat_ms_ago: int


class PartitionLag(msgspec.Struct):
    topic: str
    partition: int
    committed: int
    high_watermark: int
    lag: int


class GroupInfo(msgspec.Struct):
    group: str
    state: str
    generation: int
    assignor: str
    topics: list[str]
    members: list[MemberInfo]
    offsets: list[PartitionLag]


class GroupsListed(_Resp, tag="groups_listed"):
    groups: list[str]


class GroupDescribed(_Resp, tag="group_described"):
    group: GroupInfo


class PublishedEvent(msgspec.Struct, array_like=True):
    event_id: str
    partition: int
    offset: int
    duplicate: bool


class Published(_Resp, tag="published", omit_defaults=True):
    results: list[PublishedEvent]
    throttle_ms: int = 0


Response = (
    Error
    | HelloOk
    | Produced
    | Fetched
    | Offsets
    | MetadataResult
    | TopicCreated
    | TopicDeleted
    | ProducerId
    | Joined
    | HeartbeatResult
    | Left
    | Committed
    | OffsetsFetched
    | GroupsListed
    | GroupDescribed
    | Published
)

_request_decoder = msgspec.msgpack.Decoder(Request)
_response_decoder = msgspec.msgpack.Decoder(Response)
_encoder = msgspec.msgpack.Encoder()
_id_decoder = msgspec.msgpack.Decoder(dict[str, object])


def decode_request(payload: bytes) -> Request:
    """Decode one request frame. Raises :class:`ProtocolError` (not fatal): ``bad_frame``
    when the payload is not a msgpack map, ``invalid_request`` naming the field otherwise."""
    if not payload or not (0x80 <= payload[0] <= 0x8F or payload[0] in (0xDE, 0xDF)):
        raise errors.BadFrame("a request must be a msgpack map")
    try:
        req: Request = _request_decoder.decode(payload)
        return req
    except msgspec.ValidationError as exc:
        raise errors.InvalidRequest(str(exc), field=errors.field_of(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise errors.BadFrame(f"not a msgpack message: {exc}") from None
    except UnicodeDecodeError:  # msgspec raises it bare for a str that is not UTF-8
        raise errors.BadFrame("a string is not valid UTF-8") from None
    except RecursionError:
        # msgspec raises it for values nested past the interpreter's recursion limit; left
        # alone it would escape the connection handler
        raise errors.BadFrame("message nested too deeply") from None


def request_id_of(payload: bytes) -> int:
    """Best-effort correlation id of a request that failed to decode (0 if none), so the
    error reply can still be matched by the client."""
    try:
        raw = _id_decoder.decode(payload)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return 0
    rid = raw.get("id")
    return rid if isinstance(rid, int) and not isinstance(rid, bool) else 0


def encode_message(msg: _Req | _Resp) -> bytearray:
    """Encode a request or response as a whole frame (length prefix included), with one copy
    of the payload: msgspec encodes straight into the frame buffer after the prefix."""
    frame = bytearray(4)
    _encoder.encode_into(msg, frame, 4)
    _LEN.pack_into(frame, 0, len(frame) - 4)
    return frame


def decode_response(payload: bytes) -> Response:
    try:
        resp: Response = _response_decoder.decode(payload)
        return resp
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise errors.BadFrame(f"bad response frame: {exc}") from None

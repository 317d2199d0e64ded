"""Requests to the front door, by op: one handler per request type of the protocol, shared by
the TCP server and the in-process client of the node's engines (``broker/local.py``).

A handler takes the authenticated principal and the decoded request and returns the reply,
a :class:`Pending` reply (the front door handed back an acknowledgement to wait for: a
produce or a publish), or a coroutine that returns the reply (requests that must wait: long
polls, topic deletion, offset commits and producer ids, which wait for the state store's
sync). Errors are raised; the caller answers them through ``broker.errors.describe``.

A produce (or a metadata request with ``auto_create``) naming a topic that is being
auto-created becomes a coroutine: it waits for the creation (in a worker thread, owned by
``broker/topics.py``), then runs again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec

from broker import protocol as p
from broker.auth import Principal
from broker.errors import InvalidRequest
from broker.events import EventIn, EventIntake
from broker.service import BrokerService
from broker.topics import TopicPending, created


class Pending(NamedTuple):
    """A reply to send once ``ack`` resolves (an error frame if it fails)."""

    ack: asyncio.Future[Any]
    reply: Any


Handler = Callable[[Principal, Any], Any]


def handler_table(
    service: BrokerService, intake: EventIntake, node_id: int, *, in_process: bool = False
) -> dict[type, Handler]:
    """One handler per op: each calls the front door and returns the reply, a
    :class:`Pending` reply or a coroutine that returns the reply. ``in_process``: for a
    client whose requests run in its caller's task (``broker/local.py``): a fetch answered
    without waiting then yields a turn of the loop, as a reply over a socket would."""

    def produce_now(pr: Principal, req: p.Produce) -> Any:
        a = service.produce(
            pr, req.topic, req.batches, partition=req.partition, key=req.key, acks=req.acks
        )
        reply = p.Produced(
            id=req.id,
            topic=req.topic,
            partition=a.partition,
            base_offset=a.base_offset,
            last_offset=a.last_offset,
            duplicate=a.duplicate,
            throttle_ms=a.throttle_ms,
        )
        return reply if a.ack is None else Pending(a.ack, reply)

    def produce(pr: Principal, req: p.Produce) -> Any:
        try:  # when_created's work, without a closure per produce
            return produce_now(pr, req)
        except TopicPending as pending:
            return _after_create(pending, lambda: produce_now(pr, req))

    # in process: the partitions this client's fetches resolved, kept across fetches (one
    # principal; a closed partition is looked up again)
    resolved: dict[tuple[str, int], Any] | None = {} if in_process else None

    async def fetch(pr: Principal, req: p.Fetch) -> p.Fetched:
        partitions, throttle_ms = await service.fetch(
            pr, req, yield_at_once=in_process, only_data=in_process, resolved=resolved
        )
        return p.Fetched(id=req.id, partitions=partitions, throttle_ms=throttle_ms)

    def list_offsets(pr: Principal, req: p.ListOffsets) -> p.Offsets:
        off = service.list_offsets(pr, req.topic, req.partition, req.spec)
        return p.Offsets(id=req.id, topic=req.topic, partition=req.partition, offset=off)

    def metadata(pr: Principal, req: p.Metadata) -> Any:
        def now() -> p.MetadataResult:
            topics = service.metadata(pr, req.topics, auto_create=req.auto_create)
            return p.MetadataResult(id=req.id, node_id=node_id, topics=topics)

        return when_created(now)

    async def create_topic(pr: Principal, req: p.CreateTopic) -> p.TopicCreated:
        info, made = await service.create_topic(pr, req)
        return p.TopicCreated(id=req.id, topic=info, created=made)

    async def delete_topic(pr: Principal, req: p.DeleteTopic) -> p.TopicDeleted:
        await service.delete_topic(pr, req.topic)
        return p.TopicDeleted(id=req.id, topic=req.topic)

    async def init_producer(pr: Principal, req: p.InitProducer) -> p.ProducerId:
        return p.ProducerId(id=req.id, producer_id=await service.init_producer(pr))

    def list_groups(pr: Principal, req: p.ListGroups) -> p.GroupsListed:
        return p.GroupsListed(id=req.id, groups=service.list_groups(pr))

    def describe_group(pr: Principal, req: p.DescribeGroup) -> p.GroupDescribed:
        return p.GroupDescribed(id=req.id, group=service.describe_group(pr, req.group))

    def publish(pr: Principal, req: p.Publish) -> Any:
        accepted = intake.publish(pr, [to_event_in(e) for e in req.events], batch=True)
        reply = p.Published(
            id=req.id,
            results=[
                p.PublishedEvent(r.event_id, r.partition, r.offset, r.duplicate)
                for r in accepted.results
            ],
            throttle_ms=accepted.throttle_ms,
        )
        return reply if accepted.ack is None else Pending(accepted.ack, reply)

    return {
        p.Produce: produce,
        p.Fetch: fetch,
        p.ListOffsets: list_offsets,
        p.Metadata: metadata,
        p.CreateTopic: create_topic,
        p.DeleteTopic: delete_topic,
        p.InitProducer: init_producer,
        p.JoinGroup: service.join_group,
        p.Heartbeat: service.heartbeat,
        p.LeaveGroup: service.leave_group,
        p.CommitOffsets: service.commit_offsets,
        p.FetchOffsets: service.fetch_offsets,
        p.ListGroups: list_groups,
        p.DescribeGroup: describe_group,
        p.Publish: publish,
    }


def when_created(attempt: Callable[[], Any]) -> Any:
    """``attempt()``, or, while it names a topic being auto-created, a coroutine that waits
    for the creation and tries again (the reply, or an error raised)."""
    try:
        return attempt()
    except TopicPending as pending:
        return _after_create(pending, attempt)


async def _after_create(pending: TopicPending, attempt: Callable[[], Any]) -> Any:
    while True:
        await created(pending)
        try:
            outcome = attempt()
        except TopicPending as again:
            pending = again
            continue
        if isinstance(outcome, Pending):
            await outcome.ack
            return outcome.reply
        return outcome


_json = msgspec.json.Encoder()


def to_event_in(spec: p.EventSpec) -> EventIn:
    try:
        payload = msgspec.Raw(_json.encode(spec.payload))
    except (TypeError, msgspec.EncodeError) as exc:
        raise InvalidRequest(f"payload has no JSON form: {exc}", field="payload") from None
    return EventIn(
        topic=spec.topic,
        payload=payload,
        event_id=spec.event_id,
        key=spec.key,
        users=spec.users,
        priority=spec.priority,
        metadata=spec.metadata,
    )

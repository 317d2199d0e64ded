"""Routes over the engine: cancellation by key, event status, a user's feed and engagement
marks, dead letters (``docs/API.md``). Plumbing in ``notify/api_base.py``."""

from __future__ import annotations

from typing import Any, Final

import msgspec

from broker.errors import InvalidRequest
from broker.openapi import Param, Route
from notify.api_base import CANCEL, ENGAGE, READ, WRITE, Api, Call, checked_id
from notify.api_model import (
    AttemptOut,
    CancelIn,
    Cancelled,
    DeadLetterOut,
    DeadLettersPage,
    Deleted,
    EventStatusOut,
    FeedItem,
    FeedOut,
    MarkOut,
    Replayed,
    ReplayIn,
    StatusItem,
    answer,
)
from notify.audit import ENGAGEMENTS, feed_cursor
from notify.errors import (
    UnknownChannel,
    UnknownDeadLetter,
    UnknownEvent,
    UnknownNotification,
)
from notify.model import DeadLetter, Notification
from notify.registry import MAX_USER_BYTES

MAX_FEED_PAGE: Final = 500
MAX_DLQ_PAGE: Final = 1000
MAX_CANCEL_USERS: Final = 10_000
USER = {"user": "the user's id in your tenant"}
NOTE = {**USER, "notification": "a notification id (the id of a feed item)"}
CHANNEL = {"channel": "a channel this node runs (notify.channels)"}
LETTER = {**CHANNEL, "delivery_id": "the dead letter's delivery id"}


def feed_item(user: str, key: bytes, note: Notification, tenant: str) -> FeedItem:
    """A feed item from a ``notify_notes`` row (``tenant\\0user\\0run_id``)."""
    run_id = key.decode().rsplit("\0", 1)[1]
    return FeedItem(
        id=run_id,
        cursor=_api_cursor(feed_cursor(note.created_ms, run_id)),
        event_id=note.event_id,
        topic=note.topic,
        created_ms=note.created_ms,
        seen="seen" in note.engagement,
        read="read" in note.engagement,
        archived="archived" in note.engagement,
        engagement=list(note.engagement),
    )


def letter_out(letter: DeadLetter) -> DeadLetterOut:
    d = letter.delivery
    return DeadLetterOut(
        delivery_id=d.delivery_id,
        channel=d.channel,
        event_id=d.event_id,
        user=d.user,
        topic=d.topic,
        priority=d.priority,
        category=d.category,
        reason=letter.reason,
        attempts=[answer(a, AttemptOut) for a in letter.attempts],
        created_ms=d.created_ms,
        dead_ms=letter.dead_ms,
        replay=d.replay,
        data=d.data,
    )


def _api_cursor(engine_cursor: str) -> str:
    # the engine's cursor holds a NUL; a query string should not have to
    return engine_cursor.replace("\0", ":")


def _engine_cursor(api_cursor: str) -> str:
    return api_cursor.replace(":", "\0", 1)


class EngineHandlers:
    def __init__(self, api: Api) -> None:
        self.api = api
        self.engine = api.engine

    def _channel(self, call: Call) -> str:
        channel = call.path["channel"]
        if channel not in self.engine.ncfg.channels:
            raise UnknownChannel(f"this node runs no channel {channel[:64]!r}", field="channel")
        return channel

    # ---------------------------------------------------------------------- events
    async def cancel(self, call: Call) -> Cancelled:
        body: CancelIn = call.body
        if not 1 <= len(body.cancellation_key) <= 256:
            raise InvalidRequest("cancellation_key: 1-256 characters", field="cancellation_key")
        users = body.users
        if users is not None:
            if len(users) > MAX_CANCEL_USERS:
                raise InvalidRequest(f"users: at most {MAX_CANCEL_USERS}", field="users")
            users = [checked_id(u, f"users[{i}]", MAX_USER_BYTES) for i, u in enumerate(users)]
        n = await self.engine.cancel(call.tenant, body.cancellation_key, users)
        return Cancelled(cancellation_key=body.cancellation_key, cancelled=n)

    async def event_status(self, call: Call) -> EventStatusOut:
        event_id = call.id("event_id")
        rows = self.engine.event_status(call.tenant, event_id)
        if not rows:
            raise UnknownEvent(f"no status is recorded for event {event_id!r}", field="event_id")
        return EventStatusOut(event_id=event_id, recipients=[_status_item(r) for r in rows])

    # ------------------------------------------------------------------------ feed
    async def feed(self, call: Call) -> FeedOut:
        user = call.id("user", MAX_USER_BYTES)
        limit = call.query.get("limit", 50)
        before = call.query.get("before")
        page = self.engine.feed(
            call.tenant,
            user,
            before=_engine_cursor(before) if before is not None else None,
            limit=limit,
        )
        items = [FeedItem(**{**i, "cursor": _api_cursor(i["cursor"])}) for i in page["items"]]
        more = len(items) == limit
        return FeedOut(
            items=items,
            unread=page["unread"],
            next_before=items[-1].cursor if more and items else None,
        )

    def mark(self, what: str) -> Any:
        async def handler(call: Call) -> MarkOut:
            user = call.id("user", MAX_USER_BYTES)
            nid = call.id("notification")
            if not await self.engine.mark(call.tenant, user, nid, what):
                raise UnknownNotification(
                    f"user {user!r} has no notification {nid!r}", field="notification"
                )
            note = self.engine.index.notes.get(f"{call.tenant}\0{user}\0{nid}")
            return MarkOut(id=nid, engagement=list(note.engagement) if note else [what])

        return handler

    # ---------------------------------------------------------------- dead letters
    async def dlq_list(self, call: Call) -> DeadLettersPage:
        channel = self._channel(call)
        limit = call.query.get("limit", 100)
        letters = self.engine.dlq_list(
            call.tenant, channel, after=call.query.get("after"), limit=limit
        )
        more = len(letters) == limit
        return DeadLettersPage(
            channel=channel,
            dead_letters=[letter_out(x) for x in letters],
            next_after=letters[-1].delivery.delivery_id if more and letters else None,
        )

    async def dlq_show(self, call: Call) -> DeadLetterOut:
        channel = self._channel(call)
        delivery_id = call.id("delivery_id")
        letter = self.engine.dlq_show(call.tenant, channel, delivery_id)
        if letter is None:
            raise UnknownDeadLetter(f"no dead letter {delivery_id!r}", field="delivery_id")
        return letter_out(letter)

    async def dlq_replay(self, call: Call) -> Replayed:
        channel = self._channel(call)
        body: ReplayIn = call.body
        ids = body.ids
        if ids is not None:
            if not 1 <= len(ids) <= MAX_DLQ_PAGE:
                raise InvalidRequest(
                    f"ids: 1 to {MAX_DLQ_PAGE} (leave it out for all)", field="ids"
                )
            ids = [checked_id(x, f"ids[{i}]") for i, x in enumerate(ids)]
        replayed = await self.engine.dlq_replay(call.tenant, channel, ids)
        done = set(replayed)
        missing = [x for x in dict.fromkeys(ids)] if ids is not None else []
        return Replayed(replayed=replayed, missing=[x for x in missing if x not in done])

    async def dlq_purge(self, call: Call) -> Deleted:
        channel = self._channel(call)
        delivery_id = call.id("delivery_id")
        if not await self.engine.dlq_purge(call.tenant, channel, delivery_id):
            raise UnknownDeadLetter(f"no dead letter {delivery_id!r}", field="delivery_id")
        return Deleted(deleted=delivery_id)


def _status_item(r: dict[str, Any]) -> StatusItem:
    return StatusItem(
        user=r["user"],
        channel=r["channel"],
        status=r["status"],
        delivery_id=r.get("delivery_id"),
        reason=r.get("reason"),
        detail=r.get("detail"),
        until_ms=r.get("until_ms"),
        attempts=[msgspec.convert(a, AttemptOut) for a in r.get("attempts", [])],
        updated_ms=r["updated_ms"],
        topic=r.get("topic"),
        engagement=list(r.get("engagement", [])),
    )


def routes(api: Api) -> list[Route]:
    h = EngineHandlers(api)
    r = api.route
    page = (
        Param("after", str, "the next_after of the previous page"),
        Param("limit", int, f"items per page (default 100, at most {MAX_DLQ_PAGE})",
              minimum=1, maximum=MAX_DLQ_PAGE),
    )  # fmt: skip
    feed_page = (
        Param("before", str, "the next_before of the previous page"),
        Param("limit", int, f"items per page (default 50, at most {MAX_FEED_PAGE})",
              minimum=1, maximum=MAX_FEED_PAGE),
    )  # fmt: skip
    out = [
        r("POST", "/events/cancel", h.cancel, "Cancel parked runs by cancellation key",
          "events", scopes=CANCEL, body=CancelIn, answer=Cancelled,
          description="Every run of the key (of `users` only, if given) still parked in a "
          "delay, deferral or batch window is cancelled, recorded per recipient as "
          "cancelled. Runs already past their pause are not reached."),
        r("GET", "/events/{event_id}", h.event_status, "Delivery status of an event",
          "events", scopes=READ, answer=EventStatusOut,
          path_params={"event_id": "the event_id POST /events answered"}, errors=(404,),
          description="Per recipient and channel: the delivery status, why (the rule, "
          "preference, cap or window that decided), every attempt, and the engagement."),
        r("GET", "/users/{user}/notifications", h.feed, "A user's feed", "feeds",
          scopes=READ, answer=FeedOut, path_params=USER, query=feed_page,
          description="Newest first, with seen/read state and the unread count."),
        r("GET", "/dlq/{channel}", h.dlq_list, "List dead letters", "dead letters",
          scopes=READ, answer=DeadLettersPage, path_params=CHANNEL, query=page,
          errors=(404,)),
        r("GET", "/dlq/{channel}/{delivery_id}", h.dlq_show, "Show a dead letter",
          "dead letters", scopes=READ, answer=DeadLetterOut, path_params=LETTER,
          errors=(404,)),
        r("POST", "/dlq/{channel}/replay", h.dlq_replay, "Replay dead letters",
          "dead letters", scopes=WRITE, body=ReplayIn, body_optional=True, answer=Replayed,
          path_params=CHANNEL, errors=(404,),
          description="The given ids, or without ids every dead letter of the channel: "
          "each is sent again with a fresh attempt count and the same delivery id."),
        r("DELETE", "/dlq/{channel}/{delivery_id}", h.dlq_purge, "Purge a dead letter",
          "dead letters", scopes=WRITE, answer=Deleted, path_params=LETTER,
          errors=(404,)),
    ]  # fmt: skip
    for what in ENGAGEMENTS:
        out.append(
            r("POST", f"/users/{{user}}/notifications/{{notification}}/{what}", h.mark(what),
              f"Mark a notification {what}", "feeds", scopes=ENGAGE, answer=MarkOut,
              path_params=NOTE, errors=(404,),
              description="Durable before the answer; wait_seen steps read it at their "
              "deadline." if what == "seen" else "Durable before the answer.")
        )  # fmt: skip
    return out

"""The notification HTTP API on a real node (``herald serve`` on 127.0.0.1 with two tenants'
keys): every route answers its success, a 400 naming the field at fault, and for another
tenant's resource exactly what a missing one gets (404); scopes are enforced. Durability
across SIGKILL is ``test_api_durability.py``; the schema and the fuzzer ``test_openapi.py``.

One node serves the module (each test uses its own ids); webhooks go to a receiver in the
test process."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from tests.integration.herald_process import HeraldProcess, Nodes

from .api_client import ApiClient
from .support import SECRET, Receiver

ADMIN = "acme-admin-0123456789"
READ = "acme-read-0123456789"
ENGAGE = "acme-engage-0123456789"
PRODUCE = "acme-produce-0123456789"
GLOBEX = "globex-admin-0123456789"

KEYS = {
    ADMIN: ("acme", ["produce", "consume", "admin"]),
    READ: ("acme", ["consume"]),
    ENGAGE: ("acme", ["engage"]),
    PRODUCE: ("acme", ["produce"]),
    GLOBEX: ("globex", ["produce", "consume", "admin"]),
}
CONFIG = """
[topics]
events-partitions = 2

[notify]
channels = ["webhook", "console"]
partitions = 2
retry-partitions = 1

[notify.retry]
delays-ms = [200, 400]
jitter = 0.0

[channels.webhook]
allow-networks = ["127.0.0.1/32"]
""" + "".join(
    f'\n[[auth.keys]]\nkey = "{k}"\ntenant = "{t}"\nscopes = {s!r}\n'.replace("'", '"')
    for k, (t, s) in KEYS.items()
)


@pytest.fixture(scope="module")
def api_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeraldProcess]:
    nodes = Nodes(tmp_path_factory.mktemp("api"))
    try:
        yield nodes(config=CONFIG)
    finally:
        nodes.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def acme(api_node: HeraldProcess, session: aiohttp.ClientSession) -> ApiClient:
    return ApiClient(session, api_node.http_url, ADMIN)


@pytest.fixture
def globex(acme: ApiClient) -> ApiClient:
    return acme.as_key(GLOBEX)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def eventually(check: Callable[[], Awaitable[Any]], within: float = 10.0) -> Any:
    """The first truthy result of ``check``, polled every 50 ms."""
    deadline = time.monotonic() + within
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {got!r}")
        await asyncio.sleep(0.05)


async def same_as_missing(
    other: ApiClient, mine: ApiClient, method: str, path: str, missing_path: str, body: Any = None
) -> None:
    """``other``'s answer for ``path`` (``mine``'s resource) is what ``mine`` gets for a
    resource that does not exist: status, code and field."""
    got = await other.call(method, path, body)
    want = await mine.call(method, missing_path, body)
    assert got[0] == want[0] == 404, (got, want)
    assert got[1]["error"]["code"] == want[1]["error"]["code"]
    assert got[1]["error"]["field"] == want[1]["error"]["field"]


# --------------------------------------------------------------------------------- users
async def test_users_put_get_and_erase(acme: ApiClient, globex: ApiClient) -> None:
    u = uid("ada")
    hook = {"url": "http://127.0.0.1:9/hook"}
    put = await acme.ok("PUT", f"/users/{u}", {"email": "ada@example.com", "webhook": hook})
    assert put["id"] == u and put["email"] == "ada@example.com" and put["timezone"] == "UTC"
    secret = put["webhook"]["secret"]
    assert secret.startswith("whsec_")  # generated: a webhook is never sent unsigned
    got = await acme.ok("GET", f"/users/{u}")
    assert got == put
    shown = await acme.as_key(READ).ok("GET", f"/users/{u}")
    assert shown["webhook"] == {  # the secret to admin keys only
        "url": hook["url"],
        "secret": None,
        "previous_secret_until_ms": None,
        "disabled_ms": None,
        "disabled_reason": None,
    }
    again = await acme.ok("PUT", f"/users/{u}", {"locale": "en-GB", "webhook": hook})
    assert again["webhook"]["secret"] == secret and again["email"] is None

    await acme.error("PUT", f"/users/{u}", {"email": "nobody"}, status=400,
                     code="invalid_request", field="email")  # fmt: skip
    await acme.error("PUT", f"/users/{u}", {"timezone": "Mars/Base"}, status=400,
                     code="invalid_request", field="timezone")  # fmt: skip
    await acme.error("PUT", f"/users/{u}", {"nickname": "x"}, status=400,
                     code="invalid_request", field="nickname")  # fmt: skip
    await acme.error("PUT", f"/users/{u}", {"webhook": {"url": "ftp://x"}}, status=400,
                     code="invalid_request", field="webhook.url")  # fmt: skip
    await acme.error("PUT", f"/users/{u}", raw=b"{not json", status=400,
                     code="invalid_request", field=None)  # fmt: skip
    await acme.error("PUT", f"/users/{'x' * 201}", {}, status=400, code="invalid_request",
                     field="user")  # fmt: skip

    await same_as_missing(globex, acme, "GET", f"/users/{u}", f"/users/{uid('nobody')}")
    await same_as_missing(globex, acme, "DELETE", f"/users/{u}", f"/users/{uid('nobody')}")
    await same_as_missing(globex, acme, "GET", f"/users/{u}/export", f"/users/{uid('no')}")
    assert (await acme.ok("GET", f"/users/{u}"))["id"] == u  # globex's DELETE did nothing

    erased = await acme.ok("DELETE", f"/users/{u}")
    assert erased["user"] == u and erased["registry_rows"] >= 1
    await acme.error("GET", f"/users/{u}", status=404, code="unknown_user", field="user")
    await acme.error("DELETE", f"/users/{u}", status=404, code="unknown_user", field="user")


async def test_devices(acme: ApiClient, globex: ApiClient) -> None:
    u = uid("dev")
    await acme.ok("PUT", f"/users/{u}", {})
    d = await acme.ok("PUT", f"/users/{u}/devices/tok-1", {"platform": "fcm"})
    assert (d["token"], d["platform"], d["invalid_since_ms"]) == ("tok-1", "fcm", None)
    user = await acme.ok("GET", f"/users/{u}")
    assert [x["token"] for x in user["devices"]] == ["tok-1"]
    await acme.error("PUT", f"/users/{u}/devices/tok-2", {"platform": "nokia"}, status=400,
                     code="invalid_request", field="platform")  # fmt: skip
    await acme.error("PUT", f"/users/{u}/devices/tok-2", {}, status=400,
                     code="invalid_request", field="platform")  # fmt: skip
    await same_as_missing(globex, acme, "DELETE", f"/users/{u}/devices/tok-1",
                          f"/users/{u}/devices/tok-nope")  # fmt: skip
    assert (await acme.ok("DELETE", f"/users/{u}/devices/tok-1")) == {"deleted": "tok-1"}
    assert (await acme.ok("GET", f"/users/{u}"))["devices"] == []


# ------------------------------------------------------------------------- subscriptions
async def test_subscriptions_and_a_topics_subscribers_paged(
    acme: ApiClient, globex: ApiClient
) -> None:
    topic = uid("news")
    users = sorted(uid("sub") for _ in range(3))
    for u in users:
        s = await acme.ok("PUT", f"/users/{u}/subscriptions/{topic}",
                          {"channels": ["webhook", "webhook", "console"],
                           "filter": {"data.region": "eu"}})  # fmt: skip
        assert s["channels"] == ["webhook", "console"] and s["filter"] == {"data.region": "eu"}
    one = await acme.ok("GET", f"/users/{users[0]}/subscriptions/{topic}")
    assert one["topic"] == topic
    mine = await acme.ok("GET", f"/users/{users[0]}/subscriptions")
    assert [s["topic"] for s in mine["subscriptions"]] == [topic] and mine["next_after"] is None

    first = await acme.ok("GET", f"/subscribers/{topic}?limit=2")
    assert first["count"] == 3 and [s["user"] for s in first["subscribers"]] == users[:2]
    assert first["next_after"] == users[1]
    rest = await acme.ok("GET", f"/subscribers/{topic}?limit=2&after={first['next_after']}")
    assert [s["user"] for s in rest["subscribers"]] == users[2:] and rest["next_after"] is None
    assert rest["subscribers"][0]["channels"] == ["webhook", "console"]

    sub = f"/users/{users[0]}/subscriptions/{topic}"
    await acme.error("PUT", sub, {"channels": []}, status=400, code="invalid_request",
                     field="channels")  # fmt: skip
    await acme.error("PUT", sub, {"channels": ["pigeon"]}, status=400,
                     code="invalid_request", field="channels[0]")  # fmt: skip
    await acme.error("PUT", sub, {"channels": ["console"], "filter": {"data.x": {"near": 1}}},
                     status=400, code="invalid_request", field="filter.data.x.near")  # fmt: skip
    await acme.error("GET", f"/subscribers/{topic}?limit=0", status=400,
                     code="invalid_request", field="limit")  # fmt: skip
    await acme.error("GET", f"/subscribers/{topic}?limit=x", status=400,
                     code="invalid_request", field="limit")  # fmt: skip

    await same_as_missing(globex, acme, "GET", sub, f"/users/{users[0]}/subscriptions/nope")
    await same_as_missing(globex, acme, "DELETE", sub, f"/users/{users[0]}/subscriptions/nope")
    theirs = await globex.ok("GET", f"/subscribers/{topic}")
    assert theirs == {"topic": topic, "count": 0, "subscribers": [], "next_after": None}
    assert (await globex.ok("GET", f"/users/{users[0]}/subscriptions"))["subscriptions"] == []

    assert await acme.ok("DELETE", sub) == {"deleted": topic}
    assert (await acme.ok("GET", f"/subscribers/{topic}"))["count"] == 2


# ------------------------------------------------------------------ preferences, consent
async def test_preferences_defaults_and_mandatory(acme: ApiClient, globex: ApiClient) -> None:
    u = uid("pref")
    body = {
        "rules": [{"topic": "promo", "allow": False}, {"category": "security", "allow": True}],
        "quiet_hours": {"start": "22:00", "end": "07:00"},
        "caps": [{"category": "marketing", "max": 3, "per": "7d"}],
    }
    p = await acme.ok("PUT", f"/users/{u}/preferences", body)
    assert p["rules"][0] == {"topic": "promo", "category": None, "channel": "*", "allow": False}
    assert p["quiet_hours"] == body["quiet_hours"] and p["caps"][0]["max"] == 3
    assert await acme.ok("GET", f"/users/{u}/preferences") == p
    await acme.error("PUT", f"/users/{u}/preferences",
                     {"rules": [{"topic": "a", "category": "b", "allow": True}]},
                     status=400, code="invalid_request", field="rules[0]")  # fmt: skip
    await acme.error("PUT", f"/users/{u}/preferences",
                     {"quiet_hours": {"start": "25:00", "end": "07:00"}},
                     status=400, code="invalid_request", field="quiet_hours.start")  # fmt: skip
    await same_as_missing(globex, acme, "GET", f"/users/{u}/preferences",
                          f"/users/{uid('no')}/preferences")  # fmt: skip

    d = await acme.ok("PUT", "/admin/defaults", {"rules": [{"channel": "sms", "allow": False}]})
    assert await acme.ok("GET", "/admin/defaults") == d
    assert (await globex.ok("GET", "/admin/defaults"))["rules"] == []  # globex's own
    await acme.error("PUT", "/admin/defaults", {"caps": [{"max": 0, "per": "1d"}]},
                     status=400, code="invalid_request", field="caps[0].max")  # fmt: skip

    topic = uid("security")
    m = await acme.ok("PUT", f"/admin/mandatory/{topic}")
    assert m["mandatory"] is True and m["since_ms"] > 0
    assert topic in (await acme.ok("GET", "/admin/mandatory"))["topics"]
    assert topic not in (await globex.ok("GET", "/admin/mandatory"))["topics"]
    await same_as_missing(globex, acme, "DELETE", f"/admin/mandatory/{topic}",
                          f"/admin/mandatory/{uid('none')}")  # fmt: skip
    assert (await acme.ok("DELETE", f"/admin/mandatory/{topic}"))["mandatory"] is False


async def test_consent_is_recorded_with_source_api(acme: ApiClient, globex: ApiClient) -> None:
    u = uid("consent")
    out = await acme.ok("POST", f"/users/{u}/consent",
                        {"channel": "sms", "opted_in": False, "legal": True})  # fmt: skip
    assert out["channels"]["sms"]["opted_in"] is False and out["channels"]["sms"]["legal"]
    await acme.ok("POST", f"/users/{u}/consent", {"channel": "email", "opted_in": True})
    got = await acme.ok("GET", f"/users/{u}/consent")
    assert {e["source"] for e in got["ledger"]} == {"api"}
    assert [(e["channel"], e["opted_in"]) for e in got["ledger"]] == [  # oldest first
        ("sms", False),
        ("email", True),
    ]
    await acme.error("POST", f"/users/{u}/consent", {"channel": "fax", "opted_in": False},
                     status=400, code="invalid_request", field="channel")  # fmt: skip
    await acme.error("POST", f"/users/{u}/consent", {"channel": "sms"}, status=400,
                     code="invalid_request", field="opted_in")  # fmt: skip
    await acme.error("POST", f"/users/{u}/consent",
                     {"channel": "sms", "opted_in": True, "legal": True}, status=400,
                     code="invalid_request", field="legal")  # fmt: skip
    await same_as_missing(globex, acme, "GET", f"/users/{u}/consent",
                          f"/users/{uid('no')}/consent")  # fmt: skip


# ----------------------------------------------------------------------------- workflows
async def test_workflows(acme: ApiClient, globex: ApiClient) -> None:
    topic = uid("invoice")
    body = {
        "category": "billing",
        "steps": [
            {"channel": "webhook", "if": {"data.amount": {"exists": True}}},
            {"wait_seen": "15m", "else": [{"channel": "console"}]},
        ],
    }
    w = await acme.ok("PUT", f"/workflows/{topic}", body)
    assert (w["topic"], w["version"]) == (topic, 1) and w["workflow"]["category"] == "billing"
    assert (await acme.ok("PUT", f"/workflows/{topic}", body))["version"] == 2
    assert (await acme.ok("GET", f"/workflows/{topic}"))["workflow"]["steps"][1]["wait_seen"]
    bad = {"steps": [{"channel": "webhook"}, {"batch": {"window": "1y"}}]}
    await acme.error("PUT", f"/workflows/{topic}", bad, status=400, code="invalid_request",
                     field="steps[1].batch.window")  # fmt: skip
    await acme.error("PUT", f"/workflows/{topic}", {"steps": [{"telepathy": 1}]}, status=400,
                     code="invalid_request", field="steps[0]")  # fmt: skip
    await acme.error("PUT", f"/workflows/{topic}", {"category": "x"}, status=400,
                     code="invalid_request", field="steps")  # fmt: skip
    for method in ("GET", "DELETE"):
        await same_as_missing(globex, acme, method, f"/workflows/{topic}",
                              f"/workflows/{uid('none')}")  # fmt: skip
    assert await acme.ok("DELETE", f"/workflows/{topic}") == {"deleted": topic}
    await acme.error("GET", f"/workflows/{topic}", status=404, code="unknown_workflow",
                     field="topic")  # fmt: skip


# --------------------------------------------------------------------------------- scopes
async def test_scopes(acme: ApiClient) -> None:
    u = uid("scoped")
    await acme.ok("PUT", f"/users/{u}", {})
    reader, engager, producer = acme.as_key(READ), acme.as_key(ENGAGE), acme.as_key(PRODUCE)
    assert (await reader.ok("GET", f"/users/{u}"))["id"] == u
    await reader.error("PUT", f"/users/{u}", {}, status=403, code="forbidden")
    await reader.error("POST", f"/users/{u}/notifications/n1/seen", status=403,
                       code="forbidden")  # fmt: skip
    await engager.error("GET", f"/users/{u}", status=403, code="forbidden")
    await engager.error("POST", f"/users/{u}/notifications/n1/seen", status=404,
                        code="unknown_notification", field="notification")  # fmt: skip
    assert (await producer.ok("POST", "/events/cancel", {"cancellation_key": "k"}))[
        "cancelled"
    ] == 0
    await producer.error("DELETE", f"/users/{u}", status=403, code="forbidden")
    await acme.as_key(None).error("GET", f"/users/{u}", status=401, code="unauthenticated")
    await acme.as_key("not-a-key-0123456789").error("GET", f"/users/{u}", status=401,
                                                    code="unauthenticated")  # fmt: skip


# ------------------------------------------------------------ events, feeds, engagement
async def status_of(api: ApiClient, event_id: str, done: Callable[[list[Any]], bool]) -> Any:
    async def check() -> Any:
        code, body = await api.call("GET", f"/events/{event_id}")
        return body if code == 200 and done(body["recipients"]) else None

    return await eventually(check)


async def test_event_status_feed_and_marks(acme: ApiClient, globex: ApiClient) -> None:
    u = uid("reader")
    ack = await acme.ok("POST", "/events", {"topic": "orders", "payload": {"n": 1},
                                            "users": [u]})  # fmt: skip
    st = await status_of(acme, ack["event_id"], lambda r: r and r[0]["status"] == "delivered")
    (item,) = st["recipients"]
    assert (item["user"], item["channel"], item["engagement"]) == (u, "console", [])
    assert len(item["attempts"]) == 1 and item["attempts"][0]["outcome"] == "delivered"
    await same_as_missing(globex, acme, "GET", f"/events/{ack['event_id']}",
                          f"/events/{uuid.uuid4()}")  # fmt: skip

    feed = await acme.ok("GET", f"/users/{u}/notifications")
    assert feed["unread"] == 1 and feed["next_before"] is None
    (note,) = feed["items"]
    assert (note["event_id"], note["seen"], note["read"]) == (ack["event_id"], False, False)
    nid = note["id"]
    engager = acme.as_key(ENGAGE)
    assert (await engager.ok("POST", f"/users/{u}/notifications/{nid}/seen"))["engagement"] == [
        "seen"
    ]
    read = await engager.ok("POST", f"/users/{u}/notifications/{nid}/read")
    assert read == {"id": nid, "engagement": ["seen", "read"]}
    await engager.ok("POST", f"/users/{u}/notifications/{nid}/archived")
    await engager.ok("POST", f"/users/{u}/notifications/{nid}/clicked")
    feed = await acme.ok("GET", f"/users/{u}/notifications")
    assert feed["unread"] == 0 and feed["items"][0]["archived"] is True
    st = await status_of(acme, ack["event_id"], lambda r: len(r[0]["engagement"]) == 4)
    assert set(st["recipients"][0]["engagement"]) == {"seen", "read", "archived", "clicked"}

    await same_as_missing(globex, acme, "POST", f"/users/{u}/notifications/{nid}/seen",
                          f"/users/{u}/notifications/{'0' * 32}/seen")  # fmt: skip
    assert (await globex.ok("GET", f"/users/{u}/notifications"))["items"] == []
    await acme.error("GET", f"/users/{u}/notifications?limit=501", status=400,
                     code="invalid_request", field="limit")  # fmt: skip

    # newest first, paged with next_before
    for n in range(2, 4):
        await acme.ok("POST", "/events", {"topic": "orders", "payload": {"n": n}, "users": [u]})

    async def three() -> Any:
        f = await acme.ok("GET", f"/users/{u}/notifications")
        return f if len(f["items"]) == 3 else None

    await eventually(three)
    page = await acme.ok("GET", f"/users/{u}/notifications?limit=2")
    assert len(page["items"]) == 2 and page["unread"] == 2 and page["next_before"]
    older = await acme.ok("GET", f"/users/{u}/notifications?before={page['next_before']}")
    assert [i["id"] for i in older["items"]] == [nid]
    times = [i["created_ms"] for i in page["items"] + older["items"]]
    assert times == sorted(times, reverse=True)


async def test_cancel_by_key(acme: ApiClient, globex: ApiClient) -> None:
    topic, key = uid("cart"), uid("cart-key")
    users = [uid("shopper"), uid("shopper")]
    await acme.ok(
        "PUT", f"/workflows/{topic}", {"steps": [{"delay": "1h"}, {"channel": "console"}]}
    )
    ack = await acme.ok("POST", "/events", {"topic": topic, "payload": {}, "users": users,
                                            "cancellation_key": key})  # fmt: skip
    await status_of(acme, ack["event_id"], lambda r: len(r) == 2)  # both parked
    assert (await globex.ok("POST", "/events/cancel", {"cancellation_key": key}))["cancelled"] == 0
    one = await acme.ok("POST", "/events/cancel", {"cancellation_key": key, "users": users[:1]})
    assert one == {"cancellation_key": key, "cancelled": 1}
    assert (await acme.ok("POST", "/events/cancel", {"cancellation_key": key}))["cancelled"] == 1
    st = await status_of(acme, ack["event_id"],
                         lambda r: all(x["status"] == "cancelled" for x in r))  # fmt: skip
    assert {x["reason"] for x in st["recipients"]} == {"cancellation_key"}
    await acme.error("POST", "/events/cancel", {"users": users}, status=400,
                     code="invalid_request", field="cancellation_key")  # fmt: skip
    await acme.error("POST", "/events/cancel", {"cancellation_key": ""}, status=400,
                     code="invalid_request", field="cancellation_key")  # fmt: skip
    await acme.error("POST", "/events/cancel", {"cancellation_key": "k", "users": ["a\u0000"]},
                     status=400, code="invalid_request", field="users[0]")  # fmt: skip


# -------------------------------------------------------------------------- dead letters
async def test_dead_letters_list_show_replay_and_purge(
    acme: ApiClient, globex: ApiClient, receiver: Receiver
) -> None:
    users = [uid("dl"), uid("dl")]
    for u in users:
        await acme.ok("PUT", f"/users/{u}", {"webhook": {"url": receiver.url(u), "secret": SECRET}})
        receiver.status[u] = 400
    topic = uid("now")
    await acme.ok("PUT", f"/workflows/{topic}", {"steps": [{"channel": "webhook"}]})
    ack = await acme.ok("POST", "/events", {"topic": topic, "payload": {"x": 1}, "users": users})
    await status_of(acme, ack["event_id"],
                    lambda r: [x["status"] for x in r] == ["dead_lettered"] * 2)  # fmt: skip

    async def letters() -> Any:
        page = await acme.ok("GET", "/dlq/webhook?limit=1000")
        mine = [x for x in page["dead_letters"] if x["event_id"] == ack["event_id"]]
        return mine if len(mine) == 2 else None

    mine = await eventually(letters)
    assert {x["user"] for x in mine} == set(users)
    assert {x["reason"] for x in mine} == {"http_400"} and mine[0]["data"] == {"x": 1}
    first, second = sorted(mine, key=lambda x: x["user"] == users[1])
    shown = await acme.ok("GET", f"/dlq/webhook/{first['delivery_id']}")
    assert shown == first and len(shown["attempts"]) == 1
    await acme.error("GET", "/dlq/pigeon", status=404, code="unknown_channel", field="channel")
    await acme.error("POST", "/dlq/webhook/replay", {"ids": []}, status=400,
                     code="invalid_request", field="ids")  # fmt: skip
    await acme.error("POST", "/dlq/webhook/replay", {"ids": "all"}, status=400,
                     code="invalid_request", field="ids")  # fmt: skip
    for method, path in (
        ("GET", f"/dlq/webhook/{first['delivery_id']}"),
        ("DELETE", f"/dlq/webhook/{first['delivery_id']}"),
    ):
        await same_as_missing(globex, acme, method, path, f"/dlq/webhook/{'f' * 32}")
    assert (await globex.ok("GET", "/dlq/webhook"))["dead_letters"] == []
    assert await globex.ok("POST", "/dlq/webhook/replay") == {"replayed": [], "missing": []}

    receiver.status.pop(users[0])  # fixed: the replay delivers
    replay = await acme.ok("POST", "/dlq/webhook/replay",
                           {"ids": [first["delivery_id"], "f" * 32]})  # fmt: skip
    assert replay == {"replayed": [first["delivery_id"]], "missing": ["f" * 32]}
    await receiver.wait_for(lambda: len(receiver.for_user(users[0])) == 1, what="the replay")
    assert receiver.for_user(users[0])[0].webhook_id == first["delivery_id"]
    await acme.error("GET", f"/dlq/webhook/{first['delivery_id']}", status=404,
                     code="unknown_dead_letter", field="delivery_id")  # fmt: skip
    assert await acme.ok("DELETE", f"/dlq/webhook/{second['delivery_id']}") == {
        "deleted": second["delivery_id"]
    }
    await acme.error("DELETE", f"/dlq/webhook/{second['delivery_id']}", status=404,
                     code="unknown_dead_letter", field="delivery_id")  # fmt: skip


# --------------------------------------------------------------------- export and erasure
async def test_export_holds_everything_and_erase_removes_it(
    acme: ApiClient, receiver: Receiver
) -> None:
    u = uid("gdpr")
    hook = {"url": receiver.url(u), "secret": SECRET}
    await acme.ok("PUT", f"/users/{u}", {"email": "g@example.com", "webhook": hook})
    receiver.status[u] = 410
    await acme.ok("PUT", f"/users/{u}/devices/tok", {"platform": "apns"})
    await acme.ok("PUT", f"/users/{u}/subscriptions/news", {"channels": ["console"]})
    await acme.ok("PUT", f"/users/{u}/preferences", {"rules": [{"topic": "promo", "allow": False}]})
    await acme.ok("POST", f"/users/{u}/consent", {"channel": "email", "opted_in": True})
    slow = uid("slow")
    await acme.ok("PUT", f"/workflows/{slow}", {"steps": [{"delay": "1h"}, {"channel": "console"}]})
    digest = uid("digest")
    await acme.ok("PUT", f"/workflows/{digest}",
                  {"steps": [{"batch": {"window": "1h"}}, {"channel": "console"}]})  # fmt: skip
    dead = uid("dead")
    await acme.ok("PUT", f"/workflows/{dead}", {"steps": [{"channel": "webhook"}]})
    acks = {}
    for topic in ("news", slow, digest, dead):
        acks[topic] = await acme.ok("POST", "/events", {"topic": topic, "payload": {"t": topic},
                                                        "users": [u]})  # fmt: skip
    await status_of(acme, acks[dead]["event_id"], lambda r: r[0]["status"] == "dead_lettered")
    await status_of(acme, acks["news"]["event_id"], lambda r: r[0]["status"] == "delivered")
    await status_of(acme, acks[digest]["event_id"], lambda r: len(r) >= 1)
    await status_of(acme, acks[slow]["event_id"], lambda r: len(r) >= 1)

    async def exported() -> Any:
        e = await acme.ok("GET", f"/users/{u}/export")
        return e if e["dead_letters"] and e["batch_windows"] and e["parked_runs"] else None

    e = await eventually(exported)
    assert e["profile"]["email"] == "g@example.com" and e["profile"]["devices"][0]["token"]
    assert [s["topic"] for s in e["subscriptions"]] == ["news"]
    assert e["preferences"]["rules"][0]["topic"] == "promo"
    assert e["consent_ledger"][0]["source"] == "api"
    assert acks["news"]["event_id"] in {n["event_id"] for n in e["notifications"]}
    assert {s["event_id"] for s in e["statuses"]} >= {acks["news"]["event_id"]}
    assert e["parked_runs"][0]["event_id"] == acks[slow]["event_id"]
    assert e["parked_runs"][0]["data"] == {"t": slow}
    assert e["batch_windows"][0]["events"] == [acks[digest]["event_id"]]
    assert e["dead_letters"][0]["event_id"] == acks[dead]["event_id"]

    erased = await acme.ok("DELETE", f"/users/{u}")
    assert erased["registry_rows"] >= 4 and erased["notifications"] >= 1
    assert erased["parked_runs"] == 1 and erased["batch_windows"] == 1
    assert erased["dead_letters"] == 1 and erased["statuses"] >= 3
    await acme.error("GET", f"/users/{u}/export", status=404, code="unknown_user", field="user")
    assert (await acme.ok("GET", f"/users/{u}/notifications"))["items"] == []
    subscribers = (await acme.ok("GET", "/subscribers/news?limit=10000"))["subscribers"]
    assert u not in {s["user"] for s in subscribers}
    await acme.error("GET", f"/events/{acks['news']['event_id']}", status=404,
                     code="unknown_event", field="event_id")  # fmt: skip


async def test_erasing_one_recipient_of_an_event_leaves_the_others_statuses(
    acme: ApiClient,
) -> None:
    """A fan-out's statuses are kept a page of recipients at a time: the erased user leaves
    the page, the others' statuses stay."""
    topic = uid("shared")
    users = sorted(uid("r") for _ in range(3))
    for u in users:
        await acme.ok("PUT", f"/users/{u}/subscriptions/{topic}", {"channels": ["console"]})
    ack = await acme.ok("POST", "/events", {"topic": topic, "payload": {}})
    done = lambda r: len(r) == 3 and all(i["status"] == "delivered" for i in r)  # noqa: E731
    before = await status_of(acme, ack["event_id"], done)
    gone = users[1]
    mine = (await acme.ok("GET", f"/users/{gone}/export"))["statuses"]
    assert mine and {s["event_id"] for s in mine} == {ack["event_id"]}
    await acme.ok("DELETE", f"/users/{gone}")
    after = (await acme.ok("GET", f"/events/{ack['event_id']}"))["recipients"]
    assert [r["user"] for r in after] == [u for u in users if u != gone]
    assert after == [r for r in before["recipients"] if r["user"] != gone]


# ------------------------------------------------------- every id in a path is checked
# the smallest valid body of each route that needs one (so the path is what is at fault)
BODIES: dict[tuple[str, str], Any] = {
    ("PUT", "/users/{user}"): {},
    ("PUT", "/users/{user}/devices/{token}"): {"platform": "fcm"},
    ("PUT", "/users/{user}/subscriptions/{topic}"): {"channels": ["console"]},
    ("PUT", "/users/{user}/preferences"): {},
    ("POST", "/users/{user}/consent"): {"channel": "sms", "opted_in": True},
    ("PUT", "/workflows/{topic}"): {"steps": [{"channel": "console"}]},
}
IDS = ("user", "topic", "event_id", "notification", "delivery_id")


async def test_an_id_in_any_path_that_is_too_long_is_a_400_naming_it(acme: ApiClient) -> None:
    doc = await acme.ok("GET", "/openapi.json")
    checked = 0
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if op["tags"][0] in ("topics", "groups"):  # the broker's (docs/HTTP.md)
                continue
            for name in IDS:
                if f"{{{name}}}" not in path:
                    continue
                filled = path
                for other in (*IDS, "token", "channel"):
                    value = "x" * 201 if other == name else ("webhook" if other == "channel"
                                                            else "ok")  # fmt: skip
                    filled = filled.replace(f"{{{other}}}", value)
                body = BODIES.get((method.upper(), path))
                await acme.error(method.upper(), filled, body, status=400,
                                 code="invalid_request", field=name)  # fmt: skip
                checked += 1
    assert checked >= 30  # every user, topic, event, notification and dead letter route

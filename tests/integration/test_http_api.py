"""The HTTP API of a real node: event ingest with idempotency, error bodies that name the
field, raw records, topic and group admin, health, metrics, and API keys with tenants (over
HTTP and over TCP)."""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker import errors
from broker import protocol as p
from broker.client import BrokerError, Client
from broker.topics import partition_for_key
from storage import records

from .herald_process import HeraldProcess, Nodes
from .raw_wire import RawConnection

EVENTS_PARTITIONS = 8  # topics.events-partitions default


@pytest.fixture
async def http(shared_herald: HeraldProcess) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=shared_herald.http_url) as session:
        yield session


async def call(
    session: aiohttp.ClientSession,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    key: str | None = None,
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    kwargs: dict[str, Any] = {"headers": headers}
    if body is not None:
        raw = json.dumps(body).encode()
    if raw is not None:
        # a stream, not bytes: aiohttp warns about large bytes bodies
        kwargs["data"] = io.BytesIO(raw)
        headers["Content-Type"] = "application/json"
    async with session.request(method, path, **kwargs) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json()


def assert_error(status: int, body: Any, want_status: int, code: str, field: str | None) -> None:
    assert status == want_status, body
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"code", "message", "field"}, err
    assert err["code"] == code, err
    assert err["message"], err
    assert err["field"] == field, err


# ----------------------------------------------------------------------------- events
async def test_post_event_answers_event_id_partition_and_offset(
    http: aiohttp.ClientSession,
) -> None:
    status, body = await call(
        http, "POST", "/events", {"topic": "orders", "payload": {"n": 1}, "key": "user-1"}
    )
    assert status == 200, body
    assert set(body) == {"event_id", "partition", "offset"}
    uuid.UUID(body["event_id"])
    assert body["partition"] == partition_for_key(b"user-1", EVENTS_PARTITIONS)
    # the next event of the same key lands right after it
    status, again = await call(
        http, "POST", "/events", {"topic": "orders", "payload": {"n": 2}, "key": "user-1"}
    )
    assert status == 200
    assert (again["partition"], again["offset"]) == (body["partition"], body["offset"] + 1)
    assert again["event_id"] != body["event_id"]


async def test_repeated_event_id_returns_the_original_and_appends_nothing(
    http: aiohttp.ClientSession,
) -> None:
    event_id = str(uuid.uuid4())
    event = {"topic": "orders", "payload": {"total": 12}, "event_id": event_id}
    status, first = await call(http, "POST", "/events", event)
    assert status == 200, first
    assert first["event_id"] == event_id
    assert "duplicate" not in first or first["duplicate"] is False
    hw_before = await events_high_watermark(http, first["partition"])
    status, second = await call(http, "POST", "/events", {**event, "payload": {"total": 99}})
    assert status == 200, second
    assert second == {
        "event_id": event_id,
        "partition": first["partition"],
        "offset": first["offset"],
        "duplicate": True,
    }
    assert await events_high_watermark(http, first["partition"]) == hw_before


async def events_high_watermark(http: aiohttp.ClientSession, partition: int) -> float:
    async with http.get("/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "herald_partition_high_watermark" and sample.labels == {
                "tenant": "*",
                "topic": "__events",
                "partition": str(partition),
            }:
                return sample.value
    raise AssertionError("no high watermark metric for __events")


BAD_EVENTS = [
    pytest.param({"payload": {}}, 400, "invalid_request", "topic", id="missing-topic"),
    pytest.param({"topic": 5, "payload": {}}, 400, "invalid_request", "topic", id="wrong-type"),
    pytest.param(
        {"topic": "t", "payload": {}, "colour": "red"},
        400,
        "invalid_request",
        "colour",
        id="unknown-field",
    ),
    pytest.param({"topic": "t"}, 400, "invalid_request", "payload", id="missing-payload"),
    pytest.param(
        {"topic": "t", "payload": {}, "priority": "urgent"},
        400,
        "invalid_request",
        "priority",
        id="bad-enum",
    ),
    pytest.param(
        {"topic": "t", "payload": {}, "event_id": "not an id!"},
        400,
        "invalid_request",
        "event_id",
        id="bad-event-id",
    ),
    pytest.param({"topic": "", "payload": {}}, 400, "invalid_request", "topic", id="empty-topic"),
    pytest.param(
        {"topic": "t", "payload": "x" * (1024 * 1024 + 1)},
        413,
        "payload_too_large",
        "payload",
        id="oversized-payload",
    ),
]


@pytest.mark.parametrize(("body", "status", "code", "field"), BAD_EVENTS)
async def test_bad_event_bodies_name_the_field(
    http: aiohttp.ClientSession, body: Any, status: int, code: str, field: str
) -> None:
    got_status, got = await call(http, "POST", "/events", body)
    assert_error(got_status, got, status, code, field)


async def test_invalid_json_and_missing_body_are_400(http: aiohttp.ClientSession) -> None:
    status, body = await call(http, "POST", "/events", raw=b'{"topic": "t", "payload": ')
    assert_error(status, body, 400, "invalid_request", None)
    assert "JSON" in body["error"]["message"]
    status, body = await call(http, "POST", "/events", raw=b"")
    assert status == 400, body
    assert body["error"]["code"] == "invalid_request"


async def test_event_batch_answers_each_event_and_names_a_bad_one(
    http: aiohttp.ClientSession,
) -> None:
    known = str(uuid.uuid4())
    status, single = await call(
        http, "POST", "/events", {"topic": "t", "payload": 1, "event_id": known}
    )
    assert status == 200
    events = [
        {"topic": "t", "payload": {"i": 0}, "key": "k"},
        {"topic": "t", "payload": {"i": 1}, "event_id": known},
        {"topic": "t", "payload": {"i": 2}, "key": "k"},
    ]
    status, body = await call(http, "POST", "/events/batch", {"events": events})
    assert status == 200, body
    first, dup, third = body["results"]
    assert dup == {**single, "duplicate": True}
    assert first["partition"] == third["partition"] == partition_for_key(b"k", EVENTS_PARTITIONS)
    assert third["offset"] == first["offset"] + 1

    bad = [events[0], {"payload": 1}]
    status, body = await call(http, "POST", "/events/batch", {"events": bad})
    assert_error(status, body, 400, "invalid_request", "events[1].topic")
    twice = str(uuid.uuid4())
    same = [{"topic": "t", "payload": i, "event_id": twice} for i in range(2)]
    status, body = await call(http, "POST", "/events/batch", {"events": same})
    assert_error(status, body, 400, "invalid_request", "events[1].event_id")
    status, body = await call(http, "POST", "/events/batch", {"events": []})
    assert_error(status, body, 400, "invalid_request", "events")


# ----------------------------------------------------------------------- raw records
async def test_records_produced_over_http_fetch_back_over_http_and_tcp(
    http: aiohttp.ClientSession, shared_herald: HeraldProcess
) -> None:
    status, body = await call(http, "POST", "/topics", {"name": "raw", "partitions": 2})
    assert status == 201, body
    sent = {
        "partition": 1,
        "records": [
            {"value": "plain", "key": "k1"},
            {"value_b64": base64.b64encode(b"\xff\x00bin").decode()},
            {"value": "with headers", "headers": {"trace": "abc"}, "timestamp": 1_700_000_000_123},
        ],
    }
    status, body = await call(http, "POST", "/topics/raw/records", sent)
    assert status == 200, body
    assert body == {"partition": 1, "base_offset": 0, "last_offset": 2}

    status, body = await call(http, "GET", "/topics/raw/partitions/1/records?offset=0")
    assert status == 200, body
    assert body["next_offset"] == 3
    assert body["high_watermark"] == 3
    got = body["records"]
    assert [r["offset"] for r in got] == [0, 1, 2]
    assert (got[0]["key"], got[0]["value"]) == ("k1", "plain")
    assert got[1]["value"] == base64.b64encode(b"\xff\x00bin").decode()
    assert got[1]["encoding"]["value"] == "base64"
    assert got[2]["headers"] == {"trace": "abc"}
    assert got[2]["timestamp"] == 1_700_000_000_123

    async with await Client.connect(shared_herald.host, shared_herald.tcp_port) as client:
        (res,) = await client.fetch([("raw", 1, 0)])
        values = [
            r.value
            for pos, h in records.iter_batches(res.records)
            for r in records.decode_records(res.records[pos : pos + h.batch_length], h)
        ]
        assert values == [b"plain", b"\xff\x00bin", b"with headers"]

    status, body = await call(http, "GET", "/topics/raw/partitions/1/records?offset=2")
    assert [r["offset"] for r in body["records"]] == [2]
    status, body = await call(http, "GET", "/topics/raw/partitions/1/records?offset=99")
    assert_error(status, body, 416, "offset_out_of_range", None)
    status, body = await call(http, "GET", "/topics/raw/partitions/1/records?offset=x")
    assert_error(status, body, 400, "invalid_request", "offset")
    status, body = await call(
        http, "POST", "/topics/raw/records", {"records": [{"value": "a", "value_b64": "YQ=="}]}
    )
    assert_error(status, body, 400, "invalid_request", "records[0].value")
    status, body = await call(http, "POST", "/topics/raw/records", {"records": [{"value": 1}]})
    assert_error(status, body, 400, "invalid_request", "records[0].value")


# ---------------------------------------------------------------------------- topics
async def test_topics_create_list_describe_delete(http: aiohttp.ClientSession) -> None:
    status, body = await call(
        http, "POST", "/topics", {"name": "admin-t", "partitions": 3, "retention_ms": 60_000}
    )
    assert status == 201, body
    assert body["created"] is True
    assert len(body["topic"]["partitions"]) == 3
    status, body = await call(http, "POST", "/topics", {"name": "admin-t"})
    assert_error(status, body, 409, "topic_exists", None)
    status, body = await call(http, "POST", "/topics", {"name": "admin-t", "exist_ok": True})
    assert (status, body["created"]) == (200, False)

    status, body = await call(http, "GET", "/topics")
    assert status == 200
    names = [t["name"] for t in body["topics"]]
    assert "admin-t" in names
    assert "__events" not in names, "internal topics are the operator's"

    status, body = await call(http, "GET", "/topics/admin-t")
    assert status == 200, body
    assert body["name"] == "admin-t"
    assert body["retention_ms"] == 60_000
    assert [pt["partition"] for pt in body["partitions"]] == [0, 1, 2]
    assert all(pt["high_watermark"] == 0 for pt in body["partitions"])

    status, body = await call(http, "DELETE", "/topics/admin-t")
    assert (status, body) == (200, {"deleted": "admin-t"})
    status, body = await call(http, "GET", "/topics/admin-t")
    assert_error(status, body, 404, "unknown_topic", None)
    status, body = await call(http, "DELETE", "/topics/admin-t")
    assert_error(status, body, 404, "unknown_topic", None)

    status, body = await call(http, "POST", "/topics", {"name": "bad/name"})
    assert_error(status, body, 400, "invalid_topic", None)
    status, body = await call(http, "POST", "/topics", {"name": "p0", "partitions": 0})
    assert_error(status, body, 400, "invalid_request", "partitions")
    status, body = await call(http, "POST", "/topics", {"name": "p0", "partitons": 2})
    assert_error(status, body, 400, "invalid_request", "partitons")


# ---------------------------------------------------------------------------- groups
async def test_group_shows_committed_offsets_and_lag(
    http: aiohttp.ClientSession, shared_herald: HeraldProcess
) -> None:
    await call(http, "POST", "/topics", {"name": "lagging", "partitions": 2})
    for partition, count in ((0, 5), (1, 3)):
        status, _ = await call(
            http,
            "POST",
            "/topics/lagging/records",
            {"partition": partition, "records": [{"value": str(i)} for i in range(count)]},
        )
        assert status == 200
    with RawConnection(shared_herald.host, shared_herald.tcp_port) as conn:
        resp = conn.request(
            p.CommitOffsets(id=1, group="billing", offsets=[("lagging", 0, 2), ("lagging", 1, 3)])
        )
        assert isinstance(resp, p.Committed), resp

    status, body = await call(http, "GET", "/groups/billing")
    assert status == 200, body
    assert body["group"] == "billing"
    assert body["members"] == []
    lags = {(o["topic"], o["partition"]): o for o in body["offsets"]}
    assert lags[("lagging", 0)] | {} == {
        "topic": "lagging",
        "partition": 0,
        "committed": 2,
        "high_watermark": 5,
        "lag": 3,
    }
    assert (lags[("lagging", 1)]["committed"], lags[("lagging", 1)]["lag"]) == (3, 0)

    status, body = await call(http, "GET", "/groups")
    assert status == 200
    assert "billing" in body["groups"]
    status, body = await call(http, "GET", "/groups/nobody")
    assert_error(status, body, 404, "unknown_group", None)


# ------------------------------------------------------------------- health, metrics
async def test_healthz_reports_ok(http: aiohttp.ClientSession) -> None:
    status, body = await call(http, "GET", "/healthz")
    assert status == 200
    assert body["status"] == "ok"
    assert body["offline_partitions"] == []


async def test_metrics_are_prometheus_text_with_high_watermarks(
    http: aiohttp.ClientSession,
) -> None:
    await call(http, "POST", "/topics", {"name": "metered", "partitions": 1})
    await call(http, "POST", "/topics/metered/records", {"records": [{"value": "a"}] * 4})
    async with http.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    hw = families["herald_partition_high_watermark"]
    assert hw.type == "gauge"
    samples = {(s.labels["topic"], s.labels["partition"]): s.value for s in hw.samples}
    assert samples[("metered", "0")] == 4


async def test_metrics_count_the_state_store_syncs(http: aiohttp.ClientSession) -> None:
    async def store_syncs() -> tuple[float, float]:
        async with http.get("/metrics") as resp:
            families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
        syncs = families["herald_state_store_syncs"]
        seconds = families["herald_state_store_sync_seconds"]
        assert syncs.type == seconds.type == "counter"
        return syncs.samples[0].value, seconds.samples[0].value

    before, before_s = await store_syncs()
    # a user's row is synced before the write is answered
    status, _ = await call(http, "PUT", "/users/synced-user", {"email": "u@example.com"})
    assert status == 200
    after, after_s = await store_syncs()
    assert after >= before + 1, "the write was answered before a sync of the store"
    assert after_s > before_s


# ------------------------------------------------------------------------------ auth
ACME_ADMIN = "acme-admin-key-000001"
ACME_READER = "acme-reader-key-00001"
BETA_ADMIN = "beta-admin-key-000001"
AUTH_CONFIG = f"""
[[auth.keys]]
key = "{ACME_ADMIN}"
tenant = "acme"
scopes = ["produce", "consume", "admin"]

[[auth.keys]]
key = "{ACME_READER}"
tenant = "acme"
scopes = ["consume"]

[[auth.keys]]
key = "{BETA_ADMIN}"
tenant = "beta"
scopes = ["produce", "consume", "admin"]
"""


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeraldProcess]:
    nodes = Nodes(tmp_path_factory.mktemp("secured"))
    try:
        yield nodes(config=AUTH_CONFIG)
    finally:
        nodes.close()


@pytest.fixture
async def secured_http(secured: HeraldProcess) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=secured.http_url) as session:
        yield session


async def test_requests_without_a_valid_key_are_401(secured_http: aiohttp.ClientSession) -> None:
    for key in (None, "wrong-key-wrong-key-0", ACME_ADMIN[:-1]):
        for method, path, body in (
            ("GET", "/topics", None),
            ("POST", "/events", {"topic": "t", "payload": 1}),
        ):
            status, got = await call(secured_http, method, path, body, key=key)
            assert_error(status, got, 401, "unauthenticated", None)
    async with secured_http.get("/topics", headers={"Authorization": ACME_ADMIN}) as resp:
        assert resp.status == 401  # not a bearer token


async def test_a_key_without_the_scope_is_403(secured_http: aiohttp.ClientSession) -> None:
    status, body = await call(
        secured_http, "POST", "/events", {"topic": "t", "payload": 1}, key=ACME_READER
    )
    assert_error(status, body, 403, "forbidden", None)
    status, body = await call(secured_http, "POST", "/topics", {"name": "r"}, key=ACME_READER)
    assert_error(status, body, 403, "forbidden", None)
    status, body = await call(secured_http, "GET", "/topics", key=ACME_READER)
    assert status == 200, body


async def test_one_tenant_cannot_see_or_read_another_tenants_topic(
    secured_http: aiohttp.ClientSession, secured: HeraldProcess
) -> None:
    status, body = await call(
        secured_http, "POST", "/topics", {"name": "ledger", "partitions": 1}, key=ACME_ADMIN
    )
    assert status == 201, body
    status, body = await call(
        secured_http,
        "POST",
        "/topics/ledger/records",
        {"records": [{"value": "secret"}]},
        key=ACME_ADMIN,
    )
    assert status == 200, body
    status, body = await call(
        secured_http, "GET", "/topics/ledger/partitions/0/records", key=ACME_READER
    )
    assert [r["value"] for r in body["records"]] == ["secret"]  # same tenant may read

    status, body = await call(secured_http, "GET", "/topics", key=BETA_ADMIN)
    assert "ledger" not in [t["name"] for t in body["topics"]]
    for method, path, req in (
        ("GET", "/topics/ledger", None),
        ("GET", "/topics/ledger/partitions/0/records", None),
        ("GET", "/topics/ledger/partitions/0/offsets", None),
        ("DELETE", "/topics/ledger", None),
    ):
        status, body = await call(secured_http, method, path, req, key=BETA_ADMIN)
        assert_error(status, body, 404, "unknown_topic", None)
    # names are per tenant: beta's "ledger" is its own topic, answered as a free name is
    status, body = await call(
        secured_http, "POST", "/topics", {"name": "ledger", "partitions": 1}, key=BETA_ADMIN
    )
    assert status == 201 and body["topic"]["name"] == "ledger", body
    assert "secret" not in str(body)
    status, body = await call(
        secured_http,
        "POST",
        "/topics/ledger/records",
        {"records": [{"value": "intruder"}]},
        key=BETA_ADMIN,
    )
    assert status == 200, body
    status, body = await call(
        secured_http, "GET", "/topics/ledger/partitions/0/records", key=BETA_ADMIN
    )
    assert [r["value"] for r in body["records"]] == ["intruder"]
    status, body = await call(secured_http, "DELETE", "/topics/ledger", key=BETA_ADMIN)
    assert status == 200, body
    status, body = await call(
        secured_http, "GET", "/topics/ledger/partitions/0/records", key=ACME_READER
    )
    assert [r["value"] for r in body["records"]] == ["secret"]  # acme's is untouched

    # the same over TCP, with the key in the hello
    with RawConnection(secured.host, secured.tcp_port) as conn:
        nokey = conn.request(p.Metadata(id=1, topics=None))
        assert isinstance(nokey, p.Error) and nokey.code == errors.Unauthenticated.code
        bad = conn.request(p.Hello(id=2, api_key="wrong-key-wrong-key-0"))
        assert isinstance(bad, p.Error) and bad.code == errors.Unauthenticated.code
    async with await Client.connect(secured.host, secured.tcp_port, api_key=BETA_ADMIN) as beta:
        assert beta.tenant == "beta"
        assert "ledger" not in [t.name for t in await beta.metadata()]
        with pytest.raises(BrokerError) as info:
            await beta.metadata(["ledger"])
        assert info.value.code == errors.UnknownTopic.code
        (res,) = await beta.fetch([("ledger", 0, 0)])
        assert (res.error, res.records) == (errors.UnknownTopic.code, b"")
        with pytest.raises(BrokerError) as info:
            await beta.list_offsets("ledger", 0)
        assert info.value.code == errors.UnknownTopic.code
        with pytest.raises(BrokerError) as info:
            await beta.request(p.JoinGroup(id=0, group="spy", topics=["ledger"]))
        assert info.value.code == errors.UnknownTopic.code
    async with await Client.connect(secured.host, secured.tcp_port, api_key=ACME_READER) as acme:
        (res,) = await acme.fetch([("ledger", 0, 0)])
        assert res.error is None and res.records
        with pytest.raises(BrokerError) as info:
            await acme.create_topic("ledger2")
        assert info.value.code == errors.Forbidden.code
    # (Client.connect itself leaks its socket when the hello is refused: close explicitly)
    refused = Client(secured.host, secured.tcp_port, api_key="wrong-key-wrong-key-0")
    try:
        with pytest.raises(BrokerError) as info:
            await refused.request(p.ListGroups(id=0), retries=0)
        assert info.value.code == errors.Unauthenticated.code
    finally:
        await refused.close()

"""The HTTP ingest fast path (``broker/http_ingest.py``) of a real node over real sockets:
``POST /events`` and ``/events/batch`` over raw sockets and aiohttp, keep-alive, pipelining,
the hand-off of a connection to aiohttp, chunked bodies, ``Expect: 100-continue``, HTTP/1.0,
``Connection: close``, limits, malformed input, auth, idempotency, clients that vanish, the
sticky partitioning of keyless events, metrics and shutdown."""

from __future__ import annotations

import json
import signal
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.topics import partition_for_key

from .conftest import NodeFactory
from .herald_process import HeraldProcess, Nodes
from .raw_http import RawHttp, post_json, request

EVENTS_PARTITIONS = 8  # topics.events-partitions default
PRODUCER = "acme-producer-key-0001"
READER = "acme-reader-key-000001"
STRICT_CONFIG = f"""
[limits]
max-http-body-bytes = 65536
max-inflight-per-connection = 4

[[auth.keys]]
key = "{PRODUCER}"
tenant = "acme"
scopes = ["produce"]

[[auth.keys]]
key = "{READER}"
tenant = "acme"
scopes = ["consume"]
"""


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeraldProcess]:
    """A node with API keys, a 64 KiB body limit and 4 requests in flight per connection."""
    nodes = Nodes(tmp_path_factory.mktemp("strict"))
    try:
        yield nodes(config=STRICT_CONFIG)
    finally:
        nodes.close()


@pytest.fixture
def conn(shared_herald: HeraldProcess) -> Iterator[RawHttp]:
    with RawHttp(shared_herald.host, shared_herald.http_port) as c:
        yield c


@pytest.fixture
async def http(shared_herald: HeraldProcess) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=shared_herald.http_url) as session:
        yield session


def event(**fields: Any) -> dict[str, Any]:
    return {"topic": "orders", "payload": {"n": 1}, **fields}


def assert_error(body: Any, code: str, field: str | None) -> None:
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "field"}, body
    assert (body["error"]["code"], body["error"]["field"]) == (code, field), body
    assert body["error"]["message"], body


def assert_placed(body: Any) -> None:
    assert set(body) == {"event_id", "partition", "offset"}, body
    uuid.UUID(body["event_id"])
    assert 0 <= body["partition"] < EVENTS_PARTITIONS
    assert body["offset"] >= 0


# ------------------------------------------------------------------------ the basics
def test_event_and_batch_over_a_raw_socket(conn: RawHttp) -> None:
    resp = conn.exchange(post_json("/events", event(key="raw-1")))
    assert resp.status == 200, resp
    assert resp.headers["content-type"] == "application/json"
    assert "date" in resp.headers and "connection" not in resp.headers
    assert "server" not in resp.headers, "served by the fast path (aiohttp names itself)"
    assert_placed(resp.json())
    assert resp.json()["partition"] == partition_for_key(b"raw-1", EVENTS_PARTITIONS)

    events = [event(key="raw-1"), event(), event(key="raw-1")]
    resp = conn.exchange(post_json("/events/batch?trace=1", {"events": events}))
    assert resp.status == 200, resp
    first, _keyless, third = resp.json()["results"]
    assert first["partition"] == third["partition"]
    assert third["offset"] == first["offset"] + 1


async def test_event_and_batch_over_aiohttp(http: aiohttp.ClientSession) -> None:
    async with http.post("/events", json=event(key="aio")) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert_placed(body)
    async with http.post("/events/batch", json={"events": [event(), event()]}) as resp:
        assert resp.status == 200
        results = (await resp.json())["results"]
    assert [sorted(r) for r in results] == [["event_id", "offset", "partition"]] * 2


def test_one_keep_alive_connection_serves_many_requests(conn: RawHttp) -> None:
    offsets = []
    for _ in range(300):
        resp = conn.exchange(post_json("/events", event(key="keep-alive")))
        assert resp.status == 200, resp
        offsets.append(resp.json()["offset"])
    assert offsets == list(range(offsets[0], offsets[0] + 300))
    assert not conn.closed_by_server(timeout=0.2)


def test_pipelined_requests_are_answered_in_request_order(conn: RawHttp) -> None:
    ids = [str(uuid.uuid4()) for _ in range(60)]
    wire = b""
    for i, event_id in enumerate(ids):
        if i == 25:
            wire += request("POST", "/events", b'{"topic": "orders", "payload": ')
        else:
            # keys spread them over partitions, whose syncs finish in any order
            wire += post_json("/events", event(key=f"k{i}", event_id=event_id))
    conn.send(wire)
    for i, event_id in enumerate(ids):
        resp = conn.response()
        if i == 25:
            assert resp.status == 400, resp
            assert_error(resp.json(), "invalid_request", None)
        else:
            assert resp.status == 200, resp
            assert resp.json()["event_id"] == event_id
    assert conn.exchange(post_json("/events", event())).status == 200


# ------------------------------------------------------------------ hand-off to aiohttp
@pytest.mark.parametrize("sending", ["one-by-one", "pipelined", "split-mid-request"])
def test_other_requests_move_the_connection_to_aiohttp(conn: RawHttp, sending: str) -> None:
    wires = [
        post_json("/events", event(key="handoff")),
        request("GET", "/topics"),
        post_json("/topics", {"name": f"handoff-{sending}", "partitions": 1}),
        post_json("/events", event(key="handoff")),
    ]
    if sending == "one-by-one":
        answers = [conn.exchange(w) for w in wires]
    else:
        wire = b"".join(wires)
        if sending == "split-mid-request":
            # the first read ends inside the GET's request line, the second completes it
            cut = len(wires[0]) + 6
            conn.send(wire[:cut])
            time.sleep(0.05)
            wire = wire[cut:]
        conn.send(wire)
        answers = [conn.response() for _ in wires]
    first, topics, created, last = answers
    assert first.status == 200, first
    assert "aiohttp" not in first.headers.get("server", "")
    assert topics.status == 200, topics
    assert "topics" in topics.json()
    assert "aiohttp" in topics.headers.get("server", ""), "served by aiohttp"
    assert created.status == 201, created
    assert last.status == 200, last
    assert (last.json()["partition"], last.json()["offset"]) == (
        first.json()["partition"],
        first.json()["offset"] + 1,
    )
    assert "aiohttp" in last.headers.get("server", ""), "the connection stays with aiohttp"


def test_a_connection_opened_with_another_request_is_aiohttp_from_the_start(
    conn: RawHttp,
) -> None:
    health = conn.exchange(request("GET", "/healthz"))
    assert health.status == 200 and health.json()["status"] == "ok"
    resp = conn.exchange(post_json("/events", event()))
    assert resp.status == 200, resp
    assert_placed(resp.json())
    resp = conn.exchange(request("GET", "/events"))
    assert resp.status == 405, resp


# ------------------------------------------------------------------- HTTP features
def test_chunked_body_sent_in_pieces(conn: RawHttp) -> None:
    body = json.dumps(event(key="chunked")).encode()
    pieces = [body[:7], body[7:20], body[20:]]
    conn.send(request("POST", "/events", headers={"Transfer-Encoding": "chunked"}))
    for piece in pieces:
        time.sleep(0.02)  # separate reads on the server
        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    conn.send(b"0\r\n\r\n")
    resp = conn.response()
    assert resp.status == 200, resp
    assert resp.json()["partition"] == partition_for_key(b"chunked", EVENTS_PARTITIONS)


def test_expect_100_continue_is_answered_before_the_body_is_sent(conn: RawHttp) -> None:
    body = json.dumps(event()).encode()
    conn.send(
        request(
            "POST",
            "/events",
            headers={"Content-Length": str(len(body)), "Expect": "100-continue"},
        )
    )
    interim = conn.response()
    assert interim.status == 100
    conn.send(body)
    resp = conn.response()
    assert resp.status == 200, resp
    assert_placed(resp.json())


def test_http_1_0_closes_unless_keep_alive_is_asked(shared_herald: HeraldProcess) -> None:
    with RawHttp(shared_herald.host, shared_herald.http_port) as conn:
        resp = conn.exchange(post_json("/events", event(), version="1.0"))
        assert resp.status == 200, resp
        assert conn.closed_by_server()
    with RawHttp(shared_herald.host, shared_herald.http_port) as conn:
        keep = {"Connection": "keep-alive"}
        for _ in range(2):
            resp = conn.exchange(post_json("/events", event(), version="1.0", headers=keep))
            assert resp.status == 200, resp
            assert resp.headers["connection"].lower() == "keep-alive"


def test_connection_close_is_answered_then_closed(conn: RawHttp) -> None:
    resp = conn.exchange(post_json("/events", event(), headers={"Connection": "close"}))
    assert resp.status == 200, resp
    assert resp.headers["connection"] == "close"
    assert conn.closed_by_server()


# ------------------------------------------------------------------ limits and errors
def test_body_over_the_limit_by_content_length_is_413_and_closes(conn: RawHttp) -> None:
    conn.send(request("POST", "/events", headers={"Content-Length": str(40 * 1024 * 1024)}))
    conn.send(b'{"topic": "orders", "payload": "' + b"x" * 10_000)
    resp = conn.response()
    assert resp.status == 413, resp
    assert_error(resp.json(), "payload_too_large", None)
    assert resp.headers["connection"] == "close"
    assert conn.closed_by_server()


def test_chunked_body_over_the_limit_is_413_and_closes(strict: HeraldProcess) -> None:
    with RawHttp(strict.host, strict.http_port) as conn:
        conn.send(
            request(
                "POST",
                "/events",
                headers={"Transfer-Encoding": "chunked", "Authorization": f"Bearer {PRODUCER}"},
            )
        )
        piece = b"x" * 16_000
        for _ in range(5):  # 80 000 bytes > 65 536
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        resp = conn.response()
        assert resp.status == 413, resp
        assert_error(resp.json(), "payload_too_large", None)
        assert conn.closed_by_server()


@pytest.mark.parametrize(
    "garbage",
    [b"BLAH\x01 /events HTTP/1.1\r\n\r\n", b"POST /events HTTP/1.1\r\nContent-Length: x\r\n\r\n"],
    ids=["request-line", "content-length"],
)
def test_malformed_http_is_400_and_closes(conn: RawHttp, garbage: bytes) -> None:
    conn.send(post_json("/events", event()) + garbage)
    assert conn.response().status == 200  # the good request before it is answered first
    resp = conn.response()
    assert resp.status == 400, resp
    assert_error(resp.json(), "invalid_request", None)
    assert "malformed" in resp.json()["error"]["message"]
    assert conn.closed_by_server()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (event(topic=5), "topic"),
        ({"payload": 1}, "topic"),
        (event(colour="red"), "colour"),
        ({"events": [event(), {"payload": 1}]}, "events[1].topic"),
    ],
    ids=["wrong-type", "missing", "unknown", "batch-item"],
)
def test_bad_json_is_400_naming_the_field(conn: RawHttp, body: Any, field: str) -> None:
    path = "/events/batch" if "events" in body else "/events"
    resp = conn.exchange(post_json(path, body))
    assert resp.status == 400, resp
    assert_error(resp.json(), "invalid_request", field)
    assert "connection" not in resp.headers, "a bad body does not cost the connection"
    assert conn.exchange(post_json("/events", event())).status == 200


def test_missing_body_is_the_same_400_as_over_aiohttp(conn: RawHttp) -> None:
    for wire in (request("POST", "/events"), request("POST", "/events/batch", b"")):
        resp = conn.exchange(wire)
        assert resp.status == 400, resp
        assert resp.json() == {
            "error": {
                "code": "invalid_request",
                "message": "a JSON body is required",
                "field": None,
            }
        }


def test_bearer_keys_are_checked_401_and_403(strict: HeraldProcess) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong-key-wrong-key-0"},
        {"Authorization": PRODUCER},
    ):
        with RawHttp(strict.host, strict.http_port) as conn:
            resp = conn.exchange(post_json("/events", event(), headers=headers))
            assert resp.status == 401, resp
            assert resp.headers["connection"] == "close"  # the body was never read
            assert_error(resp.json(), "unauthenticated", None)
    with RawHttp(strict.host, strict.http_port) as conn:
        resp = conn.exchange(
            post_json("/events", event(), headers={"Authorization": f"Bearer {READER}"})
        )
        assert resp.status == 403, resp
        assert_error(resp.json(), "forbidden", None)
        resp = conn.exchange(
            post_json(
                "/events/batch",
                {"events": [event()]},
                headers={"Authorization": f"Bearer {PRODUCER}"},
            )
        )
        assert resp.status == 200, resp


def test_repeated_event_id_answers_the_original_placement(conn: RawHttp) -> None:
    event_id = str(uuid.uuid4())
    first = conn.exchange(post_json("/events", event(event_id=event_id))).json()
    again = conn.exchange(post_json("/events", event(event_id=event_id.upper(), payload=2)))
    assert again.status == 200, again
    assert again.json() == {**first, "duplicate": True}
    batch = conn.exchange(post_json("/events/batch", {"events": [event(event_id=event_id)]}))
    assert batch.json()["results"] == [{**first, "duplicate": True}]


def test_inflight_cap_still_answers_every_pipelined_request(strict: HeraldProcess) -> None:
    auth = {"Authorization": f"Bearer {PRODUCER}"}
    with RawHttp(strict.host, strict.http_port) as conn:
        ids = [str(uuid.uuid4()) for _ in range(200)]
        conn.send(b"".join(post_json("/events", event(event_id=i), headers=auth) for i in ids))
        got = [conn.response().json()["event_id"] for _ in ids]
        assert got == ids


def test_clients_that_vanish_mid_request_do_not_break_the_node(
    shared_herald: HeraldProcess,
) -> None:
    host, port = shared_herald.host, shared_herald.http_port
    many = b"".join(post_json("/events", event()) for _ in range(200))
    for wire in (post_json("/events", event()), many, post_json("/events", event())[:-5]):
        sock = socket.create_connection((host, port))
        sock.sendall(wire)
        # close with unread answers (a reset), the requests still waiting for their fsync
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    time.sleep(0.2)
    with RawHttp(host, port) as conn:
        for _ in range(3):
            assert conn.exchange(post_json("/events", event())).status == 200
    assert "level=error" not in shared_herald.log_text(), shared_herald.log_tail()


# ---------------------------------------------------------------- partition choice
def test_keyless_events_of_a_topic_keep_their_order_on_one_partition(conn: RawHttp) -> None:
    # without a key an event goes by its tenant and topic: one topic's events stay in order
    conn.send(b"".join(post_json("/events", event(topic="orders.paid")) for _ in range(40)))
    answers = [conn.response().json() for _ in range(40)]
    assert len({a["partition"] for a in answers}) == 1
    offsets = [a["offset"] for a in answers]
    assert offsets == sorted(offsets)
    assert answers[0]["partition"] == partition_for_key(b"default\0orders.paid", EVENTS_PARTITIONS)
    # other topics spread over the partitions
    spread = {
        conn.exchange(post_json("/events", event(topic=f"t{i}"))).json()["partition"]
        for i in range(40)
    }
    assert len(spread) > EVENTS_PARTITIONS // 2, spread


def test_keyed_events_still_go_by_hash(conn: RawHttp) -> None:
    keys = [f"user-{i}" for i in range(30)]
    conn.send(b"".join(post_json("/events", event(key=k)) for k in keys))
    for k in keys:
        assert conn.response().json()["partition"] == partition_for_key(
            k.encode(), EVENTS_PARTITIONS
        )


# --------------------------------------------------------------- metrics, shutdown
def http_counters(conn: RawHttp) -> dict[str, float]:
    text = conn.exchange(request("GET", "/metrics")).body.decode()
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith(("herald_http_", "herald_events_ingested"))
    }


def test_fast_path_requests_count_in_the_metrics(
    shared_herald: HeraldProcess, conn: RawHttp
) -> None:
    with RawHttp(shared_herald.host, shared_herald.http_port) as metrics:
        before = http_counters(metrics)
        for _ in range(5):
            assert conn.exchange(post_json("/events", event())).status == 200
        conn.exchange(post_json("/events/batch", {"events": [event(), event()]}))
        assert conn.exchange(post_json("/events", {"payload": 1})).status == 400
        after = http_counters(metrics)
    assert after["herald_http_requests_total"] - before["herald_http_requests_total"] == 7 + 1
    assert after["herald_events_ingested_total"] - before["herald_events_ingested_total"] == 7
    assert (
        after["herald_http_request_errors_total"] - before["herald_http_request_errors_total"] == 1
    )


def test_sigterm_closes_idle_connections_now_and_lets_a_request_in_progress_finish(
    herald_factory: NodeFactory,
) -> None:
    node = herald_factory()
    idle = RawHttp(node.host, node.http_port)
    busy = RawHttp(node.host, node.http_port)
    try:
        assert idle.exchange(post_json("/events", event())).status == 200
        wire = post_json("/events", event())
        busy.send(wire[:-10])  # a request in progress: its body is not all there
        time.sleep(0.2)
        node.signal(signal.SIGTERM)
        # the idle one is closed at once, well before the 4 s the busy one may take
        assert idle.closed_by_server(timeout=2.0)
        busy.send(wire[-10:])
        resp = busy.response()
        assert resp.status == 503, resp
        assert_error(resp.json(), "shutting_down", None)
        assert resp.headers["connection"] == "close"
        assert busy.closed_by_server()
        assert node.proc is not None and node.proc.wait(10) == 0, node.log_tail()
    finally:
        idle.close()
        busy.close()

"""The front door of a real node: the TCP ``publish`` op shares the event intake with
``POST /events``, a batch larger in all than one record batch is stored (not refused as
corrupt), and the node starts its components in order and stops them in reverse."""

from __future__ import annotations

import io
import json
import re
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest

from broker import protocol as p
from broker.client import BrokerError, Client

from .herald_process import HeraldProcess


@pytest.fixture
async def client(shared_herald: HeraldProcess) -> AsyncIterator[Client]:
    async with Client(shared_herald.host, shared_herald.tcp_port) as c:
        yield c


async def test_publish_over_tcp_is_answered_like_post_events(
    client: Client, shared_herald: HeraldProcess
) -> None:
    eid = str(uuid.uuid4())
    req = p.Publish(
        id=0,
        events=[
            p.EventSpec(topic="signup", payload={"user": 42, "tags": ["a"]}, event_id=eid),
            p.EventSpec(topic="signup", payload="hello", key="user-42"),
        ],
    )
    resp = await client.request(req)
    assert isinstance(resp, p.Published)
    first, second = resp.results
    assert first.event_id == eid and not first.duplicate
    assert second.event_id != eid
    # the same id over HTTP is the same event: the intake is shared
    async with (
        aiohttp.ClientSession(base_url=shared_herald.http_url) as http,
        http.post("/events", json={"topic": "signup", "payload": 1, "event_id": eid}) as r,
    ):
        body = await r.json()
    assert r.status == 200
    assert (body["partition"], body["offset"], body["duplicate"]) == (
        first.partition,
        first.offset,
        True,
    )


async def test_publish_refuses_a_bad_event_by_field(client: Client) -> None:
    with pytest.raises(BrokerError) as caught:
        await client.request(p.Publish(id=0, events=[p.EventSpec(topic="", payload=1)]), retries=0)
    assert caught.value.code == "invalid_request"
    assert "topic" in str(caught.value)


async def test_a_keyless_batch_larger_than_one_record_batch_is_stored(
    shared_herald: HeraldProcess,
) -> None:
    # the case from issue 12: 12 valid keyless events of 10.8 MB in all were refused as
    # corrupt_batch because the front door's size check was skipped
    pad = "x" * 900_000
    body = {"events": [{"topic": "big", "payload": {"pad": pad, "n": i}} for i in range(12)]}
    raw = json.dumps(body).encode()
    assert len(raw) > 10_000_000
    async with (
        aiohttp.ClientSession(base_url=shared_herald.http_url) as http,
        http.post(
            "/events/batch", data=io.BytesIO(raw), headers={"Content-Type": "application/json"}
        ) as r,
    ):
        answer = await r.json()
    assert r.status == 200, answer
    results = answer["results"]
    assert len(results) == 12
    assert len({res["partition"] for res in results}) == 1  # keyless: one partition
    offsets = [res["offset"] for res in results]
    assert offsets == list(range(offsets[0], offsets[0] + 12))


def test_components_start_in_order_and_stop_in_reverse(herald: HeraldProcess) -> None:
    code = herald.stop()
    assert code == 0
    text = herald.log_text()
    started = re.findall(r"event=component_ready component=([\w-]+)", text)
    stopped = re.findall(r"event=component_stopped component=([\w-]+)", text)
    assert started == [
        "data-dir-lock",
        "state-store",
        "log",
        "broker",
        "notify",
        "gateway",
        "listeners",
        "housekeeping",
    ]
    assert stopped == list(reversed(started))
    assert text.index("event=ready") > text.index("component=housekeeping")

"""Locust load test for Herald's HTTP ingest: ``POST /events`` (one event per request) and
``POST /events/batch`` (100 events per request), as many as the users can send (no wait).

Start a node, then run locust headless against it::

    .venv/bin/herald serve --data-dir /tmp/herald-locust --http-port 8080 &
    .venv/bin/locust -f bench/locustfile.py --headless -u 50 -r 10 -t 20s \\
        --host http://127.0.0.1:8080 --only-summary

Locust's own per-request cost (gevent, requests) is high: on a small machine the locust
process, not the node, is usually the bound, which is why ``bench.run``'s ``http`` scenario
drives the node with a lean raw-socket client from several processes instead. This file is
for load shapes (ramps, mixes, many users) and for the gateway users to come. Events per
second = the ``/events`` request rate + 100 x the ``/events/batch`` request rate.

TODO(gateway): add a WebSocket user (connect, subscribe, count deliveries and their
end-to-end latency) once the gateway exists; locust needs a custom ``User`` for it (e.g.
with ``websocket-client``), not ``HttpUser``.
"""

from __future__ import annotations

import json
import os

from locust import HttpUser, constant, task

BATCH_EVENTS = 100


def _event() -> dict[str, object]:
    # ~200 bytes of JSON, no key: the node partitions by the event_id it assigns
    return {
        "topic": "bench.orders",
        "payload": {"order": 1234, "user": "user-1", "note": os.urandom(56).hex()},
    }


SINGLE = json.dumps(_event()).encode()
BATCH = json.dumps({"events": [_event() for _ in range(BATCH_EVENTS)]}).encode()
HEADERS = {"Content-Type": "application/json"}


class EventProducer(HttpUser):
    """Posts events back to back: nine single events for every batch of 100."""

    wait_time = constant(0)

    @task(9)
    def post_event(self) -> None:
        self.client.post("/events", data=SINGLE, headers=HEADERS, name="/events")

    @task(1)
    def post_batch(self) -> None:
        self.client.post(
            "/events/batch", data=BATCH, headers=HEADERS, name=f"/events/batch [{BATCH_EVENTS}]"
        )

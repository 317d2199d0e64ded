"""``make serve`` (``herald serve`` with no config) delivers to the console channel: an event
for a user nobody configured shows up as one ``event=delivery channel=console`` log line."""

from __future__ import annotations

import json
import time
import urllib.request

from ..herald_process import HeraldProcess


def test_a_fresh_node_delivers_to_the_console(herald: HeraldProcess) -> None:
    body = json.dumps({"topic": "orders", "payload": {"order": 42}, "users": ["alice"]})
    req = urllib.request.Request(
        f"{herald.http_url}/events",
        data=body.encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        event_id = json.loads(resp.read())["event_id"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [
            ln
            for ln in herald.log_text().splitlines()
            if "event=delivery channel=console" in ln and event_id in ln
        ]
        if lines:
            break
        time.sleep(0.05)
    assert len(lines) == 1, herald.log_tail()
    assert "user=alice" in lines[0] and "topic=orders" in lines[0]

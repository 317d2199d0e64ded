"""The notification families of ``/metrics`` on a real node (a separate process): after an
event reaches a user on the console channel, the operator sees the fan-out's events and
recipients, the channel's sends, their latency histogram and the audit's transitions by
channel and status, and the gateway's sessions; a tenant's key with the metrics scope sees
none of these node-wide counts (they add up every tenant's traffic)."""

from __future__ import annotations

import time
import urllib.request

from ..conftest import NodeFactory
from ..herald_process import HeraldProcess
from ..tenants import ACME, OPERATOR, config, http_json, metrics

TENANT_METRICS = "acme-metrics-key-0000001"
EXTRA = f"""
[notify]
channels = ["console", "webhook", "inapp"]

[[auth.keys]]
key = "{TENANT_METRICS}"
tenant = "acme"
scopes = ["metrics"]
"""


def _sample(node: HeraldProcess, name: str, **labels: str) -> float:
    return metrics(node).get((name, frozenset(labels.items())), 0.0)


def _text(node: HeraldProcess, key: str) -> str:
    req = urllib.request.Request(
        f"{node.http_url}/metrics", headers={"Authorization": f"Bearer {key}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(resp.read().decode())


def test_the_operator_sees_the_notification_counts_and_a_tenant_does_not(
    herald_factory: NodeFactory,
) -> None:
    node = herald_factory(config=config(EXTRA))
    code, _ = http_json(node, "PUT", "/users/ann", {"email": "ann@example.com"}, key=ACME)
    assert code in (200, 201)
    for i in range(3):
        code, _ = http_json(
            node, "POST", "/events", {"topic": "orders", "users": ["ann"], "payload": i}, key=ACME
        )
        assert code == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        folded = _sample(
            node, "herald_notify_transitions_total", channel="console", status="delivered"
        )
        if folded >= 3:
            break
        time.sleep(0.1)
    assert folded == 3
    assert _sample(node, "herald_notify_events_total") == 3
    assert _sample(node, "herald_notify_recipients_total") == 3
    assert _sample(node, "herald_notify_sends_total", channel="console", outcome="delivered") == 3
    assert _sample(node, "herald_notify_sends_total", channel="console", outcome="failed") == 0
    queued = _sample(node, "herald_notify_transitions_total", channel="console", status="queued")
    assert queued == 3
    assert _sample(node, "herald_notify_delivery_seconds_count", channel="console") == 3
    within = _sample(node, "herald_notify_delivery_seconds_bucket", channel="console", le="5.0")
    assert within == 3  # fan-out to console in under 5 s, on any machine this runs on
    # console has no breakers; webhook has none until it has sent to an endpoint
    assert _sample(node, "herald_channel_breakers", channel="webhook", state="open") == 0
    assert _sample(node, "herald_gateway_sessions") == 0
    assert "herald_gateway_messages_pushed_total 0.0" in _text(node, OPERATOR)
    # an in-app delivery handed from the fan-out straight to the in-app worker
    assert _sample(node, "herald_notify_inapp_handed_over_total") == 0
    code, _ = http_json(
        node, "PUT", "/users/ann/subscriptions/alerts", {"channels": ["inapp"]}, key=ACME
    )
    assert code in (200, 201)
    code, _ = http_json(node, "POST", "/events", {"topic": "alerts", "payload": 1}, key=ACME)
    assert code == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _sample(node, "herald_notify_sends_total", channel="inapp", outcome="delivered"):
            break
        time.sleep(0.1)
    assert _sample(node, "herald_notify_inapp_handed_over_total") == 1

    mine = _text(node, TENANT_METRICS)
    assert "herald_quota_usage" in mine  # its own view works
    for family in (
        "herald_notify_events",
        "herald_notify_sends",
        "herald_notify_inapp_handed_over",
        "herald_notify_transitions",
        "herald_gateway_",
        "herald_sms_receipts",
    ):
        assert family not in mine

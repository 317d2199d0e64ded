"""Isolation under fault: with Twilio hanging (accepting connections, never answering), email
and webhook deliveries from the same node keep their latency, because each channel has its
own workers, queue and breakers. SMS retries, its provider's breaker opens, probes and
closes once Twilio answers again, and every SMS arrives in the end: nothing is lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from channels.config import BreakerConfig, EmailConfig, SmsConfig, WebhookConfig

from ..channels.fake_twilio import FakeTwilio
from ..notify.support import SECRET, Receiver
from ..smtp_sink import SmtpSink
from .conftest import StartNode, node_config, provider


@pytest.fixture
async def sink() -> AsyncIterator[SmtpSink]:
    s = SmtpSink()
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """p50, p90, p99 in milliseconds."""
    ordered = sorted(values)
    at = [ordered[min(len(ordered) - 1, int(len(ordered) * f))] for f in (0.5, 0.9, 0.99)]
    return (round(at[0] * 1000, 1), round(at[1] * 1000, 1), round(at[2] * 1000, 1))


async def test_a_hanging_sms_provider_does_not_slow_email_or_webhooks_and_loses_nothing(
    tmp_path: Path,
    twilio: FakeTwilio,
    sink: SmtpSink,
    receiver: Receiver,
    start_node: StartNode,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # three rounds of 40 healthy then 40 faulty events (Twilio hanging for 2 s each time, long
    # enough for the SMS breaker to open): the machine's own load (other suites on this shared
    # box) drifts over seconds, and alternating spreads it over both conditions
    await fault_run(
        tmp_path,
        twilio,
        sink,
        receiver,
        start_node,
        caplog,
        "hang",
        events=40,
        rounds=3,
        strict_tail=False,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_sms_answering_503_for_a_minute_does_not_slow_email_or_webhooks(
    tmp_path: Path,
    twilio: FakeTwilio,
    sink: SmtpSink,
    receiver: Receiver,
    start_node: StartNode,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 300 events 0.2 s apart: Twilio down for the whole minute of the fault phase
    await fault_run(
        tmp_path, twilio, sink, receiver, start_node, caplog, "down", events=300, gap_s=0.2
    )


async def fault_run(
    tmp_path: Path,
    twilio: FakeTwilio,
    sink: SmtpSink,
    receiver: Receiver,
    start_node: StartNode,
    caplog: pytest.LogCaptureFixture,
    fault: str,
    *,
    events: int,
    gap_s: float = 0.05,
    rounds: int = 1,
    strict_tail: bool = True,
) -> None:
    """``rounds`` times: ``events`` events with Twilio healthy, then ``events`` more with
    Twilio faulty (``hang`` or ``down``: 503), one user each on email, webhook and SMS; then
    Twilio heals and every SMS must arrive."""
    caplog.set_level("WARNING", logger="herald.channels.failover")
    cfg = node_config(
        tmp_path,
        channels=["email", "webhook", "sms"],
        # enough attempts to outlast the fault: about 75 s in all
        delays_ms=[200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000, 10_000, 10_000, 10_000],
        sms=SmsConfig(
            providers=[provider(twilio)],
            timeout_ms=1000,
            breaker=BreakerConfig(failure_threshold=3, open_ms=500, max_open_ms=2000),
        ),
        email=EmailConfig(host="127.0.0.1", port=sink.port, tls="none"),
        webhook=WebhookConfig(allow_networks=["127.0.0.1/32"]),
    )
    node = await start_node(cfg)
    users = [f"u{i:04d}" for i in range(2 * events * rounds)]
    for i, user in enumerate(users):
        await node.user(
            user,
            "alerts",
            channels=("email", "webhook", "sms"),
            email=f"{user}@example.org",
            phone=f"+1415555{i:04d}",
            webhook={"url": receiver.url(user), "secret": SECRET},
        )
    event_of: dict[str, str] = {}

    async def phase(batch: list[str]) -> dict[str, list[float]]:
        sent: dict[str, float] = {}
        for user in batch:
            sent[user] = time.monotonic()
            event_of[user] = await node.publish(topic="alerts", users=[user], payload={"n": user})
            await asyncio.sleep(gap_s)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            mail = {r.rcpt_tos[0].split("@")[0]: r.at for r in sink.received}
            hooks = {h.user: h.at for h in receiver.hooks}
            if all(u in mail and u in hooks for u in batch):
                break
            await asyncio.sleep(0.05)
        return {
            "email": [mail[u] - sent[u] for u in batch],
            "webhook": [hooks[u] - sent[u] for u in batch],
        }

    healthy: dict[str, list[float]] = {"email": [], "webhook": []}
    faulty: dict[str, list[float]] = {"email": [], "webhook": []}
    for r in range(rounds):
        block = users[2 * r * events : 2 * (r + 1) * events]
        for ch, values in (await phase(block[:events])).items():
            healthy[ch] += values
        setattr(twilio, fault, True)
        for ch, values in (await phase(block[events:])).items():
            faulty[ch] += values
        setattr(twilio, fault, False)

    report = {
        ch: {
            name: quantiles(values[ch])
            for name, values in (("healthy", healthy), ("faulty", faulty))
        }
        for ch in ("email", "webhook")
    }
    for ch, q in report.items():
        print(f"{ch}: p50/p90/p99 ms healthy {q['healthy']}, with Twilio {fault} {q['faulty']}")
    for ch, q in report.items():
        (_h50, h90, h99), (_f50, f90, f99) = q["healthy"], q["faulty"]
        # the bulk of the distribution: within 20% (+10 ms of timer granularity)
        assert f90 <= h90 * 1.2 + 10, (ch, q)
        if strict_tail:
            # the tail: within 20% (+20 ms: one descheduling on this shared 2-core box)
            assert f99 <= h99 * 1.2 + 20, (ch, q)
        else:
            # in the default suite (other tests and other work share the machine) p99 of 120
            # samples is one or two descheduled events, ~100 ms either way; what must not
            # happen is a delivery waiting on the stuck provider: that adds its 1 s timeout
            assert f99 <= h99 + 500, (ch, q)

    # every SMS arrives once Twilio answers again: nothing lost, each number once
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len({m.form["To"] for m in twilio.messages}) < len(users):
        await asyncio.sleep(0.1)
    numbers = [m.form["To"] for m in twilio.messages]
    missing = [u for i, u in enumerate(users) if f"+1415555{i:04d}" not in numbers]
    assert not missing, f"no SMS for {missing}: {[node.rows(event_of[u], 'sms') for u in missing]}"
    assert len(numbers) == len(users), "an SMS was sent twice"
    moves = [r.getMessage() for r in caplog.records if "event=breaker_" in r.getMessage()]
    print("\n".join(moves))
    kinds = [m.split()[0] for m in moves]
    assert kinds[0] == "event=breaker_open" and kinds[-1] == "event=breaker_closed"
    assert "event=breaker_half_open" in kinds

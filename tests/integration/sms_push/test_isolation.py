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


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def test_a_hanging_sms_provider_does_not_slow_email_or_webhooks_and_loses_nothing(
    tmp_path: Path,
    twilio: FakeTwilio,
    sink: SmtpSink,
    receiver: Receiver,
    start_node: StartNode,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await fault_run(tmp_path, twilio, sink, receiver, start_node, caplog, "hang", events=40)


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
) -> None:
    """``events`` events with Twilio healthy, then ``events`` more with Twilio faulty
    (``hang`` or ``down``: 503), one user each on email, webhook and SMS; then Twilio heals."""
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
    users = [f"u{i:04d}" for i in range(2 * events)]
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

    healthy = await phase(users[:events])
    setattr(twilio, fault, True)
    faulty = await phase(users[events:])
    setattr(twilio, fault, False)

    report = {ch: (p99(healthy[ch]) * 1000, p99(faulty[ch]) * 1000) for ch in ("email", "webhook")}
    print(
        "\n".join(
            f"{ch}: p99 {base:.1f} ms healthy, {fault_p99:.1f} ms with Twilio {fault}"
            for ch, (base, fault_p99) in report.items()
        )
    )
    for ch, (base, fault_p99) in report.items():
        # within 20% (plus 20 ms: the loop's own jitter on a shared 2-core machine)
        assert fault_p99 <= base * 1.2 + 20, (ch, base, fault_p99)

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

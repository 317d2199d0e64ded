"""The webhook channel against a real aiohttp receiver on 127.0.0.1: signatures verified by the
``standardwebhooks`` package, every answer class mapped to its outcome, the SSRF guard, the
per-endpoint breaker and concurrency limit."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import time

import msgspec
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from channels.base import Delivered, Outcome, Permanent, Retry
from channels.breaker import BreakerState
from channels.errors import ChannelClosed
from channels.signing import generate_secret

from .conftest import ChannelFactory, delivery
from .receiver import Receiver, StaticResolver


def retry(outcome: Outcome) -> Retry:
    assert isinstance(outcome, Retry), outcome
    return outcome


def permanent(outcome: Outcome) -> Permanent:
    assert isinstance(outcome, Permanent), outcome
    return outcome


# ------------------------------------------------------------------------- signatures
async def test_the_receiver_verifies_the_signature_with_standardwebhooks(
    receiver: Receiver, webhook_factory: ChannelFactory
) -> None:
    secret = generate_secret()
    outcome = await webhook_factory().send(delivery(receiver.url("/status/200"), secret))
    assert isinstance(outcome, Delivered)
    (req,) = receiver.requests
    body = Webhook(secret).verify(req.body, dict(req.headers))
    assert req.headers["webhook-id"] == "dlv-1"
    assert abs(int(req.headers["webhook-timestamp"]) - time.time()) < 5
    assert req.headers["content-type"] == "application/json"
    assert body == {
        "type": "orders.shipped",
        "timestamp": "2025-11-24T16:00:00.123Z",
        "data": {
            "event_id": "evt-1",
            "user": "u-1",
            "topic": "orders.shipped",
            "payload": {"order": 42, "items": ["a", "b"]},
        },
    }


async def test_during_a_rotation_both_secrets_verify_and_no_other(
    receiver: Receiver, webhook_factory: ChannelFactory
) -> None:
    new, old = generate_secret(), generate_secret()
    await webhook_factory().send(delivery(receiver.url("/status/204"), new, old))
    (req,) = receiver.requests
    headers = dict(req.headers)
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(new).verify(req.body, headers)  # a receiver already on the new secret
    Webhook(old).verify(req.body, headers)  # a receiver still on the old one
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(req.body, headers)


async def test_webhook_id_and_body_stay_the_same_across_retries(
    receiver: Receiver, webhook_factory: ChannelFactory
) -> None:
    receiver.fail_next = 1
    channel = webhook_factory()
    secret = generate_secret()
    first = await channel.send(delivery(receiver.url("/flaky"), secret, attempt=1))
    second = await channel.send(delivery(receiver.url("/flaky"), secret, attempt=2))
    assert retry(first).reason == "http_503" and isinstance(second, Delivered)
    a, b = receiver.requests
    assert a.headers["webhook-id"] == b.headers["webhook-id"] == "dlv-1"
    assert a.body == b.body
    for req in (a, b):
        Webhook(secret).verify(req.body, dict(req.headers))


# ------------------------------------------------------------------------ answer classes
@pytest.mark.parametrize(
    ("path", "kind", "reason", "invalidates"),
    [
        ("/status/200", Delivered, None, None),
        ("/status/204", Delivered, None, None),
        ("/status/301", Permanent, "redirect", None),
        ("/status/400", Permanent, "http_400", None),
        ("/status/404", Permanent, "http_404", None),
        ("/status/410", Permanent, "gone", "endpoint"),
        ("/status/429", Retry, "http_429", None),
        ("/status/500", Retry, "http_500", None),
        ("/status/503", Retry, "http_503", None),
    ],
)
async def test_each_answer_class_gives_its_outcome(
    receiver: Receiver,
    webhook_factory: ChannelFactory,
    path: str,
    kind: type,
    reason: str | None,
    invalidates: str | None,
) -> None:
    outcome = await webhook_factory().send(delivery(receiver.url(path)))
    assert type(outcome) is kind, outcome
    if isinstance(outcome, (Retry, Permanent)):
        assert outcome.reason == reason
    if isinstance(outcome, Permanent):
        assert outcome.invalidates == invalidates
    assert receiver.paths() == [path]  # exactly one request: a 301 is not followed


async def test_retry_after_in_seconds_and_as_an_http_date_is_honoured_and_capped(
    receiver: Receiver, webhook_factory: ChannelFactory
) -> None:
    channel = webhook_factory(max_retry_after_ms=600_000)
    seconds = await channel.send(delivery(receiver.url("/status/429?retry_after=42")))
    assert retry(seconds).after_s == 42
    date = email.utils.formatdate(time.time() + 120, usegmt=True).replace(" ", "%20")
    dated = await channel.send(delivery(receiver.url(f"/status/429?retry_after={date}")))
    assert 118 <= (retry(dated).after_s or 0) <= 120
    on_503 = await channel.send(delivery(receiver.url("/status/503?retry_after=3")))
    assert retry(on_503).after_s == 3
    capped = await channel.send(delivery(receiver.url("/status/429?retry_after=86400")))
    assert retry(capped).after_s == 600


async def test_a_hang_past_the_timeout_is_a_retry(
    receiver: Receiver, webhook_factory: ChannelFactory
) -> None:
    channel = webhook_factory(timeout_ms=300, connect_timeout_ms=300)
    start = time.monotonic()
    outcome = await channel.send(delivery(receiver.url("/hang")))
    assert retry(outcome).reason == "timeout"
    assert 0.25 < time.monotonic() - start < 2


async def test_a_refused_connection_is_a_retry(webhook_factory: ChannelFactory) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outcome = await webhook_factory().send(delivery(f"http://127.0.0.1:{port}/x"))
    assert retry(outcome).reason == "connect_error"


async def test_a_reset_before_the_answer_is_a_retry(
    receiver: Receiver, webhook_factory: ChannelFactory
) -> None:
    outcome = await webhook_factory().send(delivery(receiver.url("/reset-before")))
    assert retry(outcome).reason == "connection_lost"


async def test_a_reset_mid_response_retries_unless_the_status_said_delivered(
    receiver: Receiver, webhook_factory: ChannelFactory
) -> None:
    channel = webhook_factory()
    after_503 = await channel.send(delivery(receiver.url("/reset-mid/503")))
    assert retry(after_503).reason == "connection_lost"
    after_200 = await channel.send(delivery(receiver.url("/reset-mid/200")))
    assert isinstance(after_200, Delivered) and "cut short" in after_200.detail


async def test_a_huge_response_body_is_cut_at_the_cap_and_not_drained(
    receiver: Receiver, webhook_factory: ChannelFactory
) -> None:
    channel = webhook_factory(max_response_bytes=1000)
    start = time.monotonic()
    outcome = await channel.send(delivery(receiver.url("/huge")))
    assert isinstance(outcome, Delivered) and outcome.detail.endswith("...")
    assert time.monotonic() - start < 2
    await asyncio.sleep(0.2)
    assert receiver.huge_bytes_sent < 64 << 20  # the connection was dropped, not drained
    # the channel still works: the dropped connection is not reused
    assert isinstance(await channel.send(delivery(receiver.url("/status/200"))), Delivered)


async def test_cookies_are_never_kept_between_requests(
    receiver: Receiver, webhook_factory: ChannelFactory
) -> None:
    channel = webhook_factory()
    await channel.send(delivery(receiver.url("/cookie")))
    await channel.send(delivery(receiver.url("/cookie")))
    assert all("Cookie" not in r.headers for r in receiver.requests)


async def test_connections_are_reused(receiver: Receiver, webhook_factory: ChannelFactory) -> None:
    channel = webhook_factory()
    for i in range(20):
        await channel.send(delivery(receiver.url("/status/204"), delivery_id=f"d{i}"))
    assert len({r.peer for r in receiver.requests}) == 1


async def test_unusable_addresses_are_permanent_without_a_request(
    webhook_factory: ChannelFactory,
) -> None:
    channel = webhook_factory(require_https=True)
    assert permanent(await channel.send(delivery("ftp://x/y"))).reason == "invalid_url"
    insecure = permanent(await channel.send(delivery("http://example.com/hook")))
    assert insecure.reason == "insecure_url" and insecure.invalidates == "endpoint"
    bad_secret = await channel.send(delivery("https://example.com/h", "whsec_short"))
    assert permanent(bad_secret).reason == "invalid_secret"


async def test_send_after_close_raises(webhook_factory: ChannelFactory) -> None:
    channel = webhook_factory()
    await channel.close()
    await channel.close()
    with pytest.raises(ChannelClosed):
        await channel.send(delivery("http://127.0.0.1:1/x"))


# -------------------------------------------------------------------------------- SSRF
@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://10.0.0.1/hook", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::1]:{port}/status/200", "loopback"),  # only 127.0.0.1 is allowed
        ("http://[::ffff:10.0.0.1]/hook", "private"),
        ("http://0.0.0.0:{port}/status/200", "unspecified"),
    ],
)
async def test_forbidden_addresses_are_refused_before_connecting(
    receiver: Receiver, webhook_factory: ChannelFactory, url: str, why: str
) -> None:
    channel = webhook_factory(connect_timeout_ms=5000, timeout_ms=10000)
    start = time.monotonic()
    outcome = permanent(await channel.send(delivery(url.format(port=receiver.port))))
    assert outcome.reason == "ssrf_refused" and outcome.invalidates == "endpoint"
    assert why in outcome.detail
    assert time.monotonic() - start < 1  # refused, not a connect attempt timing out
    assert receiver.requests == []


async def test_a_name_resolving_to_loopback_is_refused_unless_allowed(
    receiver: Receiver, webhook_factory: ChannelFactory
) -> None:
    refused = await webhook_factory(allow_networks=[]).send(
        delivery(receiver.url("/status/200", host="localhost"))
    )
    assert permanent(refused).reason == "ssrf_refused" and "loopback" in refused.detail
    assert receiver.requests == []
    allowed = await webhook_factory().send(delivery(receiver.url("/status/200", host="localhost")))
    assert isinstance(allowed, Delivered)  # ::1 dropped, 127.0.0.1 allowed


@pytest.mark.parametrize("host", ["0x7f.1", "127.1", "2130706433", "017700000001"])
async def test_obfuscated_loopback_forms_never_reach_the_receiver(
    receiver: Receiver, webhook_factory: ChannelFactory, host: str
) -> None:
    outcome = permanent(
        await webhook_factory(allow_networks=[]).send(
            delivery(receiver.url("/status/200", host=host))
        )
    )
    assert outcome.reason in ("ssrf_refused", "invalid_url")
    assert outcome.invalidates == "endpoint" and receiver.requests == []


async def test_the_check_is_on_the_resolved_address_not_the_name(
    receiver: Receiver, webhook_factory: ChannelFactory
) -> None:
    """A public-looking name whose DNS answer is 127.0.0.1 (DNS rebinding's second answer)."""
    rebinding = StaticResolver({"hooks.example.com": ["127.0.0.1"]})
    url = receiver.url("/status/200", host="hooks.example.com")
    refused = await webhook_factory(allow_networks=[], resolver=rebinding).send(delivery(url))
    assert permanent(refused).reason == "ssrf_refused"
    assert "hooks.example.com (127.0.0.1) is loopback" in refused.detail
    assert receiver.requests == []
    allowed = await webhook_factory(resolver=rebinding).send(delivery(url))
    assert isinstance(allowed, Delivered)
    assert receiver.requests[0].headers["Host"] == f"hooks.example.com:{receiver.port}"


# ----------------------------------------------------------------- breaker and limits
async def test_breaker_opens_probes_and_closes_with_a_receiver_that_recovers(
    receiver: Receiver, webhook_factory: ChannelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="herald.channels.webhook")
    now = [0.0]  # the breakers' clock, moved by hand: no sleeps, no timing flakes
    channel = webhook_factory(
        monotonic=lambda: now[0], breaker={"failure_threshold": 3, "open_ms": 30_000}
    )
    url = receiver.url("/flaky")
    endpoint = f"http://127.0.0.1:{receiver.port}"
    receiver.fail_next = 4  # three to open it, one to fail the first probe

    outcomes = [await channel.send(delivery(url)) for _ in range(3)]
    assert [retry(o).reason for o in outcomes] == ["http_503"] * 3
    breaker = channel.endpoints.get(endpoint).breaker
    assert breaker.state is BreakerState.OPEN

    now[0] += 10
    short = retry(await channel.send(delivery(url)))  # answered at once, no request
    assert short.reason == "circuit_open" and short.after_s == 20
    assert len(receiver.requests) == 3

    now[0] += 20
    assert retry(await channel.send(delivery(url))).reason == "http_503"  # the probe fails
    assert breaker.state is BreakerState.OPEN and breaker.retry_after() == 60  # doubled
    now[0] += 60
    assert isinstance(await channel.send(delivery(url)), Delivered)  # the probe succeeds
    assert breaker.state is BreakerState.CLOSED
    assert isinstance(await channel.send(delivery(url)), Delivered)
    assert len(receiver.requests) == 6

    moves = [r.getMessage() for r in caplog.records if "event=breaker_" in r.getMessage()]
    for line in moves:
        print(line)
    assert [m.split()[0] for m in moves] == [
        "event=breaker_open",
        "event=breaker_half_open",
        "event=breaker_open",
        "event=breaker_half_open",
        "event=breaker_closed",
    ]
    assert f"endpoint={endpoint}" in moves[0] and "why=consecutive_failures:3" in moves[0]


async def test_the_concurrency_limit_per_endpoint_holds(
    receiver: Receiver, webhook_factory: ChannelFactory
) -> None:
    receiver.delay_s = 0.05
    channel = webhook_factory(concurrency_per_endpoint=4)
    outcomes = await asyncio.gather(
        *(channel.send(delivery(receiver.url("/slow"), delivery_id=f"d{i}")) for i in range(40))
    )
    assert all(isinstance(o, Delivered) for o in outcomes)
    assert receiver.max_in_flight == 4  # measured by the receiver
    ep = channel.endpoints.get(f"http://127.0.0.1:{receiver.port}")
    assert ep.limit.peak == 4 and ep.limit.idle


async def test_a_busy_endpoint_answers_endpoint_busy_after_the_wait(
    receiver: Receiver, webhook_factory: ChannelFactory
) -> None:
    receiver.delay_s = 0.3
    channel = webhook_factory(concurrency_per_endpoint=2, endpoint_wait_ms=50)
    outcomes = await asyncio.gather(
        *(channel.send(delivery(receiver.url("/slow"), delivery_id=f"d{i}")) for i in range(6))
    )
    delivered = [o for o in outcomes if isinstance(o, Delivered)]
    busy = [retry(o).reason for o in outcomes if not isinstance(o, Delivered)]
    assert len(delivered) == 2 and busy == ["endpoint_busy"] * 4
    assert receiver.max_in_flight == 2


async def test_one_failing_endpoint_does_not_hold_another(
    receiver: Receiver, webhook_factory: ChannelFactory
) -> None:
    other = Receiver()
    await other.start()
    try:
        channel = webhook_factory(breaker={"failure_threshold": 1}, timeout_ms=5000)
        hung = asyncio.ensure_future(channel.send(delivery(receiver.url("/hang"))))
        await asyncio.sleep(0.05)
        start = time.monotonic()
        assert isinstance(await channel.send(delivery(other.url("/status/200"))), Delivered)
        assert time.monotonic() - start < 0.5
        hung.cancel()
        await asyncio.gather(hung, return_exceptions=True)
    finally:
        await other.stop()


async def test_an_endpoint_failing_for_the_configured_span_is_disabled(
    receiver: Receiver, webhook_factory: ChannelFactory
) -> None:
    now = [1000.0]
    day = 24 * 3600.0
    channel = webhook_factory(
        clock=time.time,
        monotonic=lambda: now[0],
        disable_after_ms=int(2 * day * 1000),
        breaker={"failure_threshold": 1000},
    )
    url = receiver.url("/status/503")
    for _ in range(4):  # failing every 12 hours
        assert retry(await channel.send(delivery(url))).reason == "http_503"
        now[0] += day / 2
    gone = permanent(await channel.send(delivery(url)))
    assert gone.reason == "endpoint_failing" and gone.invalidates == "endpoint"
    assert "failing for 48.0 h" in gone.detail

    # the delivery's own age counts too (a span a restart would have forgotten)
    fresh = webhook_factory(disable_after_ms=int(2 * day * 1000))
    old_ms = int((time.time() - 3 * day) * 1000)
    aged = permanent(await fresh.send(delivery(url, first_attempt_ms=old_ms, attempt=9)))
    assert aged.reason == "endpoint_failing"
    young_ms = int((time.time() - 3600) * 1000)
    assert retry(await fresh.send(delivery(url, first_attempt_ms=young_ms))).reason == "http_503"


async def test_a_cancelled_send_settles_its_breaker_ticket_and_slot(
    receiver: Receiver, webhook_factory: ChannelFactory
) -> None:
    channel = webhook_factory(breaker={"failure_threshold": 1, "open_ms": 100})
    receiver.fail_next = 1
    assert retry(await channel.send(delivery(receiver.url("/flaky")))).reason == "http_503"
    await asyncio.sleep(0.15)
    probe = asyncio.ensure_future(channel.send(delivery(receiver.url("/hang"))))
    await asyncio.sleep(0.1)
    probe.cancel()
    await asyncio.gather(probe, return_exceptions=True)
    ep = channel.endpoints.get(f"http://127.0.0.1:{receiver.port}")
    assert ep.limit.idle and ep.breaker.state is BreakerState.HALF_OPEN
    assert isinstance(await channel.send(delivery(receiver.url("/flaky"))), Delivered)
    assert ep.breaker.state is BreakerState.CLOSED


def test_body_is_msgspec_decodable_json() -> None:
    from channels.webhook import webhook_body

    d = delivery("http://x/", activities=(msgspec.Raw(b"1"),), category="billing")
    body = msgspec.json.decode(webhook_body(d))
    assert body["data"]["activities"] == [1] and body["data"]["category"] == "billing"
    assert webhook_body(d) == webhook_body(
        delivery("http://x/", attempt=5, activities=(msgspec.Raw(b"1"),), category="billing")
    )

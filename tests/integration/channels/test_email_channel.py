"""The email channel against a real SMTP server (aiosmtpd) on 127.0.0.1: what arrives, parsed
by the standard library's ``email`` package, and how every class of reply is answered."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from channels.base import Delivered, Delivery, EmailAddress, EmailContent, Permanent, Retry
from channels.breaker import BreakerState
from channels.config import BreakerConfig, EmailConfig
from channels.email import EmailChannel

from ..smtp_sink import SmtpSink, make_test_ca

UNSUB = "https://herald.example.com/unsubscribe/eyJ0IjoiYWNtZSJ9.c2lnbmF0dXJl"


def delivery(delivery_id: str = "0f" * 16, *, attempt: int = 1, **kw: Any) -> Delivery:
    address = kw.pop("address", EmailAddress(to="ada@example.org", unsubscribe_url=UNSUB))
    content = kw.pop(
        "content",
        EmailContent(
            subject="Your order shipped",
            text="Order 42 is on its way.\n",
            html="<p>Order <b>42</b> is on its way.</p>",
        ),
    )
    return Delivery(
        delivery_id=delivery_id,
        tenant="acme",
        user="u-1",
        topic="orders.shipped",
        event_id="evt-1",
        created_ms=1_764_000_000_000,
        attempt=attempt,
        category="marketing",
        payload=msgspec.Raw(b'{"order":42}'),
        address=address,
        content=content,
        **kw,
    )


@pytest.fixture
async def sink() -> AsyncIterator[SmtpSink]:
    s = SmtpSink()
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


Factory = Callable[..., EmailChannel]


@pytest.fixture
async def email_factory() -> AsyncIterator[Factory]:
    made: list[EmailChannel] = []

    def make(port: int, **kw: Any) -> EmailChannel:
        kw.setdefault("tls", "none")
        kw.setdefault("host", "127.0.0.1")
        kw.setdefault("from_address", "Acme <news@acme.test>")
        kw.setdefault("command_timeout_ms", 2000)
        kw.setdefault("connect_timeout_ms", 2000)
        if isinstance(kw.get("breaker"), dict):
            kw["breaker"] = BreakerConfig(**kw["breaker"])
        channel = EmailChannel(EmailConfig(port=port, **kw))
        made.append(channel)
        return channel

    try:
        yield make
    finally:
        for channel in made:
            await channel.close()


async def test_email_arrives_with_its_headers_and_both_parts(
    sink: SmtpSink, email_factory: Factory
) -> None:
    channel = email_factory(sink.port, reply_to="help@acme.test")
    outcome = await channel.send(delivery())
    assert isinstance(outcome, Delivered), outcome
    assert outcome.provider_message_id == "Q00001"  # from "250 2.0.0 Ok: queued as Q00001"
    (got,) = await sink.wait(1)
    assert got.mail_from == "news@acme.test"
    assert got.rcpt_tos == ["ada@example.org"]
    msg = got.message
    assert msg["From"] == "Acme <news@acme.test>"
    assert msg["To"] == "ada@example.org"
    assert msg["Reply-To"] == "help@acme.test"
    assert msg["Subject"] == "Your order shipped"
    assert msg["Message-ID"] == f"<{'0f' * 16}@acme.test>"
    assert msg["List-Unsubscribe"] == f"<{UNSUB}>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["Date"] is not None
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert text is not None and html is not None
    # the wire has CRLF line ends; the parser keeps them
    assert text.get_content().replace("\r\n", "\n") == "Order 42 is on its way.\n"
    assert html.get_content().strip() == "<p>Order <b>42</b> is on its way.</p>"
    # the raw message is 7-bit and no header line is folded into encoded words
    assert max(got.data) < 128
    assert b"=?utf-8?" not in got.data.split(b"\r\n\r\n")[0]


async def test_transactional_mail_has_no_unsubscribe_headers(
    sink: SmtpSink, email_factory: Factory
) -> None:
    channel = email_factory(sink.port)
    d = delivery(
        address=EmailAddress(to="ada@example.org"),
        content=EmailContent(subject="Reset your password", text="Click the link."),
    )
    assert isinstance(await channel.send(d), Delivered)
    (got,) = await sink.wait(1)
    msg = got.message
    assert msg["List-Unsubscribe"] is None and msg["List-Unsubscribe-Post"] is None
    assert msg.get_content_type() == "text/plain"  # no HTML part without an HTML template


async def test_4xx_is_a_retry_and_the_retry_has_the_same_message_id(
    sink: SmtpSink, email_factory: Factory
) -> None:
    channel = email_factory(sink.port)
    sink.script.data.append("451 4.3.0 Temporary local problem, try again")
    first = await channel.send(delivery(attempt=1))
    assert isinstance(first, Retry) and first.reason == "smtp_451", first
    second = await channel.send(delivery(attempt=2))
    assert isinstance(second, Delivered), second
    assert len(sink.data_seen) == 2
    import email as email_pkg

    ids = [email_pkg.message_from_bytes(raw)["Message-ID"] for raw in sink.data_seen]
    assert ids[0] == ids[1] == f"<{'0f' * 16}@acme.test>"
    assert sink.connections == 1  # the refusal was RSET, the connection reused


@pytest.mark.parametrize(
    ("stage", "reply", "reason", "invalidates"),
    [
        ("rcpt", "550 5.1.1 <ada@example.org>: Recipient address rejected: User unknown",
         "smtp_550", "address"),
        ("rcpt", "551 User not local", "smtp_551", "address"),
        ("rcpt", "553 5.1.3 Bad recipient address syntax", "smtp_553", "address"),
        ("rcpt", "550 5.7.1 Sender blocked by policy", "smtp_550", None),
        ("rcpt", "552 5.2.2 Mailbox full", "smtp_552", None),
        ("data", "554 5.7.1 Message rejected as spam", "smtp_554", None),
    ],
)  # fmt: skip
async def test_5xx_is_permanent_and_a_dead_mailbox_invalidates_the_address(
    sink: SmtpSink,
    email_factory: Factory,
    stage: str,
    reply: str,
    reason: str,
    invalidates: str | None,
) -> None:
    channel = email_factory(sink.port)
    getattr(sink.script, stage).append(reply)
    outcome = await channel.send(delivery())
    assert isinstance(outcome, Permanent), outcome
    assert (outcome.reason, outcome.invalidates) == (reason, invalidates)
    assert reply.split()[0] in outcome.detail
    # a refused recipient is no sign of a sick server: the breaker stays closed
    assert channel.endpoints.get(channel.server).breaker.state is BreakerState.CLOSED


async def test_a_busy_mailbox_on_rcpt_is_a_retry_that_does_not_trip_the_breaker(
    sink: SmtpSink, email_factory: Factory
) -> None:
    channel = email_factory(sink.port, breaker={"failure_threshold": 2})
    for _ in range(3):
        sink.script.rcpt.append("452 4.2.2 Mailbox busy, try later")
        outcome = await channel.send(delivery())
        assert isinstance(outcome, Retry) and outcome.reason == "smtp_452"
    assert channel.endpoints.get(channel.server).breaker.state is BreakerState.CLOSED


async def test_connections_are_pooled_and_reused(sink: SmtpSink, email_factory: Factory) -> None:
    import asyncio

    channel = email_factory(sink.port, pool_size=3)
    outcomes = await asyncio.gather(*(channel.send(delivery(f"{i:032x}")) for i in range(30)))
    assert all(isinstance(o, Delivered) for o in outcomes)
    assert len(sink.received) == 30
    assert channel.pool.opened <= 3 and sink.connections <= 3
    assert channel.endpoints.get(channel.server).limit.peak <= 3


async def test_a_connection_the_server_dropped_while_idle_is_replaced_silently(
    sink: SmtpSink, email_factory: Factory
) -> None:
    channel = email_factory(sink.port)
    assert isinstance(await channel.send(delivery("a" * 32)), Delivered)
    sink.drop_clients()
    import asyncio

    await asyncio.sleep(0.05)
    assert isinstance(await channel.send(delivery("b" * 32)), Delivered)
    assert len(sink.received) == 2


async def test_a_server_that_is_down_is_a_retry_and_opens_the_breaker(
    email_factory: Factory,
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    channel = email_factory(port, breaker={"failure_threshold": 2, "open_ms": 60_000})
    first = await channel.send(delivery())
    assert isinstance(first, Retry) and first.reason == "connect_error", first
    await channel.send(delivery())
    third = await channel.send(delivery())
    assert isinstance(third, Retry) and third.reason == "circuit_open"
    assert third.after_s is not None and third.after_s > 50


async def test_a_silent_server_is_a_timeout_retry(sink: SmtpSink, email_factory: Factory) -> None:
    channel = email_factory(sink.port, command_timeout_ms=300)
    sink.script.data_delay_s = 1.0
    outcome = await channel.send(delivery())
    assert isinstance(outcome, Retry) and outcome.reason == "timeout", outcome
    assert "after DATA" in outcome.detail


async def test_unusable_deliveries_are_permanent_without_a_connection(
    sink: SmtpSink, email_factory: Factory
) -> None:
    channel = email_factory(sink.port)
    no_addr = await channel.send(delivery(address=None))
    assert isinstance(no_addr, Permanent) and no_addr.reason == "no_address"
    bad = await channel.send(delivery(address=EmailAddress(to="a@b.c>\r\nRCPT TO:<x@y.z")))
    assert isinstance(bad, Permanent) and (bad.reason, bad.invalidates) == (
        "invalid_address",
        "address",
    )
    no_content = await channel.send(delivery(content=None))
    assert isinstance(no_content, Permanent) and no_content.reason == "no_content"
    assert sink.connections == 0


# ---------------------------------------------------------------------- STARTTLS, AUTH
async def test_starttls_against_a_test_ca_with_auth(tmp_path: Path, email_factory: Factory) -> None:
    ca = make_test_ca(tmp_path / "tls")
    sink = SmtpSink(
        tls_context=ca.server_context(), require_starttls=True, credentials=("herald", "s3cret")
    )
    await sink.start()
    try:
        channel = email_factory(
            sink.port,
            host="localhost",
            tls="starttls",
            tls_ca_file=str(ca.ca_pem),
            username="herald",
            password="s3cret",
        )
        outcome = await channel.send(delivery())
        assert isinstance(outcome, Delivered), outcome
        (got,) = await sink.wait(1)
        assert got.tls  # the message travelled inside TLS
        assert got.message["Subject"] == "Your order shipped"

        # a certificate from a CA the client does not trust: no mail, a retry
        untrusting = email_factory(
            sink.port, host="localhost", tls="starttls", username="herald", password="s3cret"
        )
        refused = await untrusting.send(delivery())
        assert isinstance(refused, Retry) and refused.reason == "tls_error", refused

        # a wrong password: a retry counted against the server, not a dead letter
        wrong = email_factory(
            sink.port,
            host="localhost",
            tls="starttls",
            tls_ca_file=str(ca.ca_pem),
            username="herald",
            password="nope",
        )
        denied = await wrong.send(delivery())
        assert isinstance(denied, Retry) and denied.reason == "auth_failed", denied
        assert len(sink.received) == 1
    finally:
        await sink.stop()


async def test_implicit_tls_with_auth_against_a_test_ca(
    tmp_path: Path, email_factory: Factory
) -> None:
    ca = make_test_ca(tmp_path / "tls")
    sink = SmtpSink(
        tls_context=ca.server_context(), implicit_tls=True, credentials=("herald", "s3cret")
    )
    await sink.start()
    try:
        channel = email_factory(
            sink.port,
            host="localhost",
            tls="implicit",
            tls_ca_file=str(ca.ca_pem),
            username="herald",
            password="s3cret",
        )
        for _ in range(2):
            outcome = await channel.send(delivery())
            assert isinstance(outcome, Delivered), outcome
        got = await sink.wait(2)
        assert all(g.tls for g in got)  # inside TLS from the first byte
        assert got[0].message["Subject"] == "Your order shipped"
        assert sink.connections == 1  # one TLS session, reused for the second message

        # a client speaking plain SMTP to the TLS port gets nowhere: a retry, no mail
        plain = email_factory(sink.port, host="localhost", tls="none")
        refused = await plain.send(delivery())
        assert isinstance(refused, Retry), refused
        assert len(sink.received) == 2
    finally:
        await sink.stop()


async def test_a_plain_client_cannot_send_where_starttls_is_required(
    tmp_path: Path, email_factory: Factory
) -> None:
    ca = make_test_ca(tmp_path / "tls")
    sink = SmtpSink(tls_context=ca.server_context(), require_starttls=True)
    await sink.start()
    try:
        channel = email_factory(sink.port, tls="none")
        outcome = await channel.send(delivery())
        assert isinstance(outcome, Retry), outcome  # 530 Must issue a STARTTLS command first
        assert sink.received == []
    finally:
        await sink.stop()

"""The email channel's pure parts: the SMTP reply table, provider ids, addresses, the
message's headers."""

from __future__ import annotations

import email
import email.policy

import msgspec
import pytest

from channels.base import Delivered, Delivery, EmailAddress, EmailContent, Permanent, Retry
from channels.config import EmailConfig
from channels.email import (
    build_message,
    classify,
    domain_of,
    enhanced_status,
    provider_id,
    valid_address,
)


@pytest.mark.parametrize(
    ("stage", "code", "text", "kind", "reason", "invalidates", "health"),
    [
        ("data", 250, "2.0.0 Ok: queued as ABC123", Delivered, None, None, "success"),
        ("data", 451, "4.3.0 try later", Retry, "smtp_451", None, "failure"),
        ("rcpt", 450, "4.2.1 greylisted", Retry, "smtp_450", None, "success"),
        ("rcpt", 421, "4.4.2 closing", Retry, "smtp_421", None, "failure"),
        ("mail", 421, "too busy", Retry, "smtp_421", None, "failure"),
        ("rcpt", 550, "5.1.1 user unknown", Permanent, "smtp_550", "address", "success"),
        ("rcpt", 550, "No such user", Permanent, "smtp_550", "address", "success"),
        ("rcpt", 551, "5.1.6 moved", Permanent, "smtp_551", "address", "success"),
        ("rcpt", 553, "5.1.3 bad syntax", Permanent, "smtp_553", "address", "success"),
        ("rcpt", 550, "5.2.1 mailbox disabled", Permanent, "smtp_550", "address", "success"),
        ("rcpt", 550, "5.7.1 blocked by policy", Permanent, "smtp_550", None, "success"),
        ("rcpt", 554, "5.7.1 relay denied", Permanent, "smtp_554", None, "success"),
        ("mail", 550, "5.7.1 sender not allowed", Permanent, "smtp_550", None, "success"),
        ("data", 550, "5.1.1 strange but not on RCPT", Permanent, "smtp_550", None, "success"),
        ("data", 552, "5.3.4 too big", Permanent, "smtp_552", None, "success"),
        ("connect", 554, "no service", Retry, "smtp_554", None, "failure"),
        ("connect", 535, "5.7.8 bad credentials", Retry, "auth_failed", None, "failure"),
        ("mail", 530, "5.7.0 Must issue STARTTLS", Retry, "auth_required", None, "failure"),
    ],
)  # fmt: skip
def test_every_reply_class_has_its_outcome(
    stage: str,
    code: int,
    text: str,
    kind: type,
    reason: str | None,
    invalidates: str | None,
    health: str,
) -> None:
    outcome, got_health = classify(stage, code, text)  # type: ignore[arg-type]
    assert isinstance(outcome, kind)
    assert getattr(outcome, "reason", None) == reason
    assert getattr(outcome, "invalidates", None) == invalidates
    assert got_health == health
    assert str(code) in outcome.detail


@pytest.mark.parametrize(
    ("reply", "found"),
    [
        ("2.0.0 Ok: queued as 4F2A81C0", "4F2A81C0"),
        ("OK id=1tXyzA-000ABC-Ab", "1tXyzA-000ABC-Ab"),
        ("Ok 0100018c5f4e3b2a-1234abcd-000000", "0100018c5f4e3b2a-1234abcd-000000"),
        ("OK", None),
        ("2.0.0 OK", None),
    ],
)
def test_provider_ids_are_read_from_the_common_reply_shapes(reply: str, found: str | None) -> None:
    assert provider_id(reply) == found


def test_enhanced_status_and_domains() -> None:
    assert enhanced_status("5.1.1 <a@b>: unknown") == (5, 1, 1)
    assert enhanced_status("Mailbox unknown") is None
    assert domain_of("Acme <news@acme.test>") == "acme.test"
    assert domain_of("noreply@x.example") == "x.example"


@pytest.mark.parametrize(
    ("addr", "ok"),
    [
        ("ada@example.org", True),
        ("a.b+tag@sub.example.org", True),
        ("no-at.example.org", False),
        ("two@@example.org", False),
        ("a@b.c>\r\nRCPT TO:<x@y.z", False),
        ("sp ace@example.org", False),
        ("<ada@example.org>", False),
        ("ada@.example.org", False),
    ],
)
def test_only_plain_addresses_are_sent_to(addr: str, ok: bool) -> None:
    assert valid_address(addr) is ok


def _delivery(**kw: object) -> Delivery:
    return Delivery(
        delivery_id="ab" * 16,
        tenant="t",
        user="u",
        topic="news",
        event_id="e",
        created_ms=0,
        payload=msgspec.Raw(b"null"),
        **kw,  # type: ignore[arg-type]
    )


def test_the_message_is_the_same_on_every_attempt_but_for_its_date() -> None:
    cfg = EmailConfig(from_address="N <n@acme.test>", message_id_domain="mail.acme.test")
    address = EmailAddress(to="ada@example.org", unsubscribe_url="https://h/u/" + "x" * 200)
    content = EmailContent(subject="Héllo\r\nBcc: evil@x", text="é" * 10, html="<p>é</p>")
    a = build_message(_delivery(), address, content, cfg, date=1_700_000_000)
    b = build_message(_delivery(attempt=2), address, content, cfg, date=1_700_000_100)
    strip = lambda raw: b"\r\n".join(  # noqa: E731
        line
        for line in raw.split(b"\r\n")
        if not line.startswith((b"Date:", b"--", b"Content-Type: multipart"))
    )
    # boundaries are random; everything else but the date is equal
    assert strip(a).split(b"\r\n")[:8] == strip(b).split(b"\r\n")[:8]
    msg = email.message_from_bytes(a, policy=email.policy.default)
    assert msg["Message-ID"] == f"<{'ab' * 16}@mail.acme.test>"
    assert msg["Subject"] == "Héllo Bcc: evil@x"  # a line break cannot add a header
    assert msg["Bcc"] is None
    assert msg["List-Unsubscribe"] == "<https://h/u/" + "x" * 200 + ">"  # one line, not encoded

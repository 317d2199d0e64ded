"""Email end to end on a real node: an event published over HTTP becomes an email that a real
SMTP server (aiosmtpd) on 127.0.0.1 receives, parsed with the standard library; the
one-click unsubscribe POSTed to the node stops the next one; replies, bounces and templates
drive the outcomes a user of Herald would see in the event's status."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from pathlib import Path

import msgspec

from ..smtp_sink import SmtpSink
from .conftest import BOUNCE_SECRET, PUBLIC_URL, StartNode, email_node_config

UNSUB_TEXT = "{% if unsubscribe_url %}Unsubscribe: {{ unsubscribe_url }}{% endif %}"
UNSUB_HTML = '{% if unsubscribe_url %}<a href="{{ unsubscribe_url }}">Unsubscribe</a>{% endif %}'
NEWS = {
    "locales": {
        "default": {
            "subject": "{{ data.title }} for {{ recipient.id }}",
            "text": "{{ data.title }}\n" + UNSUB_TEXT + "\n",
            "html": "<h1>{{ data.title }}</h1>" + UNSUB_HTML,
        }
    }
}


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def body(msg: EmailMessage, kind: str) -> str:
    part = msg.get_body((kind,))
    assert part is not None, f"no {kind} part"
    return str(part.get_content()).replace("\r\n", "\n")


async def test_an_event_arrives_as_email_and_one_click_unsubscribe_stops_the_next(
    email_node: StartNode, sink: SmtpSink
) -> None:
    node = await email_node()
    code, _ = await node.call("PUT", "/templates/news.weekly/email", NEWS)
    assert code == 200
    await node.user("ada", "ada@example.org", "news.weekly", "account.security")

    first = await node.publish(
        topic="news.weekly", category="marketing", payload={"title": "Deals <b>now</b>"}
    )
    row = await node.settled(first, {"delivered", "dead_lettered"})
    assert row["status"] == "delivered", row
    (got,) = await sink.wait(1)
    assert got.rcpt_tos == ["ada@example.org"]
    msg = parse(got.data)
    assert msg["From"] == "Acme <news@acme.test>"
    assert msg["To"] == "ada@example.org"
    assert msg["Subject"] == "Deals <b>now</b> for ada"
    assert msg["Message-ID"] == f"<{row['delivery_id']}@acme.test>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link = msg["List-Unsubscribe"]
    assert link.startswith(f"<{PUBLIC_URL}/unsubscribe/") and link.endswith(">")
    url = link[1:-1]
    # both parts: the text as written, the HTML escaped, each with the visible link
    assert body(msg, "plain") == f"Deals <b>now</b>\nUnsubscribe: {url}\n"
    assert body(msg, "html").rstrip("\n") == (
        f'<h1>Deals &lt;b&gt;now&lt;/b&gt;</h1><a href="{url}">Unsubscribe</a>'
    )
    path = url[len(PUBLIC_URL) :]

    # a GET shows a page that asks; it unsubscribes nobody (link scanners fetch GETs)
    code, page = await node.call("GET", path)
    assert code == 200 and 'method="post"' in page and "marketing" in page
    assert node.registry.consent_ledger("default", "ada") == []

    # RFC 8058: the mail provider POSTs the one-click form, no key, no cookie; no redirect
    code, page = await node.call(
        "POST",
        path,
        data=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert code == 200 and "no longer receive" in page
    (entry,) = node.registry.consent_ledger("default", "ada")
    assert (entry.channel, entry.scope, entry.opted_in, entry.legal, entry.source) == (
        "email",
        "category:marketing",
        False,
        True,
        "unsubscribe_link",
    )
    # once more is harmless
    code, _ = await node.call(
        "POST",
        path,
        data=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "multipart/form-data; boundary=x"},  # RFC 8058's other form
    )
    assert code == 200 and len(node.registry.consent_ledger("default", "ada")) == 1

    # the next marketing event: no email, and the status says why
    second = await node.publish(
        topic="news.weekly", category="marketing", payload={"title": "More deals"}
    )
    row = await node.settled(second, {"suppressed", "delivered"})
    assert row["status"] == "suppressed" and row["reason"] == "legal_opt_out", row
    assert "unsubscribe_link" in row["detail"]
    # transactional mail of another kind still goes, without unsubscribe headers
    third = await node.publish(topic="account.security", payload={"what": "new sign-in"})
    row = await node.settled(third, {"delivered", "suppressed", "dead_lettered"})
    assert row["status"] == "delivered", row
    received = await sink.wait(2)
    assert len(received) == 2
    assert parse(received[1].data)["List-Unsubscribe"] is None
    assert parse(received[1].data)["Subject"] == "account.security"  # the built-in template


async def test_a_forged_or_mangled_unsubscribe_token_is_refused(email_node: StartNode) -> None:
    node = await email_node()
    await node.user("ada", "ada@example.org")
    for token in ("nope", "eyJhIjoxfQ.AAAAAAAAAAAAAAAAAAAAAA", "x" * 5000):
        code, _ = await node.call("POST", f"/unsubscribe/{token}", data=b"")
        assert code == 404
    assert node.registry.consent_ledger("default", "ada") == []


async def test_a_4xx_is_retried_with_the_same_message_id_then_delivered(
    email_node: StartNode, sink: SmtpSink
) -> None:
    node = await email_node()
    await node.user("ada", "ada@example.org", "orders")
    sink.script.data.append("451 4.3.0 Temporary local problem")
    event = await node.publish(topic="orders", payload={"order": 42})
    row = await node.settled(event, {"delivered", "dead_lettered"})
    assert row["status"] == "delivered", row
    outcomes = [a["outcome"] for a in row["attempts"]]
    assert outcomes == ["undelivered", "delivered"], row["attempts"]
    assert "smtp_451" in row["attempts"][0]["detail"]
    ids = {parse(raw)["Message-ID"] for raw in sink.data_seen}
    assert ids == {f"<{row['delivery_id']}@acme.test>"}  # one id for both attempts
    assert len(sink.data_seen) == 2 and len(sink.received) == 1


async def test_a_5xx_goes_to_the_dead_letter_queue(email_node: StartNode, sink: SmtpSink) -> None:
    node = await email_node()
    await node.user("ada", "ada@example.org", "orders")
    sink.script.data.append("554 5.7.1 Message rejected as spam")
    event = await node.publish(topic="orders", payload={"order": 42})
    row = await node.settled(event, {"delivered", "dead_lettered"})
    assert (row["status"], row["reason"]) == ("dead_lettered", "smtp_554"), row
    (letter,) = node.engine.dlq_list("default", "email")
    assert letter.reason == "smtp_554" and letter.delivery.delivery_id == row["delivery_id"]
    assert sink.received == []
    # the address is fine: not invalidated
    contact = node.registry.contact("default", "ada")
    assert contact is not None and contact.email_invalid_ms is None


async def test_a_refused_mailbox_invalidates_the_address_and_later_mail_is_suppressed(
    email_node: StartNode, sink: SmtpSink
) -> None:
    node = await email_node()
    await node.user("ada", "gone@example.org", "orders")
    sink.script.rcpt.append("550 5.1.1 <gone@example.org>: Recipient address rejected")
    event = await node.publish(topic="orders", payload={"order": 1})
    row = await node.settled(event, {"delivered", "dead_lettered"})
    assert (row["status"], row["reason"]) == ("dead_lettered", "smtp_550"), row
    contact = node.registry.contact("default", "ada")
    assert contact is not None and contact.email_invalid_ms is not None
    (logged,) = node.registry.contact_log("default", "ada")
    assert (logged.kind, logged.source, logged.address) == (
        "invalidated",
        "delivery",
        "gone@example.org",
    )

    later = await node.publish(topic="orders", payload={"order": 2})
    row = await node.settled(later, {"suppressed", "delivered", "dead_lettered"})
    assert (row["status"], row["reason"]) == ("suppressed", "address_invalid"), row
    assert "gone@example.org" in row["detail"] and "5.1.1" in row["detail"]
    assert len(sink.data_seen) == 0  # no DATA was ever sent


async def test_a_hard_bounce_reported_to_the_hook_invalidates_the_address(
    email_node: StartNode, sink: SmtpSink
) -> None:
    node = await email_node()
    await node.user("ada", "ada@example.org", "orders")
    first = await node.publish(topic="orders", payload={"order": 1})
    await node.settled(first, {"delivered"})
    (got,) = await sink.wait(1)
    ref = str(parse(got.data)["X-Herald-Ref"])
    assert ref

    report = {"type": "hard", "ref": ref, "email": "ada@example.org", "detail": "550 5.1.1 unknown"}
    code, _ = await node.call("POST", "/hooks/email/bounce", report)
    assert code == 401
    code, _ = await node.call(
        "POST", "/hooks/email/bounce", report, headers={"Authorization": "Bearer wrong"}
    )
    assert code == 403
    auth = {"Authorization": f"Bearer {BOUNCE_SECRET}"}
    forged = {**report, "ref": ref[:-4] + "AAAA"}
    code, answer = await node.call("POST", "/hooks/email/bounce", forged, headers=auth)
    assert code == 400 and answer["error"]["field"] == "ref"
    code, answer = await node.call("POST", "/hooks/email/bounce", report, headers=auth)
    assert code == 200 and answer == {
        "tenant": "default",
        "user": "ada",
        "action": "invalidated",
        "event_id": first,
    }
    row = await node.settled(first, {"bounced"})  # the delivery's status too
    assert (row["reason"], row["detail"]) == ("hard_bounce", "550 5.1.1 unknown")
    contact = node.registry.contact("default", "ada")
    assert contact is not None and contact.email_invalid_reason == "hard_bounce: 550 5.1.1 unknown"
    (logged,) = node.registry.contact_log("default", "ada")
    assert (logged.kind, logged.source) == ("invalidated", "bounce_hook")

    later = await node.publish(topic="orders", payload={"order": 2})
    row = await node.settled(later, {"suppressed", "delivered"})
    assert (row["status"], row["reason"]) == ("suppressed", "address_invalid"), row
    assert "hard_bounce" in row["detail"]
    assert len(sink.received) == 1

    # a new address starts clean
    await node.user("ada", "ada@new.example.org")
    contact = node.registry.contact("default", "ada")
    assert contact is not None and contact.email_invalid_ms is None

    # a ref from mail sent before refs named the delivery: the address alone
    signer = node.engine.composer.signer
    assert signer is not None
    old = {**report, "ref": signer.ref("default", "ada"), "email": "ada@new.example.org"}
    code, answer = await node.call("POST", "/hooks/email/bounce", old, headers=auth)
    assert code == 200 and answer == {"tenant": "default", "user": "ada", "action": "invalidated"}


async def test_soft_bounces_are_noted_and_a_complaint_is_a_legal_opt_out(
    email_node: StartNode,
) -> None:
    node = await email_node()
    await node.user("ada", "ada@example.org", "orders")
    auth = {"Authorization": f"Bearer {BOUNCE_SECRET}"}
    soft = {"type": "soft", "tenant": "default", "user": "ada", "detail": "452 mailbox full"}
    code, answer = await node.call("POST", "/hooks/email/bounce", soft, headers=auth)
    assert code == 200 and answer["action"] == "noted"
    contact = node.registry.contact("default", "ada")
    assert contact is not None and contact.email_invalid_ms is None
    complaint = {"type": "complaint", "tenant": "default", "user": "ada"}
    code, answer = await node.call("POST", "/hooks/email/bounce", complaint, headers=auth)
    assert code == 200 and answer["action"] == "opted_out"
    kinds = [e.kind for e in node.registry.contact_log("default", "ada")]
    assert kinds == ["soft_bounce", "complaint"]
    event = await node.publish(topic="orders", payload={"order": 2})
    row = await node.settled(event, {"suppressed", "delivered"})
    assert (row["status"], row["reason"]) == ("suppressed", "legal_opt_out"), row
    assert "complaint" in row["detail"]


async def test_a_template_with_a_missing_field_is_a_recorded_render_error(
    email_node: StartNode, sink: SmtpSink
) -> None:
    node = await email_node()
    template = {"locales": {"default": {"subject": "Order {{ data.order }}",
                                        "text": "Ships to {{ data.address.city }}"}}}  # fmt: skip
    code, _ = await node.call("PUT", "/templates/orders/email", template)
    assert code == 200
    await node.user("ada", "ada@example.org", "orders")
    bad = await node.publish(topic="orders", payload={"order": 42})
    row = await node.settled(bad, {"delivered", "dead_lettered"})
    assert (row["status"], row["reason"]) == ("dead_lettered", "render_error"), row
    assert "address" in row["detail"] and "orders/email/default.text" in row["detail"]
    (letter,) = node.engine.dlq_list("default", "email")
    assert letter.reason == "render_error"
    # the node is fine: the next event renders and goes
    good = await node.publish(topic="orders", payload={"order": 43, "address": {"city": "Oslo"}})
    row = await node.settled(good, {"delivered", "dead_lettered"})
    assert row["status"] == "delivered", row
    (got,) = await sink.wait(1)
    assert parse(got.data)["Subject"] == "Order 43"
    code, health = await node.call("GET", "/healthz")
    assert code == 200, health


async def test_the_recipients_locale_falls_back_to_its_language_then_default(
    email_node: StartNode, sink: SmtpSink
) -> None:
    node = await email_node()
    template = {
        "locales": {
            "default": {"subject": "Hello {{ recipient.id }}", "text": "Hi"},
            "fr": {"subject": "Bonjour {{ recipient.id }}", "text": "Salut"},
            "fr-CA": {"subject": "Allô {{ recipient.id }}", "text": "Salut"},
        }
    }
    code, _ = await node.call("PUT", "/templates/greet/email", template)
    assert code == 200
    await node.user("quebec", "q@example.org", "greet", locale="fr-CA")
    await node.user("belgium", "b@example.org", "greet", locale="fr-BE")
    await node.user("berlin", "d@example.org", "greet", locale="de-DE")
    event = await node.publish(topic="greet", payload={})
    await sink.wait(3)
    for user in ("quebec", "belgium", "berlin"):  # the indexer folds the statuses a bit later
        await node.settled(event, {"delivered"}, user=user)
    subjects = sorted(parse(r.data)["Subject"] for r in sink.received)
    assert subjects == ["Allô quebec", "Bonjour belgium", "Hello berlin"]


async def test_wrong_bounce_secrets_from_one_address_are_throttled_then_refused_unchecked(
    tmp_path: Path, email_node: StartNode, sink: SmtpSink
) -> None:
    """After admission.auth-failures-per-minute wrong secrets an address is answered 429
    without a check, even with the right secret: the secret cannot be guessed at speed."""
    cfg = email_node_config(tmp_path / "throttled", sink.port)
    cfg = msgspec.structs.replace(
        cfg, admission=msgspec.structs.replace(cfg.admission, auth_failures_per_minute=3)
    )
    node = await email_node(cfg)
    await node.user("ada", "ada@example.org", "orders")
    report = {"type": "hard", "tenant": "default", "user": "ada", "email": "ada@example.org"}
    codes = []
    for _ in range(5):
        wrong = {"Authorization": "Bearer wrong"}
        codes.append((await node.call("POST", "/hooks/email/bounce", report, headers=wrong))[0])
    assert codes == [403, 403, 403, 429, 429]
    right = {"Authorization": f"Bearer {BOUNCE_SECRET}"}
    code, answer = await node.call("POST", "/hooks/email/bounce", report, headers=right)
    assert code == 429 and answer["error"]["code"] == "auth_throttled"
    contact = node.registry.contact("default", "ada")
    assert contact is not None and contact.email_invalid_ms is None

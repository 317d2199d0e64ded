"""SMS end to end on a real node: events to a fake Twilio on 127.0.0.1 (form fields and basic
auth checked there), inbound STOP / START / HELP signed as Twilio signs them, STOP's silence
even for a mandatory critical topic, invalid numbers and Twilio's 21610 marking the contact,
and failover between two providers and back."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest

from channels.config import BreakerConfig, SmsConfig

from ..channels.fake_twilio import FakeTwilio
from .conftest import BACKUP, SENDER, StartNode, node_config, provider

PHONE = "+14155550100"


def sms_config(*providers: object, **kw: object) -> SmsConfig:
    kw.setdefault("breaker", BreakerConfig(failure_threshold=2, open_ms=300, max_open_ms=600))
    return SmsConfig(providers=list(providers), timeout_ms=2000, **kw)  # type: ignore[arg-type]


async def test_an_event_reaches_twilio_as_its_form_and_the_sid_is_recorded(
    tmp_path: Path, start_node: StartNode, twilio: FakeTwilio
) -> None:
    node = await start_node(
        node_config(tmp_path, channels=["sms"], sms=sms_config(provider(twilio)))
    )
    await node.user("ann", "orders.shipped", phone=PHONE)
    event = await node.publish(topic="orders.shipped", users=["ann"], payload={"order": 42})
    row = await node.settled(event, "sms", {"delivered"})
    (msg,) = twilio.messages
    assert msg.form["To"] == PHONE and msg.form["From"] == SENDER
    assert msg.form["Body"]  # the built-in SMS template's text
    assert f"provider_message_id={msg.sid}" in row["detail"]


async def test_stop_silences_sms_at_once_even_for_a_mandatory_critical_topic_and_start_undoes_it(
    tmp_path: Path, start_node: StartNode, twilio: FakeTwilio
) -> None:
    cfg = node_config(tmp_path, channels=["sms"], sms=sms_config(provider(twilio)))
    node = await start_node(cfg)
    await node.ok("PUT", "/admin/mandatory/security.alert")
    await node.user("ann", "security.alert", phone=PHONE)
    await node.user("bob", "security.alert", phone="+14155550101")
    first = await node.publish(topic="security.alert", priority="critical", payload={})
    await node.settled(first, "sms", {"delivered"}, user="ann")
    await node.settled(first, "sms", {"delivered"}, user="bob")
    assert len(twilio.sent_to(PHONE)) == 1

    code, twiml = await node.inbound("Stop", sender=PHONE)
    assert code == 200
    assert twiml.startswith("<?xml") and "<Message>You are unsubscribed" in twiml
    consent = await node.ok("GET", "/users/ann/consent")
    entry = consent["ledger"][-1]
    assert (entry["channel"], entry["opted_in"], entry["source"], entry["legal"]) == (
        "sms",
        False,
        "sms_stop",
        True,
    )

    second = await node.publish(topic="security.alert", priority="critical", payload={})
    row = await node.settled(second, "sms", {"suppressed"}, user="ann")
    assert row["reason"] == "legal_opt_out"
    await node.settled(second, "sms", {"delivered"}, user="bob")  # only ann said stop
    assert len(twilio.sent_to(PHONE)) == 1

    code, twiml = await node.inbound("START", sender=PHONE)
    assert code == 200 and "subscribed to Herald notifications again" in twiml
    third = await node.publish(topic="security.alert", priority="critical", payload={})
    await node.settled(third, "sms", {"delivered"}, user="ann")
    assert len(twilio.sent_to(PHONE)) == 2


async def test_a_stop_after_the_fan_out_still_wins_before_the_send(
    tmp_path: Path, start_node: StartNode, twilio: FakeTwilio
) -> None:
    """The worker checks consent again just before each send: a delivery already queued (here
    waiting for a retry) is not sent once the user has said STOP."""
    cfg = node_config(tmp_path, channels=["sms"], sms=sms_config(provider(twilio)))
    node = await start_node(cfg)
    await node.user("ann", "security.alert", phone=PHONE)
    twilio.down = True
    event = await node.publish(topic="security.alert", priority="critical", payload={})
    await node.settled(event, "sms", {"undelivered"})
    await node.inbound("revoke", sender=PHONE)
    twilio.down = False
    row = await node.settled(event, "sms", {"suppressed"})
    assert row["reason"] == "legal_opt_out"
    assert not twilio.messages


@pytest.mark.parametrize(
    "text", ["opt out", "Opt-Out", "STOPALL", "unsubscribe", "Stop texting me"]
)
async def test_the_tcpa_revocation_words_opt_out(
    tmp_path: Path, start_node: StartNode, twilio: FakeTwilio, text: str
) -> None:
    node = await start_node(
        node_config(tmp_path, channels=["sms"], sms=sms_config(provider(twilio)))
    )
    await node.user("ann", phone=PHONE)
    code, _twiml = await node.inbound(text, sender=PHONE)
    assert code == 200
    state = (await node.ok("GET", "/users/ann/consent"))["channels"]["sms"]
    assert state["opted_in"] is False and state["legal"] is True


async def test_help_answers_who_sends_and_records_nothing(
    tmp_path: Path, start_node: StartNode, twilio: FakeTwilio
) -> None:
    sms = sms_config(
        provider(twilio), help_text="Acme alerts. 4 msgs/mo. Msg&data rates may apply."
    )
    node = await start_node(node_config(tmp_path, channels=["sms"], sms=sms))
    await node.user("ann", phone=PHONE)
    code, twiml = await node.inbound("help", sender=PHONE)
    assert code == 200
    assert "<Message>Acme alerts. 4 msgs/mo. Msg&amp;data rates may apply.</Message>" in twiml
    assert (await node.ok("GET", "/users/ann/consent"))["ledger"] == []
    code, twiml = await node.inbound("thanks!", sender=PHONE)
    assert code == 200 and "<Message>" not in twiml


async def test_an_unsigned_or_forged_inbound_text_is_refused_and_changes_nothing(
    tmp_path: Path, start_node: StartNode, twilio: FakeTwilio
) -> None:
    node = await start_node(
        node_config(tmp_path, channels=["sms"], sms=sms_config(provider(twilio)))
    )
    await node.user("ann", phone=PHONE)
    code, _ = await node.inbound("STOP", sender=PHONE, signed_with="not-the-token")
    assert code == 403
    code, _ = await node.inbound("STOP", sender=PHONE, account=BACKUP)  # not configured here
    assert code == 403
    assert (await node.ok("GET", "/users/ann/consent"))["ledger"] == []


async def test_an_invalid_number_is_dead_lettered_marked_and_not_tried_again(
    tmp_path: Path, start_node: StartNode, twilio: FakeTwilio
) -> None:
    node = await start_node(
        node_config(tmp_path, channels=["sms"], sms=sms_config(provider(twilio)))
    )
    twilio.invalid.add("+15005550001")
    await node.user("ann", "orders.shipped", phone="+15005550001")
    first = await node.publish(topic="orders.shipped", payload={})
    row = await node.settled(first, "sms", {"dead_lettered"})
    assert row["reason"] == "invalid_number"
    second = await node.publish(topic="orders.shipped", payload={})
    row = await node.settled(second, "sms", {"suppressed"})
    assert row["reason"] == "address_invalid" and "+15005550001" in row["detail"]
    assert len(twilio.requests) == 1
    # a new number starts clean
    await node.ok("PUT", "/users/ann", {"phone": PHONE})
    third = await node.publish(topic="orders.shipped", payload={})
    await node.settled(third, "sms", {"delivered"})


async def test_twilios_unsubscribed_recipient_becomes_a_legal_opt_out(
    tmp_path: Path, start_node: StartNode, twilio: FakeTwilio
) -> None:
    node = await start_node(
        node_config(tmp_path, channels=["sms"], sms=sms_config(provider(twilio)))
    )
    twilio.unsubscribed.add(PHONE)
    await node.user("ann", "orders.shipped", phone=PHONE)
    first = await node.publish(topic="orders.shipped", payload={})
    row = await node.settled(first, "sms", {"dead_lettered"})
    assert row["reason"] == "recipient_unsubscribed"
    state = (await node.ok("GET", "/users/ann/consent"))["channels"]["sms"]
    assert (state["opted_in"], state["legal"], state["source"]) == (
        False,
        True,
        "provider_unsubscribed",
    )
    second = await node.publish(topic="orders.shipped", payload={})
    assert (await node.settled(second, "sms", {"suppressed"}))["reason"] == "legal_opt_out"


async def test_failover_to_a_second_provider_and_back_after_a_probe(
    tmp_path: Path,
    start_node: StartNode,
    twilio: FakeTwilio,
    backup_twilio: FakeTwilio,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("WARNING", logger="herald.channels.failover")
    # a cool-down long enough that the four sends while the primary is down end inside it
    # even on a loaded machine (with 300 ms, a slow run saw a third probe of the primary)
    breaker = BreakerConfig(failure_threshold=2, open_ms=1500, max_open_ms=3000)
    sms = sms_config(provider(twilio), provider(backup_twilio, "backup"), breaker=breaker)
    node = await start_node(node_config(tmp_path, channels=["sms"], sms=sms))
    await node.user("ann", "orders.shipped", phone=PHONE)
    twilio.down = True
    for _ in range(4):
        event = await node.publish(topic="orders.shipped", payload={})
        await node.settled(event, "sms", {"delivered"})
    assert len(backup_twilio.messages) == 4
    assert len(twilio.requests) == 2  # then its breaker opened: no more requests to it
    _, text = await node.call("GET", "/metrics")  # inside the cool-down: still open
    assert 'herald_channel_breakers{channel="sms",state="open"} 1.0' in text
    assert 'herald_channel_breakers{channel="sms",state="closed"} 1.0' in text
    twilio.down = False
    await asyncio.sleep(1.55)  # the primary's cool-down
    for _ in range(3):
        event = await node.publish(topic="orders.shipped", payload={})
        await node.settled(event, "sms", {"delivered"})
    assert len(twilio.messages) == 3 and len(backup_twilio.messages) == 4
    moves = [r.getMessage() for r in caplog.records if "event=breaker_" in r.getMessage()]
    print("\n".join(moves))
    assert [m.split()[0] for m in moves] == [
        "event=breaker_open",
        "event=breaker_half_open",
        "event=breaker_closed",
    ]


async def test_a_stop_from_a_number_nobody_has_yet_binds_the_user_given_it_later(
    tmp_path: Path, start_node: StartNode, twilio: FakeTwilio
) -> None:
    """A STOP is kept by number: the user who gets that number afterwards (new, or an old user
    changing numbers) starts with a legal SMS opt-out; START from the number lifts it."""
    node = await start_node(
        node_config(tmp_path, channels=["sms"], sms=sms_config(provider(twilio)))
    )
    code, twiml = await node.inbound("STOP", sender=PHONE)
    assert code == 200 and "<Message>You are unsubscribed" in twiml
    await node.user("ann", "orders.shipped", phone=PHONE)
    await node.user("bob", "orders.shipped", phone="+14155550101")
    state = (await node.ok("GET", "/users/ann/consent"))["channels"]["sms"]
    assert state["opted_in"] is False and state["legal"] is True
    first = await node.publish(topic="orders.shipped", payload={})
    row = await node.settled(first, "sms", {"suppressed"}, user="ann")
    assert row["reason"] == "legal_opt_out"
    await node.settled(first, "sms", {"delivered"}, user="bob")
    await node.user("bob", "orders.shipped", phone=PHONE)  # bob takes the stopped number
    bob = (await node.ok("GET", "/users/bob/consent"))["channels"]["sms"]
    assert bob["opted_in"] is False and bob["legal"] is True
    assert twilio.sent_to(PHONE) == []

    code, _ = await node.inbound("START", sender=PHONE)
    assert code == 200
    await node.user("cid", "orders.shipped", phone=PHONE)  # after START: starts clean
    assert "sms" not in (await node.ok("GET", "/users/cid/consent"))["channels"]
    second = await node.publish(topic="orders.shipped", payload={})
    for user in ("ann", "bob", "cid"):
        await node.settled(second, "sms", {"delivered"}, user=user)
    assert len(twilio.sent_to(PHONE)) == 3


async def test_forged_inbound_texts_from_one_address_are_throttled_then_refused_unchecked(
    tmp_path: Path, start_node: StartNode, twilio: FakeTwilio
) -> None:
    """After admission.auth-failures-per-minute forged signatures an address is answered 429
    without a check, even with a good signature: the HMAC cannot be guessed at speed."""
    cfg = node_config(tmp_path, channels=["sms"], sms=sms_config(provider(twilio)))
    cfg = msgspec.structs.replace(
        cfg, admission=msgspec.structs.replace(cfg.admission, auth_failures_per_minute=3)
    )
    node = await start_node(cfg)
    await node.user("ann", phone=PHONE)
    codes = [(await node.inbound("STOP", sender=PHONE, signed_with="guess"))[0] for _ in range(5)]
    assert codes == [403, 403, 403, 429, 429]
    code, _ = await node.inbound("STOP", sender=PHONE)  # signed right, still throttled
    assert code == 429
    assert (await node.ok("GET", "/users/ann/consent"))["ledger"] == []


# ------------------------------------------------------------------ delivery receipts
PUBLIC = "https://herald.example.com/hooks/sms/status"


async def _receipts_node(
    tmp_path: Path, start_node: StartNode, twilio: FakeTwilio
) -> tuple[Any, str, str]:
    """A node asking for receipts at :data:`PUBLIC`, user ann (with :data:`PHONE`) sent one
    SMS; the event, and the StatusCallback URL Twilio was given with it."""
    sms = sms_config(provider(twilio), status_callback=PUBLIC)
    node = await start_node(node_config(tmp_path, channels=["sms"], sms=sms))
    await node.user("ann", "orders.shipped", phone=PHONE)
    event = await node.publish(topic="orders.shipped", users=["ann"], payload={})
    row = await node.settled(event, "sms", {"sent"})  # Twilio took it; a receipt will say
    assert f"provider_message_id={twilio.messages[-1].sid}" in row["detail"]
    callback = twilio.messages[-1].form["StatusCallback"]
    assert callback.startswith(PUBLIC + "?ref=")
    return node, event, callback


async def test_a_receipt_that_says_the_number_is_dead_invalidates_it(
    tmp_path: Path, start_node: StartNode, twilio: FakeTwilio
) -> None:
    node, event, callback = await _receipts_node(tmp_path, start_node, twilio)

    code, answer = await node.receipt(callback, "sent")
    assert (code, answer) == (200, {"status": "sent", "action": "none"})
    assert node.rows(event, "sms")[0]["status"] == "sent"  # an intermediate status: no change
    code, answer = await node.receipt(callback, "undelivered", code="30006")
    assert (code, answer) == (200, {"status": "undelivered", "action": "invalidated"})
    row = await node.settled(event, "sms", {"bounced"})
    assert row["reason"] == "invalid_number" and "30006" in row["detail"]
    assert [a["outcome"] for a in row["attempts"]] == ["sent"]
    log = (await node.ok("GET", "/users/ann/consent"))["contact_log"][-1]
    assert (log["kind"], log["source"], log["address"]) == (
        "invalidated",
        "status_callback",
        PHONE,
    )
    assert "30006" in log["detail"]
    code, text = await node.call("GET", "/metrics")
    assert code == 200
    assert 'herald_sms_receipts_total{action="invalidated",status="undelivered"} 1.0' in text
    assert 'herald_sms_receipts_total{action="none",status="sent"} 1.0' in text
    assert 'herald_channel_breakers{channel="sms",state="closed"} 1.0' in text
    assert 'herald_notify_delivery_seconds_count{channel="sms"} 1.0' in text

    later = await node.publish(topic="orders.shipped", users=["ann"], payload={})
    row = await node.settled(later, "sms", {"suppressed"})
    assert row["reason"] == "address_invalid"
    assert len(twilio.messages) == 1


async def test_carrier_filtering_is_noted_and_an_unsubscribed_receipt_is_a_legal_opt_out(
    tmp_path: Path, start_node: StartNode, twilio: FakeTwilio
) -> None:
    node, event, callback = await _receipts_node(tmp_path, start_node, twilio)

    code, answer = await node.receipt(callback, "failed", code="30007")
    assert (code, answer) == (200, {"status": "failed", "action": "noted"})
    assert (await node.settled(event, "sms", {"bounced"}))["reason"] == "carrier_filtered"
    consent = await node.ok("GET", "/users/ann/consent")
    assert consent["contact_log"][-1]["kind"] == "carrier_filtered"
    # a note only: the next message is still sent
    second = await node.publish(topic="orders.shipped", users=["ann"], payload={})
    await node.settled(second, "sms", {"sent"})

    code, answer = await node.receipt(callback, "undelivered", code="21610")
    assert (code, answer) == (200, {"status": "undelivered", "action": "opted_out"})
    for _ in range(300):  # the second bounce replaces the first once folded
        if node.rows(event, "sms")[0]["reason"] == "recipient_unsubscribed":
            break
        await asyncio.sleep(0.05)
    assert node.rows(event, "sms")[0]["reason"] == "recipient_unsubscribed"
    entry = (await node.ok("GET", "/users/ann/consent"))["ledger"][-1]
    assert (entry["channel"], entry["opted_in"], entry["legal"], entry["source"]) == (
        "sms",
        False,
        True,
        "provider_unsubscribed",
    )
    third = await node.publish(topic="orders.shipped", users=["ann"], payload={})
    row = await node.settled(third, "sms", {"suppressed"})
    assert row["reason"] == "legal_opt_out"
    assert len(twilio.messages) == 2


async def test_forged_foreign_or_stale_receipts_change_nothing(
    tmp_path: Path, start_node: StartNode, twilio: FakeTwilio
) -> None:
    node, event, callback = await _receipts_node(tmp_path, start_node, twilio)

    code, _ = await node.receipt(callback, "undelivered", code="30006", signed_with="wrong")
    assert code == 403
    code, _ = await node.receipt(callback, "undelivered", code="30006", account=BACKUP)
    assert code == 403  # an account this node does not send with
    forged = callback.replace("ref=", "ref=x", 1)
    code, answer = await node.receipt(forged, "undelivered", code="30006")
    assert code == 400 and answer["error"]["field"] == "ref"
    code, answer = await node.receipt(callback, "", code="30006")
    assert code == 400 and answer["error"]["field"] == "MessageStatus"

    # the user's number changed after the message went out: the old one's receipt is stale
    await node.ok("PUT", "/users/ann", {"phone": "+14155550177"})
    code, answer = await node.receipt(callback, "undelivered", code="30005")
    assert (code, answer) == (200, {"status": "undelivered", "action": "ignored"})
    assert (await node.settled(event, "sms", {"bounced"}))["reason"] == "invalid_number"
    later = await node.publish(topic="orders.shipped", users=["ann"], payload={})
    await node.settled(later, "sms", {"sent"})
    assert twilio.messages[-1].form["To"] == "+14155550177"
    consent = await node.ok("GET", "/users/ann/consent")
    assert all(e["kind"] != "invalidated" for e in consent["contact_log"])


async def test_a_delivered_receipt_turns_sent_into_delivered(
    tmp_path: Path, start_node: StartNode, twilio: FakeTwilio
) -> None:
    node, event, callback = await _receipts_node(tmp_path, start_node, twilio)
    code, answer = await node.receipt(callback, "delivered")
    assert (code, answer) == (200, {"status": "delivered", "action": "recorded"})
    row = await node.settled(event, "sms", {"delivered"})
    assert "twilio delivered" in row["detail"]
    assert [a["outcome"] for a in row["attempts"]] == ["sent"]  # the one send


async def test_without_a_status_callback_no_receipts_are_asked_for_or_taken(
    tmp_path: Path, start_node: StartNode, twilio: FakeTwilio
) -> None:
    node = await start_node(
        node_config(tmp_path, channels=["sms"], sms=sms_config(provider(twilio)))
    )
    await node.user("ann", "orders.shipped", phone=PHONE)
    event = await node.publish(topic="orders.shipped", users=["ann"], payload={})
    await node.settled(event, "sms", {"delivered"})
    assert "StatusCallback" not in twilio.messages[-1].form
    code, _ = await node.receipt(f"{PUBLIC}?ref=abc", "undelivered", code="30006")
    assert code == 404

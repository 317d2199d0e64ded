"""The pure parts of the SMS and push channels: Twilio's signature (against Twilio's own
published vectors), keywords, answer classification for Twilio, APNs and FCM, the token
bucket, the provider chain, and how several devices' answers make one outcome."""

from __future__ import annotations

import json

import httpx
import msgspec
import pytest

from channels import apns, fcm, twilio
from channels.base import Delivered, Delivery, Outcome, Permanent, PushDevice, Retry
from channels.config import BreakerConfig
from channels.failover import Attempt, ProviderChain
from channels.push import combine
from channels.ratelimit import TokenBucket

URL = "https://mycompany.com/myapp.php?foo=1&bar=2"


def doc_params(caller: str) -> list[tuple[str, str]]:
    return [
        ("CallSid", "CA1234567890ABCDE"),
        ("Caller", caller),
        ("Digits", "1234"),
        ("From", caller),
        ("To", "+18005551212"),
    ]


# ------------------------------------------------------------------------------ Twilio
@pytest.mark.parametrize(
    ("caller", "expected"),
    [
        ("+14158675310", "GvWf1cFY/Q7PnoempGyD5oXAezc="),  # Twilio's security docs
        ("+14158675309", "RSOYDt4T1cUTdK1PDd93/VVr8B8="),  # twilio-node's test fixture
    ],
)
def test_the_signature_matches_twilios_published_vectors(caller: str, expected: str) -> None:
    params = doc_params(caller)
    assert twilio.signature("12345", URL, params) == expected
    assert twilio.signature("12345", URL, list(reversed(params))) == expected  # order-free
    assert twilio.signature_ok("12345", URL, params, expected)
    assert not twilio.signature_ok("12345", URL + "&x=1", params, expected)
    assert not twilio.signature_ok("54321", URL, params, expected)
    assert not twilio.signature_ok("12345", URL, params, None)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("STOP", "stop"),
        ("stop", "stop"),
        (" Stop. ", "stop"),
        ("STOPALL", "stop"),
        ("stop all", "stop"),
        ("Unsubscribe", "stop"),
        ("CANCEL", "stop"),
        ("end", "stop"),
        ("QUIT", "stop"),
        ("revoke", "stop"),
        ("opt out", "stop"),
        ("Opt-Out", "stop"),
        ("OPTOUT", "stop"),
        ("please stop", "stop"),
        ("Stop texting me!", "stop"),
        ("START", "start"),
        ("yes", "start"),
        ("unstop", "start"),
        ("HELP", "help"),
        ("info", "help"),
        ("hello", None),
        ("the end of the film", None),
        ("cancel my order", None),
        ("", None),
    ],
)
def test_keywords(text: str, kind: str | None) -> None:
    assert twilio.keyword(text) == kind


def test_twiml_escapes_the_reply() -> None:
    assert twilio.twiml_message("Rates <may> apply & more") == (
        b'<?xml version="1.0" encoding="UTF-8"?><Response><Message>'
        b"Rates &lt;may&gt; apply &amp; more</Message></Response>"
    )
    assert twilio.twiml_message(None).endswith(b"<Response></Response>")


def _tw(
    status: int, doc: dict[str, object], retry_after: str | None = None
) -> tuple[Outcome, str, bool]:
    return twilio.classify(status, json.dumps(doc).encode(), retry_after, now=0.0, cap_s=600.0)


@pytest.mark.parametrize(
    ("status", "doc", "kind", "reason", "invalidates", "health", "failover"),
    [
        (201, {"sid": "SM1", "status": "queued"}, Delivered, None, None, "success", False),
        (
            400,
            {"code": 21211, "message": "invalid"},
            Permanent,
            "invalid_number",
            "address",
            "success",
            False,
        ),
        (
            400,
            {"code": 21614, "message": "not mobile"},
            Permanent,
            "invalid_number",
            "address",
            "success",
            False,
        ),
        (
            400,
            {"code": 21610, "message": "unsubscribed"},
            Permanent,
            "recipient_unsubscribed",
            "consent",
            "success",
            False,
        ),
        (
            400,
            {"code": 21408, "message": "region"},
            Permanent,
            "twilio_21408",
            None,
            "success",
            False,
        ),
        (401, {"code": 20003}, Retry, "auth_failed", None, "failure", True),
        (404, {"code": 20404}, Retry, "http_404", None, "failure", True),
        (429, {"code": 20429}, Retry, "http_429", None, "failure", True),
        (503, {}, Retry, "http_503", None, "failure", True),
    ],
)
def test_twilio_answers(
    status: int,
    doc: dict[str, object],
    kind: type,
    reason: str | None,
    invalidates: str | None,
    health: str,
    failover: bool,
) -> None:
    outcome, got_health, got_failover = _tw(status, doc, "5")
    assert type(outcome) is kind
    assert getattr(outcome, "reason", None) == reason
    assert getattr(outcome, "invalidates", None) == invalidates
    assert (got_health, got_failover) == (health, failover)
    if isinstance(outcome, Delivered):
        assert outcome.provider_message_id == "SM1"
    if status in (429, 503):
        assert isinstance(outcome, Retry) and outcome.after_s == 5.0


def test_a_twilio_answer_that_is_not_json_is_still_classified() -> None:
    outcome, health, _ = twilio.classify(502, b"<html>bad gateway", None, now=0, cap_s=1)
    assert isinstance(outcome, Retry) and health == "failure"


# -------------------------------------------------------------------------------- APNs
def _apns(status: int, reason: str = "", headers: dict[str, str] | None = None) -> Outcome:
    body = json.dumps({"reason": reason}).encode() if reason else b""
    outcome, _h, _f = apns.classify(
        status, body, httpx.Headers(headers or {}), now=0.0, cap_s=600.0
    )
    return outcome


def test_apns_answers() -> None:
    ok = _apns(200, headers={"apns-id": "1B2C"})
    assert isinstance(ok, Delivered) and ok.provider_message_id == "1B2C"
    for status, reason, code in [
        (410, "Unregistered", "unregistered"),
        (410, "ExpiredToken", "unregistered"),
        (400, "BadDeviceToken", "bad_device_token"),
        (400, "DeviceTokenNotForTopic", "token_not_for_topic"),
    ]:
        out = _apns(status, reason)
        assert isinstance(out, Permanent) and (out.reason, out.invalidates) == (code, "token")
    bad = _apns(400, "BadCollapseId")
    assert isinstance(bad, Permanent) and bad.invalidates is None
    assert isinstance(_apns(413, "PayloadTooLarge"), Permanent)
    busy = _apns(429, "TooManyRequests", {"retry-after": "7"})
    assert isinstance(busy, Retry) and busy.after_s == 7.0
    assert isinstance(_apns(503, "ServiceUnavailable"), Retry)
    assert isinstance(_apns(403, "InvalidProviderToken"), Retry)


def _delivery(**kw: object) -> Delivery:
    fields: dict[str, object] = {
        "delivery_id": "d-1",
        "tenant": "t",
        "user": "u",
        "topic": "t.x",
        "event_id": "e-1",
        "created_ms": 0,
    }
    fields.update(kw)
    return Delivery(**fields)  # type: ignore[arg-type]


def test_the_apns_payload_stays_within_4096_bytes() -> None:
    big = msgspec.Raw(json.dumps({"blob": "x" * 5000}).encode())
    payload = apns.payload(_delivery(payload=big), "Title", "b" * 5000, "alert")
    assert len(payload) <= apns.MAX_PAYLOAD
    doc = json.loads(payload)
    assert "data" not in doc["herald"] and doc["aps"]["alert"]["body"].endswith("…")
    small = json.loads(apns.payload(_delivery(), "T", "B", "background"))
    assert small["aps"] == {"content-available": 1}


def test_apns_priority_and_id() -> None:
    assert apns.priority(_delivery(priority="critical"), "alert") == "10"
    assert apns.priority(_delivery(priority="normal"), "alert") == "5"
    assert apns.priority(_delivery(priority="critical"), "background") == "5"
    assert apns.apns_id("d-1") == apns.apns_id("d-1") != apns.apns_id("d-2")


# --------------------------------------------------------------------------------- FCM
def _fcm(status: int, code: str = "", fcm_code: str = "", field: str = "") -> Outcome:
    details: list[dict[str, object]] = []
    if fcm_code:
        details.append(
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": fcm_code}
        )
    if field:
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": field}],
            }
        )
    body = json.dumps(
        {"error": {"code": status, "message": "m", "status": code, "details": details}}
    )
    outcome, _h, _f = fcm.classify(status, body.encode(), "2", now=0, cap_s=600, min_quota_s=60)
    return outcome


def test_fcm_answers() -> None:
    ok, _h, _f = fcm.classify(
        200, b'{"name": "projects/p/messages/1"}', None, now=0, cap_s=1, min_quota_s=60
    )
    assert isinstance(ok, Delivered) and ok.provider_message_id == "projects/p/messages/1"
    gone = _fcm(404, "NOT_FOUND", "UNREGISTERED")
    assert isinstance(gone, Permanent) and (gone.reason, gone.invalidates) == (
        "unregistered",
        "token",
    )
    bad_token = _fcm(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", "message.token")
    assert isinstance(bad_token, Permanent) and bad_token.invalidates == "token"
    bad_payload = _fcm(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", "message.data")
    assert isinstance(bad_payload, Permanent) and bad_payload.invalidates is None
    other_project = _fcm(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH")
    assert isinstance(other_project, Permanent) and other_project.invalidates == "token"
    quota = _fcm(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED")
    assert isinstance(quota, Retry) and quota.after_s == 60.0
    down = _fcm(503, "UNAVAILABLE", "UNAVAILABLE")
    assert isinstance(down, Retry) and down.after_s == 2.0
    assert isinstance(_fcm(401, "UNAUTHENTICATED"), Retry)


# ------------------------------------------------------------------------ token bucket
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_token_bucket_books_waits_in_order_and_refills_at_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(2.0, 2, clock)
    assert [bucket.reserve() for _ in range(4)] == [0.0, 0.0, 0.5, 1.0]
    bucket.refund()  # the last caller gave up
    clock.now = 0.5
    assert bucket.level == pytest.approx(0.0)
    clock.now = 10
    assert bucket.level == 2.0  # never more than the burst
    with pytest.raises(ValueError):
        TokenBucket(0, 1, clock)


# ---------------------------------------------------------------------- provider chain
async def test_the_chain_fails_over_only_when_the_message_was_not_taken() -> None:
    clock = Clock()
    chain: ProviderChain[str] = ProviderChain(
        "sms", [("a", "a"), ("b", "b")], BreakerConfig(failure_threshold=1, open_ms=1000), clock
    )
    tried: list[str] = []

    async def refused(p: str) -> Attempt:
        tried.append(p)
        if p == "a":
            return Attempt(Outcome.retry(None, "http_503"), "failure", failover=True)
        return Attempt(Outcome.delivered("id-b"), "success")

    assert isinstance(await chain.send(refused), Delivered)
    assert tried == ["a", "b"] and chain.states() == {"a": "open", "b": "closed"}

    clock.now = 2  # a's cool-down over: it gets the probe, times out, and b is not tried
    tried.clear()

    async def timed_out(p: str) -> Attempt:
        tried.append(p)
        return Attempt(Outcome.retry(None, "timeout"), "failure", failover=False)

    outcome = await chain.send(timed_out)
    assert isinstance(outcome, Retry) and outcome.reason == "timeout" and tried == ["a"]


# ------------------------------------------------------------------------ many devices
def test_several_devices_make_one_outcome() -> None:
    a, b = PushDevice(token="a", platform="apns"), PushDevice(token="b", platform="fcm")
    dead = Outcome.permanent("unregistered", "token")
    later = Outcome.retry(30, "http_503")
    got = combine([(a, Outcome.delivered("x")), (b, dead)])
    assert isinstance(got, Delivered) and got.dead_tokens == ("b",)
    retry = combine([(a, later), (b, dead)])
    assert isinstance(retry, Retry) and retry.after_s == 30 and retry.dead_tokens == ("b",)
    gone = combine([(a, dead), (b, dead)])
    assert isinstance(gone, Permanent) and gone.invalidates == "token"
    assert gone.dead_tokens == ("a", "b")
    mixed = combine([(a, dead), (b, Outcome.permanent("fcm_invalid_argument"))])
    assert isinstance(mixed, Permanent) and mixed.invalidates is None

"""Standard Webhooks signatures, checked by the ``standardwebhooks`` package (a verifier nobody
here wrote) and by the spec's published example."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks import Webhook, WebhookVerificationError

from channels import signing
from channels.errors import InvalidSecret, SignatureError

# The example of the Standard Webhooks documentation (and Svix's): secret, id, timestamp, body
# and the signature they publish for them.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signature_matches_the_spec_example() -> None:
    key = signing.decode_secret(SPEC_SECRET)
    assert signing.sign(key, SPEC_ID, SPEC_TS, SPEC_BODY) == SPEC_SIGNATURE


def test_generated_secret_is_whsec_base64_of_32_random_bytes() -> None:
    a, b = signing.generate_secret(), signing.generate_secret()
    assert a.startswith("whsec_") and a != b
    assert len(base64.b64decode(a.removeprefix("whsec_"))) == 32
    assert len(signing.decode_secret(signing.generate_secret(64))) == 64
    with pytest.raises(InvalidSecret):
        signing.generate_secret(16)


@pytest.mark.parametrize(
    "secret",
    [
        "whsec_",
        "whsec_!!!notbase64",
        "whsec_" + base64.b64encode(b"x" * 23).decode(),
        "whsec_" + base64.b64encode(b"x" * 65).decode(),
    ],
)
def test_bad_secrets_are_refused(secret: str) -> None:
    with pytest.raises(InvalidSecret):
        signing.decode_secret(secret)


def test_unprefixed_and_unpadded_secrets_decode_like_the_reference_library() -> None:
    key = b"k" * 25  # base64 of 25 bytes ends in "="
    text = base64.b64encode(key).decode()
    assert text.endswith("=")
    assert signing.decode_secret(text) == key
    assert signing.decode_secret("whsec_" + text.rstrip("=")) == key


@settings(max_examples=200, deadline=None)
@given(
    key=st.binary(min_size=24, max_size=64),
    msg_id=st.text(st.characters(codec="ascii", exclude_characters=" \r\n"), min_size=1),
    body=st.binary(max_size=2048),
)
def test_standardwebhooks_verifies_every_signature_we_make(
    key: bytes, msg_id: str, body: bytes
) -> None:
    secret = signing.encode_secret(key)
    now = int(time.time())
    headers = signing.webhook_headers([key], msg_id, now, body)
    Webhook(secret).verify(body, headers, json_parse=False)  # raises if not
    assert signing.verify(body, headers, [secret], now=now) == msg_id


def test_a_rotated_secret_puts_one_signature_per_secret_and_each_verifies() -> None:
    old, new, other = (signing.generate_secret() for _ in range(3))
    body, now = b'{"type":"t"}', int(time.time())
    keys = [signing.decode_secret(new), signing.decode_secret(old)]
    headers = signing.webhook_headers(keys, "d-1", now, body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(new).verify(body, headers)
    Webhook(old).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)
    assert signing.verify(body, headers, [other, old], now=now) == "d-1"
    with pytest.raises(SignatureError, match="no webhook-signature"):
        signing.verify(body, headers, [other], now=now)


def test_our_signature_equals_the_reference_librarys() -> None:
    secret = signing.generate_secret()
    ts = 1_700_000_000
    ours = signing.sign(signing.decode_secret(secret), "id-1", ts, b"{}")
    theirs = Webhook(secret).sign("id-1", datetime.fromtimestamp(ts, tz=UTC), b"{}")
    assert ours == theirs


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h, b: (h, b + b" "), "no webhook-signature"),
        (lambda h, b: ({**h, "webhook-id": "other"}, b), "no webhook-signature"),
        (lambda h, b: ({k: v for k, v in h.items() if k != "webhook-id"}, b), "missing"),
        (lambda h, b: ({**h, "webhook-timestamp": "12.5"}, b), "integer seconds"),
        (lambda h, b: ({**h, "webhook-signature": "v1a,abc"}, b), "no webhook-signature"),
    ],
)
def test_verify_refuses_tampering(change: object, message: str) -> None:
    secret = signing.generate_secret()
    now = int(time.time())
    body = b'{"a":1}'
    headers = signing.webhook_headers([signing.decode_secret(secret)], "m", now, body)
    h, b = change(headers, body)  # type: ignore[operator]
    with pytest.raises(SignatureError, match=message):
        signing.verify(b, h, [secret], now=now)


def test_verify_refuses_a_timestamp_outside_the_tolerance() -> None:
    secret = signing.generate_secret()
    key = signing.decode_secret(secret)
    for ts in (1000 - 301, 1000 + 301):
        headers = signing.webhook_headers([key], "m", ts, b"{}")
        with pytest.raises(SignatureError, match="outside"):
            signing.verify(b"{}", headers, [secret], now=1000)
    headers = signing.webhook_headers([key], "m", 1000 - 300, b"{}")
    assert signing.verify(b"{}", headers, [secret], now=1000) == "m"

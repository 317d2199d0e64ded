"""Twilio's wire format, pure: the request to send, the answer's meaning, inbound checks.

Sending (`Messages resource`_)::

    POST <base>/2010-04-01/Accounts/<AccountSid>/Messages.json
    Authorization: Basic base64(<AccountSid or API key SID>:<auth token or key secret>)
    Content-Type: application/x-www-form-urlencoded

    To=%2B14155550100&From=%2B14155550199&Body=...[&MessagingServiceSid=MG...][&StatusCallback=...]

answered ``201`` with JSON whose ``sid`` (``SM...``) is the message's id, or an error JSON
``{"code": 21211, "message": "...", "more_info": "...", "status": 400}``.

Answers to outcomes (:func:`classify`):

=================================  ==========================================  ========  ========
answer                             outcome                                     health    failover
=================================  ==========================================  ========  ========
2xx                                delivered, ``sid`` as provider message id   success   -
400 code 21211, 21614, 21217       permanent ``invalid_number``, invalidates   success   no
                                   the phone number (``address``)
400 code 21610                     permanent ``recipient_unsubscribed``,       success   no
                                   invalidates ``consent`` (a STOP at Twilio)
401, 403, 404                      retry ``auth_failed`` / ``http_404``: our   failure   yes
                                   credentials or account are wrong there
429 (code 20429), 5xx              retry after Retry-After (capped)            failure   yes
other 4xx                          permanent ``twilio_<code>`` (or http_...)   success   no
=================================  ==========================================  ========  ========

Inbound messages arrive as a form POST signed with ``X-Twilio-Signature``: base64 of
HMAC-SHA1, keyed with the auth token, over the full URL Twilio posted to followed by each
POST parameter's name and value, sorted by name (`Webhooks security`_).

.. _Messages resource: https://www.twilio.com/docs/messaging/api/message-resource
.. _Webhooks security: https://www.twilio.com/docs/usage/webhooks/webhooks-security
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import urllib.parse
from collections.abc import Iterable
from typing import Literal

import msgspec

from channels.base import Outcome
from channels.responses import Health, parse_retry_after

INVALID_NUMBER_CODES = frozenset({21211, 21614, 21217})
"""21211 invalid 'To' phone number; 21614 'To' is not a valid mobile number; 21217 phone
number does not appear to be valid."""

UNSUBSCRIBED_CODE = 21610
"""Attempt to send to an unsubscribed recipient (the number replied STOP to this sender)."""


class TwilioAnswer(msgspec.Struct):
    """The fields of Twilio's answer that matter here (message or error)."""

    sid: str | None = None
    status: str | int | None = None
    code: int | None = None
    message: str | None = None


_decode_answer = msgspec.json.Decoder(TwilioAnswer).decode


def messages_path(account_sid: str) -> str:
    return f"/2010-04-01/Accounts/{account_sid}/Messages.json"


def basic_auth(user: str, password: str) -> str:
    """The ``Authorization`` value for HTTP basic auth (RFC 7617)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def with_ref(url: str, ref: str | None) -> str:
    """``url`` with ``ref`` added to its query (the recipient a status callback is about)."""
    if not url or not ref:
        return url
    return f"{url}{'&' if '?' in url else '?'}ref={urllib.parse.quote(ref, safe='')}"


def message_form(
    to: str,
    body: str,
    *,
    sender: str = "",
    messaging_service_sid: str = "",
    status_callback: str = "",
) -> dict[str, str]:
    """The form fields of one send (``MessagingServiceSid`` wins over ``From`` when set)."""
    form = {"To": to, "Body": body}
    if messaging_service_sid:
        form["MessagingServiceSid"] = messaging_service_sid
    else:
        form["From"] = sender
    if status_callback:
        form["StatusCallback"] = status_callback
    return form


def parse_answer(body: bytes) -> TwilioAnswer:
    try:
        return _decode_answer(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return TwilioAnswer()


def classify(
    status: int, body: bytes, retry_after: str | None, *, now: float, cap_s: float
) -> tuple[Outcome, Health, bool]:
    """(outcome, health, failover) for one answer; see the module docstring's table."""
    answer = parse_answer(body)
    detail = f"HTTP {status}"
    if answer.code is not None:
        detail += f" code {answer.code}"
    if answer.message:
        detail += f": {' '.join(answer.message.split())[:200]}"
    if 200 <= status < 300:
        return (
            Outcome.delivered(answer.sid, detail=f"HTTP {status} {answer.status or ''}"),
            ("success"),
            False,
        )
    if status == 429 or status >= 500:
        after = parse_retry_after(retry_after, now=now, cap_s=cap_s)
        return Outcome.retry(after, f"http_{status}", detail=detail), "failure", True
    if status in (401, 403):
        return Outcome.retry(None, "auth_failed", detail=detail), "failure", True
    if status == 404:
        return Outcome.retry(None, "http_404", detail=detail), "failure", True
    if answer.code in INVALID_NUMBER_CODES:
        return Outcome.permanent("invalid_number", "address", detail=detail), "success", False
    if answer.code == UNSUBSCRIBED_CODE:
        return (
            Outcome.permanent("recipient_unsubscribed", "consent", detail=detail),
            "success",
            False,
        )
    if 400 <= status < 500:
        reason = f"twilio_{answer.code}" if answer.code is not None else f"http_{status}"
        return Outcome.permanent(reason, None, detail=detail), "success", False
    return Outcome.retry(None, f"http_{status}", detail=detail), "failure", True


# --------------------------------------------------------------------------- inbound
def signature(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """``X-Twilio-Signature`` for a form POST of ``params`` to ``url``."""
    data = url + "".join(k + v for k, v in sorted(params, key=lambda kv: kv[0]))
    mac = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode()


def signature_ok(
    auth_token: str, url: str, params: Iterable[tuple[str, str]], given: str | None
) -> bool:
    """Whether ``given`` is the signature of this request (constant-time compare)."""
    if not given:
        return False
    return hmac.compare_digest(signature(auth_token, url, list(params)), given)


Keyword = Literal["stop", "start", "help"]

# Twilio's single-word opt-out keywords, plus the words FCC 24-24 names as revoking consent
# per se ("revoke", "opt out"); matched on the whole message, case, spacing and punctuation
# ignored ("Stop.", " STOP ", "opt-out" all count).
STOP_WORDS = frozenset(
    {
        "stop",
        "stopall",
        "stop all",
        "unsubscribe",
        "cancel",
        "end",
        "quit",
        "revoke",
        "opt out",
        "optout",
    }
)
START_WORDS = frozenset({"start", "yes", "unstop"})
HELP_WORDS = frozenset({"help", "info"})
# "Stop texting me", "please stop", "STOP!!!": a reply that says stop in so many words is a
# reasonable way to revoke (FCC 24-24), not only the bare keyword.
_STOP_PHRASE = re.compile(r"^(?:please )?(?:stop|unsubscribe|opt out|revoke)(?: .*)?$|^.* stop$")
_NON_WORD = re.compile(r"[^\w]+")


def keyword(body: str) -> Keyword | None:
    """What an inbound text asks for: ``stop``, ``start``, ``help`` or None (anything else)."""
    text = " ".join(_NON_WORD.sub(" ", body.replace("-", " ").casefold()).split())
    if text in STOP_WORDS or _STOP_PHRASE.match(text):
        return "stop"
    if text in START_WORDS:
        return "start"
    if text in HELP_WORDS:
        return "help"
    return None


def twiml_message(text: str | None) -> bytes:
    """A TwiML answer replying ``text`` to the sender (None: an empty answer, no reply)."""
    if text is None:
        return b'<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
    escaped = (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><Response><Message>{escaped}</Message></Response>'
    ).encode()

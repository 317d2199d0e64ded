"""The SMS channel: Twilio's REST API (:mod:`channels.twilio`), failover across providers,
a token bucket per sender.

Per send: the delivery's phone number (:class:`~channels.base.SmsAddress`) and text (the
core's rendered :class:`~channels.base.SmsContent`) go to the first provider whose breaker
admits it (:mod:`channels.failover`); that provider's sender waits for a token of its bucket
(at most ``rate-wait-ms``, else ``retry(rate_limited)``), then one form POST. The answer maps
to an outcome by :func:`channels.twilio.classify`: an invalid number is permanent and marks
the phone number dead; 21610 (the number sent STOP to this sender) is permanent and records a
legal opt-out; 429 and 5xx retry after Retry-After, and fail over to the next provider.

Twilio has no idempotency key for sends, so a timeout after the request left is a retry on
the same provider, later (the message may be sent twice; never to a second provider at once).

One ``aiohttp.ClientSession`` for all providers (keep-alive connections to each), no cookies,
no proxy from the environment.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable

import aiohttp
import msgspec

from channels.base import Delivered, Delivery, Outcome, SmsAddress, SmsContent
from channels.config import SmsConfig, TwilioProvider
from channels.errors import ChannelClosed
from channels.failover import Attempt, ProviderChain
from channels.ratelimit import TokenBucket
from channels.twilio import basic_auth, classify, message_form, messages_path, with_ref

_MAX_ANSWER = 65_536


class _Sender:
    """One provider as the chain sees it: its settings and its sender's token bucket."""

    __slots__ = ("authorization", "bucket", "config", "url")

    def __init__(self, config: TwilioProvider, monotonic: Callable[[], float]) -> None:
        self.config = config
        self.url = config.url.rstrip("/") + messages_path(config.account_sid)
        self.authorization = basic_auth(config.api_key_sid or config.account_sid, config.auth_token)
        self.bucket = TokenBucket(config.rate_per_s, config.burst, monotonic)


def sms_text(delivery: Delivery) -> str:
    """The text to send: the rendered SMS content; without one (an engine run without
    templates), the event's ``text`` field, else the topic."""
    if isinstance(delivery.content, SmsContent) and delivery.content.text:
        return delivery.content.text
    try:
        data = msgspec.json.decode(bytes(delivery.payload))
    except msgspec.DecodeError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("text"), str) and data["text"]:
        return str(data["text"])
    return delivery.topic


class SmsChannel:
    """See the module docstring. ``clock`` is wall-clock seconds (Retry-After dates);
    ``monotonic`` drives the breakers and the token buckets."""

    name = "sms"

    def __init__(
        self,
        config: SmsConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = cfg = config or SmsConfig()
        self._clock = clock
        self._monotonic = monotonic
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self.chain: ProviderChain[_Sender] = ProviderChain(
            "sms",
            [(p.name, _Sender(p, monotonic)) for p in cfg.providers],
            cfg.breaker,
            monotonic,
        )
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _open_session(self) -> aiohttp.ClientSession:
        cfg = self.config
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, ssl=self._ssl),
            timeout=aiohttp.ClientTimeout(
                total=cfg.timeout_ms / 1000, sock_connect=cfg.connect_timeout_ms / 1000
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    def breaker_states(self) -> list[str]:
        return self.chain.breaker_states()

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def send(self, delivery: Delivery) -> Outcome:
        if self._closed:
            raise ChannelClosed("the sms channel is closed")
        address = delivery.address
        if not isinstance(address, SmsAddress):
            return Outcome.permanent("no_phone", None, detail="the user has no phone number")
        text = sms_text(delivery)

        callback = with_ref(self.config.status_callback, address.ref)

        async def attempt(sender: _Sender) -> Attempt:
            return await self._post(sender, address.to, text, callback)

        outcome = await self.chain.send(attempt)
        if isinstance(outcome, Delivered) and address.ref and self.config.status_callback:
            # its receipt will come back naming this delivery: "sent" until then
            outcome = msgspec.structs.replace(outcome, awaiting_receipt=True)
        return outcome

    async def _post(self, sender: _Sender, to: str, text: str, callback: str) -> Attempt:
        wait = sender.bucket.reserve()
        if wait > self.config.rate_wait_ms / 1000:
            sender.bucket.refund()
            detail = f"sender {sender.config.name} is at {sender.config.rate_per_s}/s"
            return Attempt(Outcome.retry(wait, "rate_limited", detail=detail), "unknown")
        if wait > 0:
            try:
                await asyncio.sleep(wait)
            except asyncio.CancelledError:
                sender.bucket.refund()
                raise
        session = self._session
        if session is None:
            session = self._session = self._open_session()
        p = sender.config
        form = message_form(
            to,
            text,
            sender=p.sender,
            messaging_service_sid=p.messaging_service_sid,
            status_callback=callback,
        )
        try:
            async with session.post(
                sender.url,
                data=form,
                headers={"Authorization": sender.authorization},
                allow_redirects=False,
            ) as resp:
                body = await resp.content.read(_MAX_ANSWER)
                outcome, health, failover = classify(
                    resp.status,
                    body,
                    resp.headers.get("Retry-After"),
                    now=self._clock(),
                    cap_s=self.config.max_retry_after_ms / 1000,
                )
                return Attempt(outcome, health, failover)
        except aiohttp.ClientConnectorError as exc:
            detail = _short(exc)
            return Attempt(Outcome.retry(None, "connect_error", detail=detail), "failure", True)
        except aiohttp.ConnectionTimeoutError as exc:
            detail = _short(exc)
            return Attempt(Outcome.retry(None, "connect_timeout", detail=detail), "failure", True)
        except TimeoutError:
            detail = f"no answer within {self.config.timeout_ms} ms"
            return Attempt(Outcome.retry(None, "timeout", detail=detail), "failure")
        except aiohttp.ClientError as exc:
            return Attempt(Outcome.retry(None, "connection_lost", detail=_short(exc)), "failure")


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:200]

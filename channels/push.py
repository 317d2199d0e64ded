"""The push channel: one notification to each of a user's devices, through APNs or FCM.

A delivery's address (:class:`~channels.base.PushAddress`) lists the user's devices not
found dead, each with its platform; each device gets one request, concurrently, through its
platform's failover chain (``[channels.apns] urls``, ``[channels.fcm] urls``: each host
behind its own breaker, :mod:`channels.failover`). The title and body are the core's
rendered :class:`~channels.base.PushContent` (without one: the topic, and the event's
``body`` or ``text`` field).

The devices' answers make one outcome:

- any device delivered: :class:`~channels.base.Delivered` (the provider ids joined by
  ``,``). A device that had to be retried is not: the user has been notified, and retrying
  would notify the other devices twice;
- none delivered, one to retry: :class:`~channels.base.Retry` (the shortest wait asked);
- all permanent: :class:`~channels.base.Permanent` with the first reason; ``invalidates``
  is ``token`` when every device's token is dead.

Whatever the outcome, ``dead_tokens`` lists every token APNs or FCM declared dead (410
Unregistered, BadDeviceToken, UNREGISTERED, INVALID_ARGUMENT on the token): the core marks
each device invalid.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable

import msgspec

from channels.apns import ApnsClient, ApnsHost
from channels.base import (
    Delivered,
    Delivery,
    Outcome,
    Permanent,
    PushAddress,
    PushContent,
    PushDevice,
    Retry,
)
from channels.config import ApnsConfig, FcmConfig
from channels.errors import ChannelClosed
from channels.failover import Attempt, ProviderChain
from channels.fcm import FcmClient, FcmEndpoint
from channels.push_auth import ApnsTokens, OAuthTokens, load_service_account


def push_text(delivery: Delivery) -> tuple[str, str]:
    """(title, body): the rendered push content, else the topic and the event's text."""
    if isinstance(delivery.content, PushContent):
        return delivery.content.title, delivery.content.body
    try:
        data = msgspec.json.decode(bytes(delivery.payload))
    except msgspec.DecodeError:
        data = None
    text = ""
    if isinstance(data, dict):
        for key in ("body", "text"):
            if isinstance(data.get(key), str):
                text = str(data[key])
                break
    return delivery.topic, text


class PushChannel:
    """See the module docstring. Reads the APNs key and the service account file when made
    (a missing file is a start-up error, not a failed delivery)."""

    name = "push"

    def __init__(
        self,
        apns: ApnsConfig | None = None,
        fcm: FcmConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.apns_config = acfg = apns or ApnsConfig()
        self.fcm_config = fcfg = fcm or FcmConfig()
        self.apns: ApnsClient | None = None
        self.fcm: FcmClient | None = None
        hosts: list[tuple[str, ApnsHost]] = []
        endpoints: list[tuple[str, FcmEndpoint]] = []
        if acfg.key_file:
            tokens = ApnsTokens.from_file(
                acfg.key_file, acfg.key_id, acfg.team_id, acfg.token_refresh_ms / 1000, clock
            )
            self.apns = ApnsClient(acfg, tokens, clock=clock, ssl_context=ssl_context)
            hosts = [(url, ApnsHost(url)) for url in acfg.urls]
        if fcfg.service_account_file:
            account = load_service_account(fcfg.service_account_file)
            oauth = OAuthTokens(
                account,
                scope=fcfg.scope,
                token_uri=fcfg.token_uri,
                margin_s=fcfg.token_margin_ms / 1000,
                timeout_s=fcfg.timeout_ms / 1000,
                clock=clock,
            )
            self.fcm = FcmClient(fcfg, oauth, clock=clock)
            project = fcfg.project_id or account.project_id
            endpoints = [(url, FcmEndpoint(url, project)) for url in fcfg.urls]
        self.apns_chain: ProviderChain[ApnsHost] = ProviderChain(
            "push.apns", hosts, acfg.breaker, monotonic
        )
        self.fcm_chain: ProviderChain[FcmEndpoint] = ProviderChain(
            "push.fcm", endpoints, fcfg.breaker, monotonic
        )
        self._closed = False

    def breaker_states(self) -> list[str]:
        return self.apns_chain.breaker_states() + self.fcm_chain.breaker_states()

    async def close(self) -> None:
        self._closed = True
        for client in (self.apns, self.fcm):
            if client is not None:
                await client.close()

    async def send(self, delivery: Delivery) -> Outcome:
        if self._closed:
            raise ChannelClosed("the push channel is closed")
        address = delivery.address
        if not isinstance(address, PushAddress) or not address.devices:
            return Outcome.permanent("no_device", None, detail="the user has no push device")
        title, body = push_text(delivery)
        outcomes = await asyncio.gather(
            *(self._one(delivery, device, title, body) for device in address.devices)
        )
        return combine(list(zip(address.devices, outcomes, strict=True)))

    async def _one(self, delivery: Delivery, device: PushDevice, title: str, body: str) -> Outcome:
        if device.platform == "apns":
            apns = self.apns

            async def to_apns(host: ApnsHost) -> Attempt:
                assert apns is not None
                return await apns.send(host, delivery, device.token, title, body)

            return await self.apns_chain.send(to_apns)
        fcm = self.fcm

        async def to_fcm(endpoint: FcmEndpoint) -> Attempt:
            assert fcm is not None
            return await fcm.send(endpoint, delivery, device.token, title, body)

        return await self.fcm_chain.send(to_fcm)


def combine(results: list[tuple[PushDevice, Outcome]]) -> Outcome:
    """One outcome for a delivery sent to several devices (see the module docstring)."""
    dead = tuple(
        d.token for d, o in results if isinstance(o, Permanent) and o.invalidates == "token"
    )
    delivered = [(d, o) for d, o in results if isinstance(o, Delivered)]
    details = "; ".join(f"{d.platform}:{d.token[:8]}… {_what(o)}" for d, o in results)[:300]
    if delivered:
        ids = ",".join(o.provider_message_id or "" for _d, o in delivered)
        return Outcome.delivered(ids or None, detail=details, dead_tokens=dead)
    retries = [o for _d, o in results if isinstance(o, Retry)]
    if retries:
        waits = [o.after_s for o in retries if o.after_s is not None]
        first = retries[0]
        return Outcome.retry(
            min(waits) if waits else None, first.reason, detail=details, dead_tokens=dead
        )
    permanents = [o for _d, o in results if isinstance(o, Permanent)]
    first_p = permanents[0]
    all_dead = len(dead) == len(results)
    return Outcome.permanent(
        first_p.reason, "token" if all_dead else None, detail=details, dead_tokens=dead
    )


def _what(outcome: Outcome) -> str:
    if isinstance(outcome, Delivered):
        return "delivered"
    reason = getattr(outcome, "reason", "")
    return f"{reason} ({outcome.detail})" if outcome.detail else str(reason)

"""The channels' settings: ``msgspec.Struct``s with defaults, one per channel.

Meant to be a section of the node's TOML (``[channels.webhook]``, ``[channels.console]``,
``[channels.webhook.breaker]``) in the style of ``broker/config.py``: keys are kebab-case,
unknown keys are errors naming the key, and a bad value (a negative timeout, a network that
does not parse) is a ``msgspec.ValidationError`` naming the field. Durations are integer
milliseconds (``*-ms``) like the rest of the node's configuration.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from typing import Annotated, Literal

import msgspec

Positive = Annotated[int, msgspec.Meta(gt=0)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Fraction = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, rename="kebab", kw_only=True):
    pass


class BreakerConfig(_Section):
    """When a circuit breaker opens, how long it stays open, how it closes again.

    A breaker guards one provider or one webhook endpoint (scheme, host, port). While it is
    open, sends answer ``retry(circuit_open)`` at once instead of waiting on a dead endpoint, so
    one failing receiver does not hold the channel's workers.
    """

    failure_threshold: Positive = 5
    """Open after this many consecutive failures (5xx, 429, timeouts, connection errors)."""

    failure_rate: Fraction = 0.5
    """Also open when at least this fraction of the calls in the rolling window failed
    (catches an endpoint that fails every other call, which never makes 5 in a row)."""

    rate_min_calls: Positive = 20
    """The failure rate counts only once the window holds this many calls, so two failures of
    three calls do not open a quiet endpoint's breaker."""

    rate_window_ms: Positive = 60_000
    """Length of the rolling window for the failure rate (kept in 10 buckets)."""

    open_ms: Positive = 30_000
    """Cool-down after opening, before one probe call is let through (half-open)."""

    max_open_ms: Positive = 300_000
    """Each failed probe doubles the cool-down, up to this: a receiver down for hours is
    probed every 5 minutes, not every 30 s."""

    half_open_probes: Positive = 1
    """Calls let through at once while half-open; the others answer ``retry(circuit_open)``."""

    probes_to_close: Positive = 1
    """Successful probes needed to close the breaker again."""


class WebhookConfig(_Section):
    """The webhook channel: one shared HTTP client, its limits, and the SSRF guard."""

    connect_timeout_ms: Positive = 5_000
    """TCP (and TLS) connect timeout per attempt. A connect timeout is a retry."""

    timeout_ms: Positive = 15_000
    """Total time for one attempt: waiting for a pooled connection, connecting, sending, the
    response headers and the (capped) body. Standard Webhooks suggests 15-30 s. A timeout is a
    retry; the receiver may have acted on the request, and deduplicates on ``webhook-id``."""

    pool_size: Positive = 256
    """Open connections kept by the shared client, across all endpoints (each costs one file
    descriptor and ~40 KiB of buffers). Idle ones are reused (keep-alive)."""

    keepalive_ms: Positive = 15_000
    """How long an idle pooled connection is kept for reuse."""

    concurrency_per_endpoint: Positive = 16
    """Requests in flight at once to one endpoint (scheme, host, port): one tenant's slow
    receiver cannot take the whole pool, and a receiver is not flooded."""

    endpoint_wait_ms: NonNegative = 10_000
    """How long a send waits for a free slot at a busy endpoint before answering
    ``retry(endpoint_busy)``; bounds how long the core's workers queue behind one receiver."""

    max_response_bytes: Positive = 65_536
    """Bytes of a response body read at most (kept only for the outcome's detail); past it the
    connection is closed rather than drained, so a huge or endless body costs nothing."""

    max_retry_after_ms: NonNegative = 3_600_000
    """Cap on a receiver's Retry-After (seconds or HTTP date): at most an hour."""

    max_endpoints: Positive = 10_000
    """Endpoints whose breaker and concurrency state are kept (least recently used idle ones
    are forgotten past this); about 1 KiB each."""

    dns_cache_ms: NonNegative = 10_000
    """How long resolved (and checked) addresses are cached; 0 resolves on every connect."""

    disable_after_ms: Positive = 5 * 24 * 3600 * 1000
    """An endpoint failing for this long (no success at all since, or the delivery's first
    attempt this long ago and still failing) answers ``permanent(endpoint_failing,
    invalidates="endpoint")``: the core disables it with an audit record (Svix: 5 days)."""

    secret_overlap_ms: NonNegative = 24 * 3600 * 1000
    """After a user's webhook secret is replaced (``PUT /users/{id}`` with a new one), the old
    one still signs every request for this long beside the new (two ``v1,`` signatures in
    ``webhook-signature``), so the receiver can switch without a gap (Svix keeps the old
    secret valid for 24 hours). 0: the old secret stops at once."""

    failure_gap_ms: Positive = 24 * 3600 * 1000
    """Two failures further apart than this (a day) with no attempt between do not make one
    failing span: an idle endpoint that failed last week and fails again now is not disabled."""

    allow_networks: list[str] = []
    """Networks (CIDR, e.g. ``"127.0.0.1/32"``, ``"10.1.0.0/16"``) that webhooks may reach even
    though they are not global: by default private, loopback, link-local, multicast, reserved
    and unspecified addresses are refused (SSRF guard), checked on the resolved address at
    connect time."""

    require_https: bool = False
    """Refuse ``http://`` endpoints (permanent ``insecure_url``)."""

    user_agent: str = "Herald-Webhooks/0.1"
    """The ``User-Agent`` header of every webhook request."""

    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    """The per-endpoint circuit breaker."""

    def __post_init__(self) -> None:
        for net in self.allow_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"allow-networks: {exc}") from None
        if self.connect_timeout_ms > self.timeout_ms:
            raise ValueError("connect-timeout-ms is longer than timeout-ms")


class ConsoleConfig(_Section):
    """The console channel: one log line per delivery (``make serve``'s default)."""

    max_payload_bytes: NonNegative = 1024
    """Bytes of the payload written into the line at most (the rest is cut, marked ``...``)."""


class EmailConfig(_Section):
    """The email channel: one SMTP server (a relay or a provider's submission endpoint), a
    bounded pool of reused connections to it, and the headers every message carries."""

    host: str = "127.0.0.1"
    """The SMTP server (a provider's submission host, or a local relay)."""

    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 587
    """587 for submission with STARTTLS, 465 for implicit TLS, 25 for a relay."""

    tls: Literal["starttls", "implicit", "none"] = "starttls"
    """``starttls``: plain connect, then STARTTLS (refused if the server does not offer it);
    ``implicit``: TLS from the first byte (port 465); ``none``: plain text, for a relay on
    the same host only (credentials would travel in clear)."""

    tls_ca_file: str = ""
    """PEM file of the CAs that may sign the server's certificate; empty: the system's."""

    tls_verify: bool = True
    """Check the server's certificate and name. Turning it off gives up TLS's protection
    against an active attacker; for a test server only."""

    username: str = ""
    """SMTP AUTH user; empty: no AUTH."""

    password: str = ""
    """SMTP AUTH password (keep the config file private, as for ``[[auth.keys]]``)."""

    local_hostname: str = ""
    """The name Herald gives in EHLO; empty: this machine's fully qualified name."""

    from_address: str = "Herald <notifications@example.com>"
    """The ``From`` header (RFC 5322 mailbox, display name allowed). Gmail and Yahoo require it
    aligned with the domain that SPF or DKIM authenticates."""

    envelope_from: str = ""
    """The SMTP ``MAIL FROM`` (where bounces go); empty: the address of ``from-address``."""

    reply_to: str = ""
    """A ``Reply-To`` header; empty: none."""

    message_id_domain: str = ""
    """The domain of ``Message-ID: <delivery id@domain>``; empty: the domain of the From
    address. The delivery id makes the Message-ID the same on every retry."""

    list_unsubscribe_categories: list[str] = msgspec.field(
        default_factory=lambda: ["marketing", "subscribed"]
    )
    """Mail of these event categories carries ``List-Unsubscribe`` (a signed HTTPS link Herald
    serves) and ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` (RFC 8058), as Gmail
    and Yahoo require of marketing and subscribed mail; ``"*"`` means every email.
    Transactional mail (receipts, password resets) is exempt and should not carry them."""

    pool_size: Positive = 8
    """SMTP connections open at most; each carries one message at a time and is reused for
    the next (a new connection costs a TCP and a TLS handshake, EHLO and AUTH). Providers
    limit concurrent connections per account (often 10-20)."""

    pool_wait_ms: NonNegative = 10_000
    """How long a send waits for a free connection before answering ``retry(pool_busy)``."""

    connect_timeout_ms: Positive = 10_000
    """Connecting, the greeting, EHLO, STARTTLS and AUTH together. A timeout is a retry."""

    command_timeout_ms: Positive = 30_000
    """Each SMTP command's reply (RFC 5321 allows a server minutes; providers answer in
    seconds). A timeout is a retry; after DATA the server may have taken the message, and
    the same ``Message-ID`` lets the recipient's side recognise the second copy."""

    idle_ms: Positive = 30_000
    """An idle pooled connection older than this is closed rather than reused (servers drop
    idle clients after a few minutes; a stale one would cost a failed command)."""

    max_messages_per_connection: Positive = 100
    """Messages sent on one connection before it is closed and a new one opened (providers
    cap this, e.g. Office 365 at 30 per connection... set it lower for such a provider)."""

    bounce_secret: str = ""
    """The bearer secret of ``POST /hooks/email/bounce`` (what a bounce processor sends as
    ``Authorization: Bearer <secret>``); empty: the hook answers 404."""

    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    """The SMTP server's circuit breaker: connection failures, timeouts and 4xx server replies
    count; a recipient's refusal does not."""

    def __post_init__(self) -> None:
        if self.connect_timeout_ms > 600_000 or self.command_timeout_ms > 600_000:
            raise ValueError("connect-timeout-ms and command-timeout-ms: at most 600000")
        if "@" not in self.from_address:
            raise ValueError("from-address: a mailbox such as 'Herald <noreply@example.com>'")


class TwilioProvider(_Section, kw_only=True):
    """One SMS provider speaking Twilio's REST API (Twilio itself, or a second account)."""

    name: str
    """Names the provider in logs, metrics and outcomes (``primary``, ``backup``)."""

    url: str = "https://api.twilio.com"
    """Base URL; requests go to ``<url>/2010-04-01/Accounts/<account-sid>/Messages.json``."""

    account_sid: str
    """The account (``AC...``): in the path, and the basic-auth user unless ``api-key-sid``."""

    auth_token: str
    """The account's auth token: the basic-auth password (or the API key's secret), and the
    key of the ``X-Twilio-Signature`` HMAC on inbound messages for this account."""

    api_key_sid: str = ""
    """An API key (``SK...``) to authenticate with instead of the account SID."""

    sender: str = ""
    """The ``From`` number (E.164) or alphanumeric sender id; empty when
    ``messaging-service-sid`` chooses the sender."""

    messaging_service_sid: str = ""
    """A Messaging Service (``MG...``) to send through instead of ``From``."""

    rate_per_s: Annotated[float, msgspec.Meta(gt=0.0)] = 1.0
    """Messages per second this sender may send (a US long code: 1/s; toll-free and short
    codes more): a token bucket, so the carrier does not filter or the provider queue."""

    burst: Positive = 1
    """Messages the bucket lets out at once after an idle spell."""

    def __post_init__(self) -> None:
        if not (self.sender or self.messaging_service_sid):
            raise ValueError(f"provider {self.name}: set sender or messaging-service-sid")


class SmsConfig(_Section):
    """The SMS channel: Twilio-style REST, failover across ``providers``, STOP handling."""

    providers: list[TwilioProvider] = []
    """Tried in order: the first whose breaker is closed (or lets a probe through) sends."""

    timeout_ms: Positive = 10_000
    """Total time for one request to a provider. A timeout is a retry (not a failover: the
    provider may have taken the message, and a second provider would send it again)."""

    connect_timeout_ms: Positive = 3_000
    """TCP and TLS connect timeout; a connect failure fails over to the next provider."""

    rate_wait_ms: NonNegative = 5_000
    """How long a send waits for its sender's token bucket before answering
    ``retry(rate_limited)``."""

    max_retry_after_ms: NonNegative = 3_600_000
    """Cap on a provider's Retry-After."""

    status_callback: str = ""
    """``StatusCallback`` URL sent with each message, for its delivery receipts: this node's
    ``/hooks/sms/status`` as Twilio reaches it (``https://herald.example.com/hooks/sms/status``;
    the signature covers it), with the recipient's signed ``ref`` added to its query; empty:
    no receipts."""

    help_text: str = (
        "Herald notifications. Msg frequency varies. Msg & data rates may apply. "
        "Reply STOP to cancel."
    )
    """The HELP answer: who sends (program name), how often, rates, how to stop (CTIA)."""

    stop_text: str = (
        "You are unsubscribed from Herald notifications and will get no more messages. "
        "Reply START to resubscribe."
    )
    """The one confirmation an opt-out may get (TCPA allows one, free of marketing)."""

    start_text: str = "You are subscribed to Herald notifications again. Reply STOP to cancel."
    """The answer to START."""

    inbound_public_url: str = ""
    """The URL Twilio posts inbound messages to, exactly as configured there (the signature
    covers it); empty: rebuilt from the request (right only without a rewriting proxy)."""

    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    """Each provider's circuit breaker."""

    def __post_init__(self) -> None:
        # a StatusCallback Twilio refuses fails every send: refused at start-up instead
        for name, url in (
            ("status-callback", self.status_callback),
            ("inbound-public-url", self.inbound_public_url),
        ):
            if url and not _absolute_http_url(url):
                raise ValueError(
                    f"{name}: an absolute http(s) URL, e.g. https://herald.example.com/..."
                )


def _absolute_http_url(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and " " not in url


class ApnsConfig(_Section):
    """APNs with token-based auth (an ES256 JWT signed with the team's .p8 key)."""

    urls: list[str] = msgspec.field(default_factory=lambda: ["https://api.push.apple.com"])
    """APNs hosts in failover order (``https://api.sandbox.push.apple.com`` for development
    builds; Apple also listens on port 2197)."""

    key_id: str = ""
    """The signing key's id (the JWT's ``kid``)."""

    team_id: str = ""
    """The developer team (the JWT's ``iss``)."""

    key_file: str = ""
    """Path to the PKCS#8 PEM (``AuthKey_<kid>.p8``) holding the P-256 private key."""

    topic: str = ""
    """The app's bundle id (``apns-topic``)."""

    push_type: Literal["alert", "background"] = "alert"
    """``apns-push-type``; background pushes always go with priority 5."""

    token_refresh_ms: Annotated[int, msgspec.Meta(ge=1_200_000, le=3_300_000)] = 2_400_000
    """Age at which the provider token is signed again: Apple refuses tokens older than an
    hour (403 ExpiredProviderToken) and tokens renewed more often than every 20 minutes
    (429 TooManyProviderTokenUpdates)."""

    expiration_ms: NonNegative = 86_400_000
    """``apns-expiration``: how long APNs stores a notification for an offline device
    (0: deliver now or never)."""

    timeout_ms: Positive = 10_000
    """Total time for one request."""

    max_connections: Positive = 4
    """HTTP/2 connections kept to APNs; each carries many concurrent streams."""

    max_retry_after_ms: NonNegative = 3_600_000

    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    """Each host's circuit breaker."""


class FcmConfig(_Section):
    """FCM HTTP v1 with an OAuth2 access token from a service account's JWT grant."""

    urls: list[str] = msgspec.field(default_factory=lambda: ["https://fcm.googleapis.com"])
    """FCM endpoints in failover order."""

    project_id: str = ""
    """The Firebase project: ``POST <url>/v1/projects/<project-id>/messages:send``."""

    service_account_file: str = ""
    """The service account's JSON key (``client_email``, ``private_key``, ``token_uri``)."""

    token_uri: str = ""
    """The OAuth2 token endpoint; empty: the key file's ``token_uri``
    (``https://oauth2.googleapis.com/token``)."""

    scope: str = "https://www.googleapis.com/auth/firebase.messaging"
    """The OAuth2 scope asked for."""

    token_margin_ms: NonNegative = 300_000
    """An access token is fetched again this long before it expires."""

    min_quota_retry_ms: NonNegative = 60_000
    """Google asks for at least a minute of back-off after 429 QUOTA_EXCEEDED."""

    timeout_ms: Positive = 10_000
    """Total time for one request (send or token)."""

    max_retry_after_ms: NonNegative = 3_600_000

    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    """Each endpoint's circuit breaker."""


class ChannelsConfig(_Section):
    """Every channel's settings: ``[channels.*]`` in the node's TOML."""

    webhook: WebhookConfig = msgspec.field(default_factory=WebhookConfig)
    console: ConsoleConfig = msgspec.field(default_factory=ConsoleConfig)
    email: EmailConfig = msgspec.field(default_factory=EmailConfig)
    sms: SmsConfig = msgspec.field(default_factory=SmsConfig)
    apns: ApnsConfig = msgspec.field(default_factory=ApnsConfig)
    fcm: FcmConfig = msgspec.field(default_factory=FcmConfig)

"""The email channel: one SMTP transaction per delivery over a pool of reused connections.

Per attempt::

    MAIL FROM:<envelope-from>   RCPT TO:<the user's address>   DATA <the message>

The message (:func:`build_message`, pure) is multipart/alternative, text then HTML, with
``From``, ``To``, ``Reply-To`` (if configured), ``Subject``, ``Date``, ``Message-ID: <delivery
id@domain>`` (the same on every retry, so a copy sent twice is recognisable), and, for the
categories that need them, ``List-Unsubscribe: <https://.../unsubscribe/<token>>`` with
``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` (RFC 8058). Herald does not DKIM-sign:
the relay or provider must (RFC 8058 requires a DKIM signature covering both headers).

What the server's replies mean (:func:`classify`, pure; ``docs/CHANNELS.md`` has the table):
2xx after DATA is delivered (the provider's queue id from the reply, else the Message-ID);
4xx is a retry; 5xx is permanent, and 550/551/553 on RCPT invalidate the address unless the
enhanced status says the refusal is about policy (5.7.x), not the mailbox. Failing to connect,
greet, start TLS or authenticate is a retry that counts against the server's breaker: the
message was never judged, and dead-lettering every message while a password is wrong would
lose mail that a fixed config would deliver.

Connections: at most ``pool-size`` open, each carrying one transaction at a time and reused
for the next (a new one costs TCP, TLS, EHLO and AUTH round trips); closed after
``max-messages-per-connection`` messages, ``idle-ms`` unused, or any error. A pooled connection
the server closed while idle is noticed on its first command and replaced once, silently.
"""

from __future__ import annotations

import asyncio
import email.policy
import email.utils
import logging
import re
import ssl
import time
from collections.abc import Callable
from email.message import EmailMessage
from typing import Final, Literal

import aiosmtplib

from channels.base import Delivered, Delivery, EmailAddress, EmailContent, Outcome, Permanent, Retry
from channels.breaker import BreakerState
from channels.config import EmailConfig
from channels.endpoints import Endpoint, Endpoints
from channels.errors import ChannelClosed
from channels.responses import Health

log = logging.getLogger("herald.channels.email")

Stage = Literal["connect", "mail", "rcpt", "data"]

ONE_CLICK: Final = "List-Unsubscribe=One-Click"
# RFC 5322's hard limit. The default 78 would fold a long List-Unsubscribe URL as RFC 2047
# encoded words, which no mail client reads back as a URL.
_POLICY: Final = email.policy.SMTP.clone(max_line_length=998)
_ENHANCED: Final = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")
_PROVIDER_ID: Final = (
    re.compile(r"queued as\s+<?([\w.@-]+)>?", re.I),  # Postfix, Sendmail
    re.compile(r"\bid=([\w.@-]+)", re.I),  # Exim
    re.compile(r"^(?:2\.\d\.\d+\s+)?ok\s+<?([\w.@-]{8,})>?\s*$", re.I),  # SES, many providers
)
_INVALIDATING: Final = frozenset({550, 551, 553})
_SESSION: Final = frozenset({530, 534, 535, 538})
DETAIL_CHARS: Final = 200


# --------------------------------------------------------------------------- pure parts
def message_id(delivery_id: str, domain: str) -> str:
    """``<delivery_id@domain>``: a function of the delivery, so stable across retries."""
    return f"<{delivery_id}@{domain}>"


def domain_of(mailbox: str) -> str:
    """The domain of an RFC 5322 mailbox (``"Herald <n@example.com>"`` -> ``example.com``)."""
    _name, addr = email.utils.parseaddr(mailbox)
    return addr.rpartition("@")[2] or "localhost"


def valid_address(addr: str) -> bool:
    """A bare addr-spec with one ``@``, no spaces, controls or angle brackets (what can go
    into ``RCPT TO:<...>`` and a ``To`` header without quoting or injection)."""
    if not 3 <= len(addr) <= 254 or addr.count("@") != 1:
        return False
    local, _, domain = addr.partition("@")
    if not local or not domain or domain.startswith(".") or domain.endswith("."):
        return False
    return not any(c.isspace() or c in '<>(),;:"\\[]' or ord(c) < 32 for c in addr)


def build_message(
    delivery: Delivery,
    address: EmailAddress,
    content: EmailContent,
    config: EmailConfig,
    *,
    date: float,
) -> bytes:
    """The whole message, CRLF line ends, ready for DATA. ``date`` is the attempt's wall
    clock (Unix seconds), the only part that differs between attempts."""
    msg = EmailMessage(policy=_POLICY)
    msg["From"] = config.from_address
    msg["To"] = address.to
    if config.reply_to:
        msg["Reply-To"] = config.reply_to
    msg["Subject"] = " ".join(content.subject.split())
    msg["Date"] = email.utils.formatdate(date, usegmt=True)
    domain = config.message_id_domain or domain_of(config.from_address)
    msg["Message-ID"] = message_id(delivery.delivery_id, domain)
    if address.unsubscribe_url:
        msg["List-Unsubscribe"] = f"<{address.unsubscribe_url}>"
        msg["List-Unsubscribe-Post"] = ONE_CLICK
    if address.ref:
        msg["X-Herald-Ref"] = address.ref
    # quoted-printable keeps the message 7-bit: a relay without 8BITMIME takes it as it is
    msg.set_content(content.text, cte="quoted-printable")
    if content.html is not None:
        msg.add_alternative(content.html, subtype="html", cte="quoted-printable")
    return msg.as_bytes()


def enhanced_status(text: str) -> tuple[int, int, int] | None:
    """The RFC 3463 enhanced status code at the start of a reply's text (``5.1.1``)."""
    m = _ENHANCED.match(text)
    return None if m is None else (int(m[1]), int(m[2]), int(m[3]))


def provider_id(reply: str) -> str | None:
    """The server's id for an accepted message, from the text of its reply to DATA
    (Postfix ``queued as 4F2A81``, Exim ``id=1tX-00A``, ``Ok 0100018c...``), if it gives one."""
    text = reply.strip()
    for pattern in _PROVIDER_ID:
        m = pattern.search(text)
        if m is not None:
            return m[1]
    return None


def short(text: str) -> str:
    return " ".join(text.split())[:DETAIL_CHARS]


def classify(stage: Stage, code: int, text: str) -> tuple[Outcome, Health]:
    """The outcome of an SMTP reply ``code`` (with its ``text``) that ended the transaction
    at ``stage``, and what it says about the server's health (for its breaker).

    A 2xx here is a reply to DATA (earlier 2xx replies do not end a transaction)."""
    detail = short(f"{code} {text}")
    if 200 <= code < 300:
        return Outcome.delivered(provider_id(text), detail=detail), "success"
    reason = f"smtp_{code}"
    if code in _SESSION:
        # 530 "must issue STARTTLS / authenticate first", 534/535/538 credentials refused:
        # Herald's configuration is at fault, not the message; every message would fail alike
        reason = "auth_required" if code == 530 else "auth_failed"
        return Outcome.retry(None, reason, detail=detail), "failure"
    if stage == "connect":
        # greeting, EHLO or STARTTLS refused: the message was never judged
        return Outcome.retry(None, reason, detail=detail), "failure"
    if code == 421 or 400 <= code < 500:
        # 421: the server is closing the connection (overloaded, shutting down). Other 4xx:
        # transient. On RCPT (mailbox busy, greylisted) it is the recipient's state, not
        # the server's health.
        health: Health = "success" if stage == "rcpt" and code != 421 else "failure"
        return Outcome.retry(None, reason, detail=detail), health
    if code >= 500:
        if stage == "rcpt" and code in _INVALIDATING:
            enhanced = enhanced_status(text)
            # 5.7.x (policy, blocked sender, spam) says nothing about the mailbox
            if enhanced is None or enhanced[1] in (1, 2):
                return Outcome.permanent(reason, "address", detail=detail), "success"
        return Outcome.permanent(reason, None, detail=detail), "success"
    return Outcome.retry(None, reason, detail=detail), "failure"


# ------------------------------------------------------------------------------- the pool
class _Failed(Exception):
    """Opening a connection failed; carries the outcome to answer."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.detail)
        self.outcome = outcome


class _Conn:
    __slots__ = ("reused", "sent", "smtp", "used_at")

    def __init__(self, smtp: aiosmtplib.SMTP, now: float) -> None:
        self.smtp = smtp
        self.sent = 0
        self.used_at = now
        self.reused = False


class SmtpPool:
    """Idle connections to the one SMTP server, most recently used first. The caller holds a
    slot of the endpoint's concurrency limit (``pool-size``) while it uses a connection, so
    at most ``pool-size`` are ever open. Counters for tests and the benchmark: ``opened``,
    ``reused``."""

    def __init__(
        self, config: EmailConfig, tls: ssl.SSLContext | None, monotonic: Callable[[], float]
    ) -> None:
        self.config = config
        self._tls = tls
        self._monotonic = monotonic
        self._idle: list[_Conn] = []
        self.opened = 0
        self.reused = 0

    async def get(self) -> _Conn:
        """A connection ready for MAIL FROM: an idle one still fresh, else a new one.
        Raises :class:`_Failed` with the outcome when a new one cannot be opened."""
        now = self._monotonic()
        idle_s = self.config.idle_ms / 1000
        while self._idle:
            conn = self._idle.pop()
            if now - conn.used_at < idle_s and conn.smtp.is_connected:
                conn.reused = True
                self.reused += 1
                return conn
            self._discard(conn)
        return await self._open()

    def put(self, conn: _Conn) -> None:
        """Return a healthy connection after a finished transaction."""
        conn.used_at = self._monotonic()
        if conn.sent >= self.config.max_messages_per_connection or not conn.smtp.is_connected:
            self._discard(conn)
            return
        self._idle.append(conn)

    def drop(self, conn: _Conn) -> None:
        """Forget a connection in an unknown state (an error, a cancellation)."""
        self._discard(conn)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            try:
                async with asyncio.timeout(1):
                    await conn.smtp.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                conn.smtp.close()

    def _discard(self, conn: _Conn, *, polite: bool = False) -> None:
        conn.smtp.close()

    async def _open(self) -> _Conn:
        cfg = self.config
        implicit = cfg.tls == "implicit"
        smtp = aiosmtplib.SMTP(
            hostname=cfg.host,
            port=cfg.port,
            use_tls=implicit,
            start_tls=cfg.tls == "starttls",
            tls_context=self._tls if cfg.tls != "none" else None,
            validate_certs=cfg.tls_verify,
            timeout=cfg.command_timeout_ms / 1000,
            local_hostname=cfg.local_hostname or None,
            username=cfg.username or None,
            password=cfg.password or None,
        )
        try:
            await smtp.connect(timeout=cfg.connect_timeout_ms / 1000)
        except aiosmtplib.SMTPConnectTimeoutError as exc:
            raise _Failed(Outcome.retry(None, "connect_timeout", detail=_short(exc))) from None
        except aiosmtplib.SMTPResponseException as exc:  # greeting, EHLO, STARTTLS, AUTH
            outcome, _health = classify("connect", exc.code, exc.message)
            raise _Failed(outcome) from None
        except aiosmtplib.SMTPNotSupported as exc:  # e.g. no STARTTLS offered
            raise _Failed(Outcome.retry(None, "tls_unavailable", detail=_short(exc))) from None
        except ssl.SSLError as exc:
            raise _Failed(Outcome.retry(None, "tls_error", detail=_short(exc))) from None
        except aiosmtplib.SMTPTimeoutError as exc:
            raise _Failed(Outcome.retry(None, "connect_timeout", detail=_short(exc))) from None
        except aiosmtplib.SMTPConnectError as exc:
            reason = "tls_error" if isinstance(exc.__cause__, ssl.SSLError) else "connect_error"
            raise _Failed(Outcome.retry(None, reason, detail=_short(exc))) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            raise _Failed(Outcome.retry(None, "connect_error", detail=_short(exc))) from None
        self.opened += 1
        return _Conn(smtp, self._monotonic())


def tls_context(config: EmailConfig) -> ssl.SSLContext | None:
    """The client TLS context: the system's CAs or ``tls-ca-file``'s; None for ``tls=none``."""
    if config.tls == "none":
        return None
    ctx = ssl.create_default_context(cafile=config.tls_ca_file or None)
    if not config.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# ---------------------------------------------------------------------------- the channel
class EmailChannel:
    """Sends each delivery as one SMTP transaction. See the module docstring.

    ``delivery.address`` must be an :class:`EmailAddress` and ``delivery.content`` an
    :class:`EmailContent` (the core renders it); otherwise the answer is
    ``permanent(no_address | no_content)``. Safe to call concurrently; ``close`` quits the
    pooled connections.
    """

    name = "email"

    def __init__(
        self,
        config: EmailConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = cfg = config or EmailConfig()
        self._clock = clock
        self._monotonic = monotonic
        self.server = f"smtp://{cfg.host}:{cfg.port}"
        self.endpoints = Endpoints(cfg.breaker, cfg.pool_size, 1, monotonic, self._on_transition)
        self.pool = SmtpPool(cfg, tls_context(cfg), monotonic)
        self._sender = cfg.envelope_from or email.utils.parseaddr(cfg.from_address)[1]
        self._closed = False
        self.sent = 0

    def breaker_states(self) -> list[str]:
        return self.endpoints.breaker_states()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.pool.close()

    async def send(self, delivery: Delivery) -> Outcome:
        if self._closed:
            raise ChannelClosed("the email channel is closed")
        address, content = delivery.address, delivery.content
        if not isinstance(address, EmailAddress):
            return Outcome.permanent("no_address", None, detail="the user has no email address")
        if not valid_address(address.to):
            return Outcome.permanent("invalid_address", "address", detail=address.to[:100])
        if not isinstance(content, EmailContent):
            return Outcome.permanent("no_content", None, detail="nothing rendered for email")
        ep = self.endpoints.get(self.server)
        if ep.breaker.state is BreakerState.OPEN:
            return self._circuit_open(ep)
        if not await ep.limit.acquire(self.config.pool_wait_ms / 1000):
            return Outcome.retry(None, "pool_busy", detail=f"{ep.limit.limit} connections busy")
        try:
            ticket = ep.breaker.admit()
            if ticket is None:
                return self._circuit_open(ep)
            health: Health = "unknown"
            try:
                outcome, health = await self._attempt(delivery, address, content)
            finally:
                if health == "success":
                    ep.breaker.success(ticket)
                elif health == "failure":
                    ep.breaker.failure(ticket)
                else:
                    ep.breaker.release(ticket)
        finally:
            ep.limit.release()
        if isinstance(outcome, Retry | Permanent):
            log.info(
                "event=email_failed delivery_id=%s tenant=%s user=%s attempt=%d outcome=%s",
                delivery.delivery_id,
                delivery.tenant,
                delivery.user,
                delivery.attempt,
                outcome.detail.replace(" ", "_")[:120],
            )
        return outcome

    async def _attempt(
        self, delivery: Delivery, address: EmailAddress, content: EmailContent
    ) -> tuple[Outcome, Health]:
        message = build_message(delivery, address, content, self.config, date=self._clock())
        fallback_id = message_id(
            delivery.delivery_id,
            self.config.message_id_domain or domain_of(self.config.from_address),
        )
        for _try in range(2):
            try:
                conn = await self.pool.get()
            except _Failed as failed:
                return failed.outcome, "failure"
            outcome, health, stale = await self._transaction(conn, address.to, message)
            # a reused connection the server had closed while idle: once more on a new one
            if stale and conn.reused and _try == 0:
                continue
            if isinstance(outcome, Delivered):
                self.sent += 1
                if outcome.provider_message_id is None:
                    outcome = Outcome.delivered(fallback_id, detail=outcome.detail)
            return outcome, health
        raise AssertionError("unreachable: the loop returns on its second turn")

    async def _transaction(
        self, conn: _Conn, to: str, message: bytes
    ) -> tuple[Outcome, Health, bool]:
        """MAIL, RCPT, DATA on ``conn``; returns the outcome, the server's health, and whether
        the connection turned out dead before the server said anything (stale)."""
        smtp = conn.smtp
        stage: Stage = "mail"
        options: list[str] = []
        encoding = "ascii"
        if not to.isascii():
            if not smtp.supports_extension("smtputf8"):
                self.pool.put(conn)
                detail = "a non-ASCII address and the server lacks SMTPUTF8"
                return Outcome.permanent("invalid_address", None, detail=detail), "success", False
            options, encoding = ["SMTPUTF8"], "utf-8"
        try:
            await smtp.mail(self._sender, options=options, encoding=encoding)
            stage = "rcpt"
            await smtp.rcpt(to, encoding=encoding)
            stage = "data"
            reply = await smtp.data(message)
        except aiosmtplib.SMTPResponseException as exc:
            outcome, health = classify(stage, exc.code, exc.message)
            if exc.code == 421 or not await self._reset(conn):
                self.pool.drop(conn)
            else:
                self.pool.put(conn)
            return outcome, health, False
        except aiosmtplib.SMTPTimeoutError as exc:
            self.pool.drop(conn)
            where = "after DATA" if stage == "data" else f"at {stage.upper()}"
            detail = f"{where}: {_short(exc)}"
            return Outcome.retry(None, "timeout", detail=detail), "failure", False
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError, OSError) as exc:
            self.pool.drop(conn)
            stale = stage == "mail"
            detail = f"at {stage.upper()}: {_short(exc)}"
            return Outcome.retry(None, "connection_lost", detail=detail), "failure", stale
        except asyncio.CancelledError:
            self.pool.drop(conn)
            raise
        except aiosmtplib.SMTPException as exc:
            self.pool.drop(conn)
            return Outcome.retry(None, "smtp_error", detail=_short(exc)), "failure", False
        conn.sent += 1
        self.pool.put(conn)
        outcome, health = classify("data", reply.code, reply.message)
        return outcome, health, False

    async def _reset(self, conn: _Conn) -> bool:
        """RSET after a refused command, so the connection can carry the next message."""
        try:
            await conn.smtp.rset()
            return True
        except (aiosmtplib.SMTPException, OSError):
            return False

    def _circuit_open(self, ep: Endpoint) -> Outcome:
        after = ep.breaker.retry_after()
        return Outcome.retry(after, "circuit_open", detail=f"{ep.key} is failing")

    def _on_transition(self, server: str, old: BreakerState, new: BreakerState, why: str) -> None:
        log.warning(
            "event=breaker_%s channel=email endpoint=%s from=%s why=%s",
            new.value,
            server,
            old.value,
            why,
        )


def _short(exc: BaseException) -> str:
    return short(str(exc) or type(exc).__name__)

"""A real SMTP server on 127.0.0.1 for the email tests: aiosmtpd's protocol served in the
test's own loop, recording every message it accepts, with scripted refusals, STARTTLS and
AUTH; and a throwaway CA with a server certificate made with ``cryptography``."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.policy
import ipaddress
import ssl
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    peer_port: int
    at: float = field(default_factory=time.monotonic)  # when it arrived (monotonic)

    @property
    def message(self) -> EmailMessage:
        """The message parsed by the standard library (modern policy)."""
        msg = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


@dataclass
class Script:
    """Replies to give instead of accepting: popped one per RCPT (or DATA)."""

    rcpt: deque[str] = field(default_factory=deque)
    data: deque[str] = field(default_factory=deque)
    greeting_delay_s: float = 0.0
    data_delay_s: float = 0.0


class Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.sink.commands.append(f"RCPT {address}")
        if self.sink.script.rcpt:
            return self.sink.script.rcpt.popleft()
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.sink.data_seen.append(bytes(envelope.original_content or b""))
        if self.sink.script.data_delay_s:
            await asyncio.sleep(self.sink.script.data_delay_s)
        if self.sink.script.data:
            return self.sink.script.data.popleft()
        peer = session.peer
        self.sink.received.append(
            Received(
                mail_from=str(envelope.mail_from),
                rcpt_tos=list(envelope.rcpt_tos),
                data=bytes(envelope.original_content or b""),
                tls=session.ssl is not None  # STARTTLS
                or (
                    server.transport is not None
                    and server.transport.get_extra_info("ssl_object") is not None
                ),
                peer_port=int(peer[1]) if isinstance(peer, tuple) else 0,
            )
        )
        self.sink.arrived.set()
        return f"250 2.0.0 Ok: queued as Q{len(self.sink.received):05d}"


class SmtpSink:
    """``await sink.start()``; ``sink.port``; ``sink.received``; ``await sink.stop()``."""

    def __init__(
        self,
        *,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        credentials: tuple[str, str] | None = None,
        implicit_tls: bool = False,
    ) -> None:
        # implicit_tls: TLS from the first byte (port 465 style, RFC 8314) with tls_context;
        # otherwise tls_context is offered through STARTTLS
        self.implicit_tls = implicit_tls
        self.tls_context = tls_context
        self.require_starttls = require_starttls
        self.credentials = credentials
        self.received: list[Received] = []
        self.commands: list[str] = []
        self.data_seen: list[bytes] = []  # every DATA, refused ones too
        self.connections = 0
        self._protocols: list[SMTP] = []
        self.script = Script()
        self.arrived = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and self.credentials is not None
            and (data.login.decode(), data.password.decode()) == self.credentials
        )
        return AuthResult(success=ok, handled=False)

    def _protocol(self) -> SMTP:
        self.connections += 1
        with warnings.catch_warnings():
            # aiosmtpd warns of AUTH without its STARTTLS; here TLS wraps the whole connection
            warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
            proto = self._smtp()
        self._protocols.append(proto)
        return proto

    def _smtp(self) -> SMTP:
        return SMTP(
            Handler(self),
            hostname="localhost",
            tls_context=None if self.implicit_tls else self.tls_context,
            require_starttls=self.require_starttls,
            auth_required=self.credentials is not None,
            # aiosmtpd knows TLS only by its own STARTTLS: with implicit TLS the whole
            # connection is TLS already, so AUTH is offered from the start
            auth_require_tls=self.tls_context is not None and not self.implicit_tls,
            authenticator=self._authenticate if self.credentials is not None else None,
            timeout=30,
        )

    def drop_clients(self) -> None:
        """Close every client connection now (a server dropping idle clients)."""
        for proto in self._protocols:
            if proto.transport is not None:
                proto.transport.close()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        wrap = self.tls_context if self.implicit_tls else None
        self._server = await loop.create_server(self._protocol, "127.0.0.1", 0, ssl=wrap)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self.drop_clients()
            await self._server.wait_closed()

    async def wait(self, count: int, within: float = 10.0) -> list[Received]:
        async with asyncio.timeout(within):
            while len(self.received) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.received


# ------------------------------------------------------------------------- a test CA
@dataclass
class TestCA:
    __test__ = False
    ca_pem: Path
    cert_pem: Path
    key_pem: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_pem, self.key_pem)
        return ctx


def make_test_ca(directory: Path) -> TestCA:
    """A CA and a leaf for ``localhost`` and 127.0.0.1 signed by it (EC P-256), as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Herald test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    out = TestCA(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    out.ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    out.cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return out

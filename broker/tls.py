"""TLS contexts, made once from configuration and shared by every listener that serves TLS
(HTTP and TCP today; the WebSocket gateway takes the same :func:`server_context` when it is
built) and by the clients (the SDK and the CLI verify the node against a CA file).

The standard :mod:`ssl` module only. The server context is TLS 1.2 or later (configurable
to 1.3 only), with Python's default cipher choice (forward secrecy, AEAD) and no
compression or renegotiation; the client context verifies the certificate chain and the
host name, as :func:`ssl.create_default_context` does.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.config import TlsConfig


class TlsError(Exception):
    """The certificate or key cannot be loaded (a configuration error the node reports at
    start-up, naming the file)."""

    code = "tls_error"


_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(cfg: TlsConfig) -> ssl.SSLContext | None:
    """The context every listener serves TLS with, or None when TLS is not configured.
    Raises :class:`TlsError` if the files cannot be read or do not match."""
    if cfg.cert_file is None or cfg.key_file is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[cfg.min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    except FileNotFoundError as exc:
        raise TlsError(f"tls: cannot read {exc.filename}: no such file") from None
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(
            f"tls: cannot load the certificate {cfg.cert_file} with the key {cfg.key_file}: {exc}"
        ) from None
    return ctx


def client_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A context that verifies the node's certificate against ``ca_file`` (a PEM bundle), or
    the system's trusted CAs when None, and checks the host name."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx

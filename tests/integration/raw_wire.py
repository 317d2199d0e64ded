"""A blocking socket speaking Herald's framing byte for byte, for tests that must control
exactly what goes on the wire (resending identical bytes, malformed frames)."""

from __future__ import annotations

import socket
import struct
from typing import Any

from broker import protocol as p

_LEN = struct.Struct(">I")


class WireClosed(Exception):
    """The server closed the connection."""


class RawConnection:
    def __init__(
        self, host: str, port: int, *, timeout: float = 10.0, source: str | None = None
    ) -> None:
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, *msgs: Any) -> None:
        self.sock.sendall(b"".join(p.encode_message(m) for m in msgs))

    def _fill(self, need: int) -> None:
        while len(self._buf) < need:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise WireClosed(f"closed with {len(self._buf)} of {need} bytes buffered")
            self._buf += chunk

    def recv_payload(self) -> bytes:
        """The next whole frame's payload. Raises :class:`WireClosed` on EOF."""
        self._fill(4)
        (size,) = _LEN.unpack_from(self._buf)
        self._fill(4 + size)
        payload = bytes(self._buf[4 : 4 + size])
        del self._buf[: 4 + size]
        return payload

    def recv(self) -> p.Response:
        return p.decode_response(self.recv_payload())

    def request(self, msg: Any) -> p.Response:
        self.send(msg)
        return self.recv()

    def read_until_closed(self) -> list[p.Response]:
        """Every frame the server sends until it closes the connection."""
        out = []
        while True:
            try:
                out.append(self.recv())
            except (WireClosed, ConnectionResetError):
                return out

"""A blocking socket speaking HTTP/1.1 byte for byte, for tests that must control exactly what
goes on the wire: pipelining, chunked bodies sent piecewise, ``Expect: 100-continue``, HTTP/1.0,
malformed requests, and whether the server closed the connection."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    headers: dict[str, str] | None = None,
    version: str = "1.1",
) -> bytes:
    """The bytes of one request; a body gets a ``Content-Length`` unless ``headers`` frames it,
    and ``Content-Type: application/json`` unless ``headers`` names a type."""
    lines = [f"{method} {path} HTTP/{version}", "Host: 127.0.0.1"]
    given = {k.lower() for k in headers or {}}
    if body is not None and "content-length" not in given and "transfer-encoding" not in given:
        lines.append(f"Content-Length: {len(body)}")
    framed = body is not None or "transfer-encoding" in given or "content-length" in given
    if framed and "content-type" not in given:
        lines.append("Content-Type: application/json")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def post_json(path: str, doc: Any, **kwargs: Any) -> bytes:
    return request("POST", path, json.dumps(doc).encode(), **kwargs)


class RawHttp:
    def __init__(
        self, host: str, port: int, *, timeout: float = 10.0, source: str | None = None
    ) -> None:
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()

    def __enter__(self) -> RawHttp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self._buf += chunk
        return bool(chunk)

    def response(self) -> Response:
        """The next response (an interim ``100 Continue`` is a response too)."""
        while b"\r\n\r\n" not in self._buf:
            if not self._fill():
                raise ConnectionError(f"closed before a full response head: {bytes(self._buf)!r}")
        head, _, rest = bytes(self._buf).partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        self._buf = bytearray(rest)
        while len(self._buf) < length:
            if not self._fill():
                raise ConnectionError("closed inside a response body")
        body = bytes(self._buf[:length])
        del self._buf[:length]
        return Response(int(status_line.split(" ")[1]), headers, body)

    def exchange(self, data: bytes) -> Response:
        self.send(data)
        return self.response()

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True once the server closes (EOF or reset) with nothing more to read."""
        self.sock.settimeout(timeout)
        try:
            return not self._buf and not self._fill()
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

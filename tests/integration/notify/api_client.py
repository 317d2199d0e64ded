"""A small client of the notification HTTP API for tests: one call is one request, and the
assertions a test makes on every answer (JSON, the error body's shape) are made here. No
pytest in here: the system tests import it too."""

from __future__ import annotations

import io
from typing import Any

import aiohttp
import msgspec


class ApiError(AssertionError):
    pass


class ApiClient:
    """Calls ``base`` with ``key`` (None: no Authorization header)."""

    def __init__(self, session: aiohttp.ClientSession, base: str, key: str | None = None) -> None:
        self.session = session
        self.base = base
        self.key = key

    def as_key(self, key: str | None) -> ApiClient:
        return ApiClient(self.session, self.base, key)

    async def call(
        self, method: str, path: str, body: Any = None, *, raw: bytes | None = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        kwargs: dict[str, Any] = {"headers": headers}
        if body is not None:
            raw = msgspec.json.encode(body)
        if raw is not None:
            kwargs["data"] = io.BytesIO(raw)
            headers["Content-Type"] = "application/json"
        async with self.session.request(method, self.base + path, **kwargs) as resp:
            if resp.content_type != "application/json":
                raise ApiError(f"{method} {path}: {resp.status} {await resp.text()}")
            return resp.status, await resp.json()

    async def ok(self, method: str, path: str, body: Any = None, *, status: int = 200) -> Any:
        """The answer of a call that must succeed with ``status``."""
        got, answer = await self.call(method, path, body)
        if got != status:
            raise ApiError(f"{method} {path}: {got} {answer}")
        return answer

    async def error(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        status: int,
        code: str,
        field: str | None = None,
        raw: bytes | None = None,
    ) -> dict[str, Any]:
        """The error of a call that must fail with ``status``, ``code`` and ``field``."""
        got, answer = await self.call(method, path, body, raw=raw)
        if got != status or set(answer) != {"error"}:
            raise ApiError(f"{method} {path}: wanted {status} {code}, got {got} {answer}")
        err = answer["error"]
        if err["code"] != code or err["field"] != field:
            raise ApiError(f"{method} {path}: wanted {code} field={field}, got {err}")
        assert isinstance(err["message"], str) and err["message"]
        return dict(err)

"""The node's side of the gateway's worker processes (``gateway.workers`` > 0): what stands
in for the session table when the connections live in other processes.

The node keeps everything that needs its state: the one reader numbering ``__inapp`` and
``__broadcast`` into the inbox, the inbox (backfills, marks, retraction), the users'
preferences (the broadcast edge filter) and the engine (marks, counts). Each worker holds
connections and sessions and talks to the node over its link (``gateway/link.py``). The hub:

- counts who is present on which worker (an :class:`~gateway.link.Open` adds a device, a
  :class:`~gateway.link.Gone` or the worker's death removes it): ``present`` is the sum,
  the presence the in-app channel and ``recipient.online`` read;
- routes each numbered message only to the workers holding one of its recipients
  (:meth:`offer_user`, :meth:`offer_tenant`: the preference filter runs once here, over
  the tenant's users on every worker; each worker is told whom to leave out);
- answers an open with the backfill, read from the inbox in the same loop step that counts
  the device present.

**No gap, no duplicate, across processes.** A worker registers a session before it sends
:class:`~gateway.link.Open`. The hub handles the open in one loop step: the device is
present from then on, so every message indexed later is routed to its worker *behind* the
backfill on the same ordered link; every message indexed earlier is in the inbox the backfill
reads. The worker's session sends a message only if its number is above the last one it sent
(``gateway/sessions.py``), as in one process.

A worker that stops reading its link is killed once ``gateway.worker-buffer-bytes`` are
queued for it (as a slow client is cut off); the supervisor restarts it and its clients
reconnect with their cursors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from gateway import frames, link
from gateway.link import Backfill, Gone, Mark, Open, Tell

log = logging.getLogger("herald.gateway")


class Backend(Protocol):
    """What the hub asks the node's gateway (``gateway/server.py`` answers)."""

    def plan_backfill(
        self, tenant: str, user: str, cursor: int | None
    ) -> tuple[int, list[tuple[int, bytes]], bool]:
        """(start, [(number, message)], truncated) for a device connecting with ``cursor``."""

    def counts(self, tenant: str, user: str) -> tuple[int, int]:
        """(unseen, unread)."""

    async def engage(self, tenant: str, user: str, what: str, ids: list[str]) -> list[str]:
        """Record the marks; returns the ids the inbox does not know."""

    def send_counts(self, tenant: str, user: str) -> None:
        """Fresh counts to every device of the user."""


class WorkerLink:
    """One worker's link and the devices connected to it, by user and by tenant."""

    def __init__(self, index: int, writer: asyncio.StreamWriter, max_buffer: int) -> None:
        self.index = index
        self.writer = writer
        self.max_buffer = max_buffer
        self.devices: dict[tuple[str, str], int] = {}
        self.by_tenant: dict[str, dict[str, int]] = {}
        self.count = 0
        self.closed = False

    def add(self, tenant: str, user: str) -> None:
        key = (tenant, user)
        self.devices[key] = n = self.devices.get(key, 0) + 1
        self.by_tenant.setdefault(tenant, {})[user] = n
        self.count += 1

    def remove(self, tenant: str, user: str) -> None:
        key = (tenant, user)
        n = self.devices.get(key, 0)
        if n <= 0:
            return
        self.count -= 1
        users = self.by_tenant[tenant]
        if n == 1:
            del self.devices[key]
            del users[user]
            if not users:
                del self.by_tenant[tenant]
        else:
            self.devices[key] = users[user] = n - 1

    def send(self, msg: link.ToWorker) -> None:
        if self.closed:
            return
        transport = self.writer.transport
        transport.write(link.encode(msg))
        if transport.get_write_buffer_size() > self.max_buffer:
            log.error(
                "event=gateway_worker_stalled worker=%d buffered=%d: dropping its link",
                self.index,
                transport.get_write_buffer_size(),
            )
            self.closed = True
            transport.abort()  # the worker sees the end of its link and exits; restarted


class Hub:
    """The workers' links; the :class:`gateway.sessions.Recipients` of a node whose
    connections live in worker processes."""

    def __init__(self, backend: Backend, *, max_buffer: int) -> None:
        self.backend = backend
        self.max_buffer = max_buffer
        self.links: dict[int, WorkerLink] = {}
        self._marks: set[asyncio.Task[None]] = set()

    @property
    def count(self) -> int:
        return sum(wl.count for wl in self.links.values())

    def per_worker(self) -> dict[int, int]:
        return {i: wl.count for i, wl in sorted(self.links.items())}

    def workers_of(self, tenant: str, user: str) -> list[int]:
        """The workers holding a device of the user (tests, diagnostics)."""
        return sorted(i for i, wl in self.links.items() if (tenant, user) in wl.devices)

    # ---------------------------------------------------------------- Recipients
    def present(self, tenant: str, user: str) -> int:
        key = (tenant, user)
        return sum(wl.devices.get(key, 0) for wl in self.links.values())

    def offer_user(self, tenant: str, user: str, seq: int, frame: bytes) -> int:
        key = (tenant, user)
        n = 0
        for wl in self.links.values():
            devices = wl.devices.get(key)
            if devices:
                wl.send(link.Push(seq, tenant, user, frame))
                n += devices
        return n

    def offer_tenant(
        self,
        tenant: str,
        seq: int,
        frame: bytes,
        allows: Callable[[Iterable[str]], set[str]],
    ) -> int:
        holding = [
            (wl, wl.by_tenant[tenant]) for wl in self.links.values() if tenant in wl.by_tenant
        ]
        if not holding:
            return 0
        everyone: set[str] = set()
        for _wl, users in holding:
            everyone.update(users)
        allowed = allows(everyone)  # once for the tenant's users on every worker
        n = 0
        for wl, users in holding:
            deny = [u for u in users if u not in allowed]
            if len(deny) < len(users):
                wl.send(link.Broadcast(seq, tenant, frame, deny))
                n += sum(d for u, d in users.items() if u in allowed)
        return n

    def hold(self) -> None:
        """Nothing to hold: the node writes to its worker links (buffered streams), not to
        the clients' sockets."""

    def release(self) -> None:
        return None

    def write_user(self, tenant: str, user: str | None, frame: bytes) -> None:
        msg = link.Write(tenant, user, frame)
        for wl in self.links.values():
            if (tenant in wl.by_tenant) if user is None else ((tenant, user) in wl.devices):
                wl.send(msg)

    # --------------------------------------------------------------- one worker
    async def serve(
        self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one worker's link until it ends (the worker exited or was killed); then
        its devices are no longer present."""
        wl = self.links[index] = WorkerLink(index, writer, self.max_buffer)
        try:
            while True:
                body = await link.read(reader)
                if body is None:
                    return
                msg = link.decode_to_node(body)
                if isinstance(msg, Open):
                    self._open(wl, msg)
                elif isinstance(msg, Gone):
                    wl.remove(msg.tenant, msg.user)
                elif isinstance(msg, Mark):
                    task = asyncio.get_running_loop().create_task(self._mark(wl, msg))
                    self._marks.add(task)
                    task.add_done_callback(self._marks.discard)
        finally:
            wl.closed = True
            if self.links.get(index) is wl:
                del self.links[index]
            writer.close()
            log.info("event=gateway_worker_link_closed worker=%d devices=%d", index, wl.count)

    def _open(self, wl: WorkerLink, msg: Open) -> None:
        # one loop step: present from here on, and the backfill read now (see the docstring)
        wl.add(msg.tenant, msg.user)
        after, messages, truncated = self.backend.plan_backfill(msg.tenant, msg.user, msg.cursor)
        unseen, unread = self.backend.counts(msg.tenant, msg.user)
        wl.send(Backfill(msg.sid, after, messages, truncated, unseen, unread))

    async def _mark(self, wl: WorkerLink, msg: Mark) -> None:
        try:
            unknown = await self.backend.engage(msg.tenant, msg.user, msg.what, msg.ids)
        except Exception as exc:  # the engine refused (stopping): the client may mark again
            log.warning("event=gateway_mark_failed worker=%d error=%r", wl.index, exc)
            return
        if unknown:
            wl.send(
                Tell(
                    msg.sid,
                    frames.error("unknown_ids", f"not in your inbox: {', '.join(unknown[:10])}"),
                )
            )
        self.backend.send_counts(msg.tenant, msg.user)

    async def close(self) -> None:
        for task in list(self._marks):
            task.cancel()
        for task in list(self._marks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

"""The client SDK over an in-process transport, for the node's own engines.

The fan-out engine, the delivery workers and the gateway read and write the log as any
application does: with :class:`~broker.client.Producer` and :class:`~broker.client.Consumer`
(batching, idempotent producers, consumer groups with cooperative hand-off, commits). A
:class:`LocalClient` gives them a :class:`~broker.client.Client` whose requests go straight to
the front door's handlers (``broker/dispatch.py``) instead of a socket: no frames, no encoding
of requests or replies, the same authorization (as the node's own principal, which may use
internal topics) and the same acknowledgements (``acks=all`` waits for the fsync).

Records are still encoded into batches (that is the log's format) and fetched as raw batch
bytes, so a consumer decodes exactly what a remote one would; it checks the batches' headers
but does not hash their bodies again (:attr:`LocalClient.fetches_verified`: the node's read
just verified them).

A request the SDK awaits (:meth:`LocalClient._request_now`: produce, fetch, commit, heartbeat
...) runs its handler inline and awaits what it returns (the acknowledgement, or the
handler's coroutine: a long poll, a commit's sync) in the caller's own task: no future per
request, no task per coroutine handler, no callbacks chained. The node's stages make a fetch,
an append or two and a commit per batch, so when events trickle in (a batch per event) this
is a good part of their cost. Errors are raised as :class:`~broker.client.BrokerError` with
the code, message and retriability a remote client would read from the ``Error`` reply.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, cast

from broker import protocol as p
from broker.auth import NODE_PRINCIPAL, Principal
from broker.client import BrokerError, Client, ConnectionLost, ReplyCallback
from broker.dispatch import Pending, handler_table
from broker.errors import describe
from broker.events import EventIntake
from broker.service import BrokerService
from storage.ack import Ack


class LocalClient(Client):
    """A :class:`Client` connected to this node's front door in process."""

    # a fetch answers with the bytes of the node's own read, which verified every batch's
    # checksums (``storage/reads.py``): the consumer walks their headers, hashing nothing
    # a second time
    fetches_verified = True

    def __init__(
        self,
        service: BrokerService,
        intake: EventIntake,
        *,
        principal: Principal = NODE_PRINCIPAL,
        client_id: str = "herald-node",
    ) -> None:
        super().__init__("in-process", 0, client_id=client_id)
        self.principal = principal
        self.tenant = principal.tenant
        self._service = service
        self._handlers = handler_table(service, intake, service.config.node_id, in_process=True)
        self._local_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def connected(self) -> bool:
        return not self._closed

    async def _ensure_connected(self) -> None:
        if self._closed:
            raise ConnectionLost("client is closed")

    async def _request_now(self, msg: Any) -> p.Response:
        """Run ``msg``'s handler now and return its reply; raises :class:`BrokerError` as
        :meth:`Client._request_now` does for an ``Error`` reply. Cancelling the caller
        cancels a coroutine handler (a long poll stops waiting); an append's acknowledgement
        is private to the append, so waiting on it directly is what ``Partition.append``
        does too."""
        if self._closed:
            raise ConnectionLost("client is closed")
        msg.id = next(self._local_ids)
        try:
            outcome = self._handlers[type(msg)](self.principal, msg)
            if isinstance(outcome, Pending):
                await outcome.ack  # a fresh future: the caller yields to the loop here
                return cast(p.Response, outcome.reply)
            if asyncio.iscoroutine(outcome):
                # a coroutine handler yields to the loop itself if it answers at once (a
                # fetch with data: BrokerService.fetch): a long poll that waited was woken
                # by the loop already, and a turn more here was a turn more on the way of
                # every record the engines hand on
                return cast(p.Response, await outcome)
            reply = outcome
        except BrokerError:
            raise
        except Exception as exc:
            err = describe(exc)
            raise BrokerError(err.code, err.message, err.retriable) from exc
        # a plain handler answers without waiting: give the loop a turn as a remote reply
        # would, or a loop of such requests would never let anything else run
        await asyncio.sleep(0)
        return cast(p.Response, reply)

    def store_offsets(
        self,
        group: str,
        member_id: str | None,
        generation: int,
        offsets: dict[tuple[str, int], int],
    ) -> None:
        """Commit ``offsets`` of ``group`` without waiting for the state store's sync
        (:meth:`BrokerService.store_offsets`: durable at the node's next sync, at the latest
        its periodic one). Raises :class:`BrokerError` as a commit would."""
        if self._closed:
            raise ConnectionLost("client is closed")
        req = p.CommitOffsets(
            id=next(self._local_ids),
            group=group,
            member_id=member_id,
            generation=generation,
            offsets=[(t, i, o) for (t, i), o in offsets.items()],
        )
        try:
            self._service.store_offsets(self.principal, req)
        except Exception as exc:
            err = describe(exc)
            raise BrokerError(err.code, err.message, err.retriable) from exc

    def send_nowait(self, msg: Any) -> asyncio.Future[p.Response]:
        """Hand ``msg`` to its handler now; the future resolves to the reply (an ``Error``
        reply for a failure, as over the network)."""
        if self._closed:
            raise ConnectionLost("client is closed")
        msg.id = next(self._local_ids)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[p.Response] = loop.create_future()
        try:
            outcome = self._handlers[type(msg)](self.principal, msg)
        except Exception as exc:
            fut.set_result(_error(msg.id, exc))
            return fut
        if isinstance(outcome, Pending):
            reply = outcome.reply

            def acked(ack: asyncio.Future[Any]) -> None:
                if fut.done():
                    return
                if ack.cancelled():
                    fut.cancel()
                elif (exc := ack.exception()) is not None:
                    fut.set_result(_error(msg.id, exc))
                else:
                    fut.set_result(reply)

            outcome.ack.add_done_callback(acked)
        elif asyncio.iscoroutine(outcome):
            task = loop.create_task(outcome)
            self._tasks.add(task)

            def finished(t: asyncio.Task[Any]) -> None:
                self._tasks.discard(t)
                if fut.done():
                    return
                if t.cancelled():
                    fut.cancel()
                elif (exc := t.exception()) is not None:
                    fut.set_result(_error(msg.id, exc))
                else:
                    fut.set_result(t.result())

            task.add_done_callback(finished)
        else:
            fut.set_result(outcome)
        return fut

    def send_callback(self, msg: Any, callback: ReplyCallback, *, flush: bool = False) -> None:
        """:meth:`send_nowait`, answered through ``callback`` (see :meth:`Client.send_callback`).
        An append's acknowledgement calls it directly, in the loop turn that made the append
        durable (the partition's :class:`~storage.ack.Ack`), as the TCP server answers: a
        callback through a future would run a turn later, and a turn of a busy node's loop
        is on the way of every notification whose stages append with it. Never called
        before this returns. ``flush`` changes nothing: the request is handed over now
        either way."""
        if self._closed:
            raise ConnectionLost("client is closed")
        if type(msg) is not p.Produce:
            fut = self.send_nowait(msg)

            def done(f: asyncio.Future[p.Response]) -> None:
                callback(ConnectionLost("request cancelled") if f.cancelled() else f.result())

            fut.add_done_callback(done)
            return
        msg.id = rid = next(self._local_ids)
        loop = asyncio.get_running_loop()
        try:
            outcome = self._handlers[p.Produce](self.principal, msg)
        except Exception as exc:
            loop.call_soon(callback, _error(rid, exc))
            return
        if not isinstance(outcome, Pending):
            loop.call_soon(callback, outcome)
            return
        reply = outcome.reply

        def acked(ack: asyncio.Future[Any]) -> None:
            if ack.cancelled():
                callback(ConnectionLost("request cancelled"))
            elif (exc := ack.exception()) is not None:
                callback(_error(rid, exc))
            else:
                callback(reply)

        ack = outcome.ack
        if isinstance(ack, Ack) and not ack.done():
            ack.when_done(acked)
        else:  # a throttled append's delayed acknowledgement, or one resolved already
            ack.add_done_callback(acked)

    def flush(self) -> None:
        return None

    async def drain(self) -> None:
        return None

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _error(rid: int, exc: BaseException) -> p.Error:
    err = describe(exc)
    return p.Error(id=rid, code=err.code, message=err.message, retriable=err.retriable)

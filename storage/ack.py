"""The future of one append's acknowledgement, with room for one callback called at once.

An ``asyncio.Future``'s done-callbacks never run when it is resolved: ``set_result`` puts
them on the loop's ready queue and they run in the loop's next turn. For a lone append on
the TCP server that is one turn more between the fdatasync and the reply: the flusher
resolves the durable future at the end of the sync's turn, the loop polls its sockets
(an ``epoll_wait``), then the next turn's ready queue writes the reply. :class:`Ack` is a
future whose resolver (the partition's flusher, :mod:`storage.flush`) also calls one
*direct* callback, registered with :meth:`Ack.when_done`, right after the result is set:
the reply leaves in the turn that made the append durable. Everything else about it is an
ordinary future (await it, ``add_done_callback``, ``asyncio.wait``...).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("herald.storage")


class Ack(asyncio.Future[None]):
    """An acknowledgement future that may carry one direct callback (:meth:`when_done`).

    The direct callback is called inside whatever resolves the future (``set_result``,
    ``set_exception``, ``cancel``), after the outcome is set and before that code goes on:
    it must be short, must not raise (one that does is logged, as a loop callback would
    be) and must not resolve other acknowledgements itself. Callbacks added with
    ``add_done_callback`` still run from the loop, as for any future."""

    __slots__ = ("_direct",)

    def __init__(self, *, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._direct: Callable[[Ack], None] | None = None

    def when_done(self, callback: Callable[[Ack], None]) -> None:
        """Call ``callback(self)`` as soon as this future is resolved (at once if it is
        already). One direct callback per future: a second replaces the first."""
        if self.done():
            callback(self)
        else:
            self._direct = callback

    def set_result(self, result: None, /) -> None:
        super().set_result(result)
        self._call_direct()

    def set_exception(self, exception: type | BaseException, /) -> None:
        super().set_exception(exception)
        self._call_direct()

    def cancel(self, msg: Any | None = None) -> bool:
        cancelled = super().cancel(msg)
        if cancelled:
            self._call_direct()
        return cancelled

    def _call_direct(self) -> None:
        callback = self._direct
        if callback is None:
            return
        self._direct = None
        try:
            callback(self)
        except Exception:
            log.exception("event=ack_callback_failed callback=%r", callback)

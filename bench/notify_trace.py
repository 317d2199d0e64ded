"""Where one event's time goes between ``POST /events`` and the channel's send: stage
boundaries timed in the node's process, for ``python -m bench.notify latency --trace``.

:func:`install` wraps (in the benchmark's node only; nothing in the engine knows) the points an
event passes, and records ``time.perf_counter_ns()`` (CLOCK_MONOTONIC on Linux: one clock for
every process of the machine, so the benchmark joins them with its own POST and arrival
times) per event id:

- ``intake``: ``EventIntake.publish`` called (the HTTP handler has the body);
- ``durable``: the intake's acknowledgement resolved (``__events`` fsynced: the answer goes);
- ``fanout``: the fan-out stage got the event from its fetch;
- ``out_acked``: the fan-out's outputs for it (deliveries, audit) appended and fsynced;
- ``worker``: the channel's worker got the delivery from its fetch;
- ``send``: the channel's ``send`` called; ``sent``: it returned.

:func:`dump` writes them as JSON lines at exit.
"""

from __future__ import annotations

import asyncio
import atexit
import time
from collections import defaultdict
from typing import Any

import msgspec

MARKS = ("intake", "durable", "fanout", "out_acked", "worker", "send", "sent")
_marks: defaultdict[str, dict[str, int]] = defaultdict(dict)


def _mark(event_id: str, what: str) -> None:
    _marks[event_id].setdefault(what, time.perf_counter_ns())


def install(path: str) -> None:
    from broker.events import EventIntake, StoredEvent
    from channels.webhook import WebhookChannel
    from notify.delivery import DeliveryWorker
    from notify.fanout import Fanout
    from notify.pages import decode_delivery_page, is_page

    publish = EventIntake.publish

    def traced_publish(self: Any, principal: Any, events: Any, *, batch: bool) -> Any:
        ids = [e.event_id for e in events if e.event_id]
        for eid in ids:
            _mark(eid, "intake")
        accepted = publish(self, principal, events, batch=batch)
        if accepted.ack is not None:

            def durable(_f: asyncio.Future[None]) -> None:
                for eid in ids:
                    _mark(eid, "durable")

            accepted.ack.add_done_callback(durable)
        return accepted

    EventIntake.publish = traced_publish  # type: ignore[method-assign]

    decode_event = msgspec.json.Decoder(StoredEvent).decode
    fan_handle = Fanout.handle

    async def traced_fan_handle(self: Any, recs: list[Any]) -> Any:
        ids = []
        for r in recs:
            eid = decode_event(r.value).event_id
            ids.append(eid)
            _mark(eid, "fanout")
        self._trace_ids = ids
        return await fan_handle(self, recs)

    Fanout.handle = traced_fan_handle  # type: ignore[method-assign]
    fan_finish = Fanout._finish

    def traced_fan_finish(self: Any, taken: Any, *args: Any) -> Any:
        ids = getattr(self, "_trace_ids", [])
        send = taken.send

        async def traced_send(producer: Any) -> int:
            n: int = await send(producer)
            for eid in ids:
                _mark(eid, "out_acked")
            return n

        taken.send = traced_send
        return fan_finish(self, taken, *args)

    Fanout._finish = traced_fan_finish  # type: ignore[method-assign]

    class _Eid(msgspec.Struct):
        event_id: str

    decode_eid = msgspec.json.Decoder(_Eid).decode
    work_handle = DeliveryWorker.handle

    async def traced_work_handle(self: Any, recs: list[Any]) -> Any:
        for r in recs:
            if is_page(r.value):
                _mark(decode_delivery_page(r.value).event_id, "worker")
            else:
                _mark(decode_eid(r.value).event_id, "worker")
        return await work_handle(self, recs)

    DeliveryWorker.handle = traced_work_handle  # type: ignore[method-assign]
    channel_send = WebhookChannel.send

    async def traced_send(self: Any, delivery: Any) -> Any:
        _mark(delivery.event_id, "send")
        try:
            return await channel_send(self, delivery)
        finally:
            _mark(delivery.event_id, "sent")

    WebhookChannel.send = traced_send  # type: ignore[method-assign]
    atexit.register(dump, path)


def dump(path: str) -> None:
    with open(path, "wb") as f:
        for eid, marks in _marks.items():
            f.write(msgspec.json.encode({"event_id": eid, **marks}) + b"\n")

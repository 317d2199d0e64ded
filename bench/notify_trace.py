"""Where one event's time goes between ``POST /events`` and the channel's send (or the
in-app message's push to its WebSocket): stage boundaries timed in the node's process, for
``python -m bench.notify latency --trace`` and ``python -m bench.gateway_bench latency
--trace``.

:func:`install` wraps (in the benchmark's node only; nothing in the engine knows) the points an
event passes, and records ``time.perf_counter_ns()`` (CLOCK_MONOTONIC on Linux: one clock for
every process of the machine, so the benchmark joins them with its own POST and arrival
times) per event id:

- ``intake``: ``EventIntake.publish`` called (the HTTP handler has the body);
- ``durable``: the intake's acknowledgement resolved (``__events`` fsynced: the answer goes);
- ``fanout``: the fan-out stage got the event from its fetch;
- ``out_acked``: the fan-out's outputs for it (deliveries, audit) appended and fsynced;
- ``worker``: the channel's worker got the delivery from its fetch;
- ``send``: the channel's ``send`` called; ``sent``: it returned;
- ``inapp_acked``: the worker's outputs for it (the ``__inapp`` record, audit) appended and
  fsynced;
- ``out_acked:handled``, ``inapp_acked:handled``: the fan-out's (the worker's) ``handle``
  returned for its batch; ``...:sending``: the batch's outputs are being appended (its
  ``_finish`` task started);
- ``reader``: the gateway's reader got the ``__inapp`` record from its fetch; ``pushed``: the
  reader stored it in the inbox and wrote it to the user's connections.

:func:`dump` writes them as JSON lines at exit. ``python -m bench.notify_trace FILE ARGS``
runs ``herald ARGS`` with the marks installed (the gateway benchmark's node).
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

MARKS = (
    "intake",
    "durable",
    "fanout",
    "out_acked",
    "worker",
    "send",
    "sent",
    "inapp_acked",
    "reader",
    "pushed",
    "out_acked:handled",
    "out_acked:sending",
    "inapp_acked:handled",
    "inapp_acked:sending",
)
_marks: defaultdict[str, dict[str, int]] = defaultdict(dict)


def _mark(event_id: str, what: str) -> None:
    _marks[event_id].setdefault(what, time.perf_counter_ns())


def install(path: str) -> None:
    from broker.events import EventIntake, StoredEvent
    from channels.inapp import InAppMessage
    from channels.webhook import WebhookChannel
    from gateway.reader import Reader
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
    Fanout._finish = _marking_finish(Fanout._finish, "out_acked")  # type: ignore[method-assign]

    class _Eid(msgspec.Struct):
        event_id: str

    decode_eid = msgspec.json.Decoder(_Eid).decode
    work_handle = DeliveryWorker.handle

    async def traced_work_handle(self: Any, recs: list[Any]) -> Any:
        ids = []
        for r in recs:
            if is_page(r.value):
                ids.append(decode_delivery_page(r.value).event_id)
            else:
                ids.append(decode_eid(r.value).event_id)
            _mark(ids[-1], "worker")
        self._trace_ids = ids
        return await work_handle(self, recs)

    DeliveryWorker.handle = traced_work_handle  # type: ignore[method-assign]
    DeliveryWorker._finish = _marking_finish(DeliveryWorker._finish, "inapp_acked")  # type: ignore[method-assign]
    decode_inapp = msgspec.json.Decoder(InAppMessage).decode
    read_handle = Reader.handle

    async def traced_read_handle(self: Any, recs: Sequence[Any]) -> Any:
        ids = []
        for r in recs:
            try:
                ids.append(decode_inapp(r.value).event_id)
            except msgspec.DecodeError:  # a broadcast: a stored event
                continue
            _mark(ids[-1], "reader")
        try:
            return await read_handle(self, recs)
        finally:
            for eid in ids:
                _mark(eid, "pushed")

    Reader.handle = traced_read_handle  # type: ignore[method-assign]
    channel_send = WebhookChannel.send

    async def traced_send(self: Any, delivery: Any) -> Any:
        _mark(delivery.event_id, "send")
        try:
            return await channel_send(self, delivery)
        finally:
            _mark(delivery.event_id, "sent")

    WebhookChannel.send = traced_send  # type: ignore[method-assign]
    atexit.register(dump, path)


def _marking_finish(finish: Any, what: str) -> Any:
    """A stage's ``_finish`` that marks ``what`` for the events of its batch (the ids its
    traced ``handle`` kept) once the batch's outputs are appended and fsynced."""

    def traced_finish(self: Any, taken: Any, *args: Any) -> Any:
        ids = getattr(self, "_trace_ids", [])
        for eid in ids:
            _mark(eid, f"{what}:handled")
        send = taken.send

        async def traced_send(producer: Any) -> int:
            for eid in ids:
                _mark(eid, f"{what}:sending")
            n: int = await send(producer)
            for eid in ids:
                _mark(eid, what)
            return n

        taken.send = traced_send
        return finish(self, taken, *args)

    return traced_finish


def breakdown(path: Path, traced: dict[int, dict[str, tuple[int, int]]], steps: list[str]) -> str:
    """Per rate, p50 / p99 (ms) of each segment of an event's way along ``steps`` (``post``,
    marks of :data:`MARKS`, ``arrived``), from the node's marks in ``path`` and the
    benchmark's POST and arrival times (``traced``: rate -> event id -> (post, arrival),
    perf_counter_ns)."""
    marks: dict[str, dict[str, int]] = {}
    if path.exists():
        for line in path.read_bytes().splitlines():
            m = msgspec.json.decode(line)
            marks[m.pop("event_id")] = m
    out = [
        "Segments of an event's way (ms, p50 / p99; `--trace`): " + " -> ".join(steps),
        "",
        "| Rate | events | " + " | ".join(f"{a}->{b}" for a, b in itertools.pairwise(steps)) + " |",
        "|---|---|" + "---|" * (len(steps) - 1),
    ]
    for rate, events in traced.items():
        seg: list[list[float]] = [[] for _ in steps[1:]]
        n = 0
        for eid, (t0, arrived) in events.items():
            m = marks.get(eid)
            if m is None or any(k not in m for k in steps[1:-1]):
                continue
            n += 1
            ts = [t0, *(m[k] for k in steps[1:-1]), arrived]
            for i in range(len(seg)):
                seg[i].append((ts[i + 1] - ts[i]) / 1e6)
        cells = []
        for values in seg:
            values.sort()
            if not values:
                cells.append("-")
                continue
            p99 = values[min(len(values) - 1, int(0.99 * len(values)))]
            cells.append(f"{values[len(values) // 2]:.1f} / {p99:.1f}")
        out.append(f"| {rate:,}/s | {n:,} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def dump(path: str) -> None:
    with open(path, "wb") as f:
        for eid, marks in _marks.items():
            f.write(msgspec.json.encode({"event_id": eid, **marks}) + b"\n")


if __name__ == "__main__":
    from herald import cli

    install(sys.argv[1])
    sys.exit(cli.main(sys.argv[2:]))

"""Prometheus metrics for ``GET /metrics`` (the ``metrics`` scope). Counters on the hot path
are plain integers the code already keeps (connection stats, per-partition offsets); they
become metric families only when scraped, so serving requests costs no metric-library calls.

Cost at scale: the node-wide families are a few dozen lines (``prometheus_client``). The
per-partition and per-group families grow with topics and groups (200,000 groups of
offsets are hundreds of thousands of lines), so they are written by hand from a snapshot:
the loop copies what it owns (high watermarks, live group sizes), and a worker thread scans
the committed offsets in LMDB and formats the text, so a scrape never holds the loop for
the length of the answer. Concurrent scrapes of the same view share one rendering.

Tenancy: topics are labelled by their tenant and the tenant's name for them. The operator
(tenant ``*``) sees every topic, group (named ``tenant/group``) and tenant's quotas, and the
notification families (:class:`ProductCollector`: fan-out, sends, transitions by channel and
status, the gateway, SMS receipts; counts over every tenant); a tenant's key with the
``metrics`` scope sees only its own topics, groups and quotas. Label values are escaped, so no
topic or group name can forge a line. Labels are sorted and values formatted as
``prometheus_client`` writes them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from broker.auth import OPERATOR_TENANT, Principal
from broker.groups import StoredOffset
from broker.http import HttpStats
from broker.listener import NodeAdmission
from broker.quotas import COUNTS, UNLIMITED, quota_key
from broker.service import BrokerService
from broker.tcp import TcpServer
from broker.topics import local_name
from channels.base import HasBreakers
from storage.kv import Table

_ESCAPES: Final = {ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n"} | {
    c: "\ufffd" for c in range(32) if c != ord("\n")
}


def _value(n: int) -> str:
    # as prometheus_client writes a sample's value (1.0, 1.2345e+06), so the text does not
    # change form with the way it was rendered
    return str(floatToGoString(n))  # type: ignore[no-untyped-call]


def label(value: str) -> str:
    """A label value escaped for the Prometheus text format (and any control character
    replaced), so a name cannot end its line or its quotes."""
    return value.translate(_ESCAPES)


@dataclass(frozen=True, slots=True)
class Stats:
    """What the metrics are read from."""

    service: BrokerService
    tcp: TcpServer
    http: HttpStats
    admission: NodeAdmission
    # how far the notifications' audit index is behind (notify/audit.py), None: no engine
    audit_lag_s: Callable[[], float] | None = None


class NodeCollector(Collector):
    """The node-wide families (a fixed, small number of lines)."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "herald_disk_free_bytes",
            "Free bytes on the data directory's filesystem",
            value=self.stats.service.disk_free_bytes(),
        )
        s = self.stats.tcp.stats
        yield GaugeMetricFamily("herald_tcp_connections", "Open TCP connections", value=s.open)
        yield CounterMetricFamily(
            "herald_tcp_connections", "TCP connections accepted", value=s.total
        )
        yield CounterMetricFamily(
            "herald_tcp_connections_rejected",
            "TCP connections refused at accept (see herald_connections_refused)",
            value=s.rejected,
        )
        yield CounterMetricFamily("herald_tcp_requests", "TCP requests", value=s.requests)
        yield CounterMetricFamily(
            "herald_tcp_request_errors", "TCP requests answered with an error", value=s.errors
        )
        kv = self.stats.service.kv
        yield CounterMetricFamily(
            "herald_state_store_syncs",
            "fsyncs of the state store (LMDB: offset commits, producer ids, topic and "
            "notification rows), each shared by the writes waiting for it",
            value=kv.syncs,
        )
        yield CounterMetricFamily(
            "herald_state_store_sync_seconds",
            "Time those fsyncs took (over 20 ms each: event=state_store_sync_slow)",
            value=kv.sync_seconds,
        )
        h = self.stats.http
        yield CounterMetricFamily("herald_http_requests", "HTTP requests", value=h.requests)
        yield CounterMetricFamily(
            "herald_http_request_errors", "HTTP requests answered 4xx/5xx", value=h.errors
        )
        yield CounterMetricFamily("herald_events_ingested", "Events accepted", value=h.events)
        yield CounterMetricFamily(
            "herald_http_requests_deferred",
            "Large HTTP requests that waited for a later turn of the event loop: the port's "
            "per-turn body budget was spent (they are served in arrival order)",
            value=h.deferred,
        )
        if self.stats.audit_lag_s is not None:
            yield GaugeMetricFamily(
                "herald_notify_audit_lag_seconds",
                "How far GET /events/{id} and the feeds may be behind: 0 while the audit "
                "index holds every transition, else the time since it last did",
                value=self.stats.audit_lag_s(),
            )
        yield from self._admission()

    def _admission(self) -> Iterator[Metric]:
        a = self.stats.admission
        table = a.table
        open_ = GaugeMetricFamily(
            "herald_connections", "Open connections by listener", labels=["listener"]
        )
        for name, count in table.open_by_listener().items():
            open_.add_metric([name], count)
        yield open_
        yield GaugeMetricFamily(
            "herald_connections_pending",
            "Connections that have not shown a key (or a first request) yet",
            value=table.pending,
        )
        yield GaugeMetricFamily(
            "herald_connection_capacity",
            "Connections the node may hold: open-files limit minus admission.fd-reserve",
            value=table.capacity,
        )
        refused = CounterMetricFamily(
            "herald_connections_refused", "Connections refused at accept", labels=["reason"]
        )
        for reason, count in sorted(table.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        yield CounterMetricFamily(
            "herald_connections_evicted",
            "Pending connections closed to make room for new ones",
            value=table.evicted,
        )
        yield CounterMetricFamily(
            "herald_connections_expired",
            "Pending connections closed at admission.handshake-timeout-ms",
            value=table.expired,
        )
        yield CounterMetricFamily(
            "herald_auth_failures", "API keys presented that match none", value=a.auth_failures
        )
        yield CounterMetricFamily(
            "herald_auth_throttled",
            "Key checks refused because the source address failed too often",
            value=a.throttle.throttled,
        )
        yield CounterMetricFamily(
            "herald_request_timeouts",
            "HTTP requests whose head or body missed its deadline",
            value=a.request_timeouts,
        )
        yield CounterMetricFamily(
            "herald_send_timeouts",
            "Connections closed because their replies did not move",
            value=a.send_timeouts,
        )
        yield CounterMetricFamily(
            "herald_idle_closed", "Idle TCP connections closed", value=a.idle_closed
        )
        yield GaugeMetricFamily(
            "herald_request_bytes_in_flight",
            "Request bytes being received (bodies, partial frames)",
            value=a.requests.used,
        )
        yield GaugeMetricFamily(
            "herald_reply_bytes_in_flight",
            "Fetch reply bytes reserved or queued for clients",
            value=a.replies.used,
        )


class QuotaCollector(Collector):
    """The per-tenant quota families (``broker/quotas.py``) of one view: every tenant's for
    the operator (and the node's totals), one tenant's own otherwise."""

    def __init__(self, stats: Stats, tenant: str | None) -> None:
        self.stats = stats
        self.tenant = tenant  # None: every tenant

    def collect(self) -> Iterator[Metric]:
        quotas = self.stats.service.quotas
        usage = GaugeMetricFamily(
            "herald_quota_usage",
            "What a tenant holds of a count quota (bytes for state-store-bytes)",
            labels=["tenant", "quota"],
        )
        limit = GaugeMetricFamily(
            "herald_quota_limit",
            "A tenant's quota (bytes per second for the rates); absent when unlimited",
            labels=["tenant", "quota"],
        )
        refused = CounterMetricFamily(
            "herald_quota_refused",
            "Requests refused with quota_exceeded",
            labels=["tenant", "quota"],
        )
        traffic = CounterMetricFamily(
            "herald_tenant_bytes",
            "Bytes a tenant produced (batches, events) or fetched",
            labels=["tenant", "direction"],
        )
        throttled = CounterMetricFamily(
            "herald_quota_throttle_seconds",
            "Time answers were held back because a tenant was over its rate quota",
            labels=["tenant", "direction"],
        )
        for tenant, u in sorted(quotas.tenants.items()):
            if self.tenant is not None and tenant != self.tenant:
                continue
            for name in COUNTS:
                usage.add_metric([tenant, quota_key(name)], u.used(name))
            for name, value in u.limits.items():
                if value != UNLIMITED:
                    limit.add_metric([tenant, quota_key(name)], value)
            for name, n in u.refused.items():
                refused.add_metric([tenant, quota_key(name)], n)
            traffic.add_metric([tenant, "produce"], u.produced_bytes)
            traffic.add_metric([tenant, "fetch"], u.fetched_bytes)
            for direction, ms in u.throttle_ms.items():
                throttled.add_metric([tenant, direction], ms / 1000)
        yield usage
        yield limit
        yield refused
        yield traffic
        yield throttled
        if self.tenant is not None:
            return
        cfg = quotas.config
        node = GaugeMetricFamily(
            "herald_node_quota_usage", "What the node holds of its totals", labels=["quota"]
        )
        node.add_metric(["node-topics"], quotas.node_topics)
        node.add_metric(["node-partitions"], quotas.node_partitions)
        yield node
        node_limit = GaugeMetricFamily(
            "herald_node_quota_limit", "The node's totals (absent: unlimited)", labels=["quota"]
        )
        for name, value in (
            ("node-topics", cfg.node_topics),
            ("node-partitions", cfg.node_partitions),
        ):
            if value:
                node_limit.add_metric([name], value)
        yield node_limit
        node_refused = CounterMetricFamily(
            "herald_node_quota_refused", "Creates refused at a node total", labels=["quota"]
        )
        for name, n in quotas.node_refused.items():
            node_refused.add_metric([quota_key(name)], n)
        yield node_refused


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """What the loop owns, copied for the worker thread."""

    # tenant, the tenant's name for the topic, index, high watermark, log start, size,
    # corruptions detected, quarantined ranges, offline (0/1), fdatasync rounds, of those
    # the inline ones and the AIO ones
    partitions: list[tuple[str, str, int, int, int, int, int, int, int, int, int, int]]
    members: list[tuple[str, int]]  # group label, live members
    group_prefix: str  # "" for the operator, "tenant/" for a tenant


def _render_scaled(snap: _Snapshot, offsets: Table[StoredOffset]) -> bytes:
    """The per-partition and per-group families, as text (runs in a worker thread)."""
    out: list[str] = []
    # a group's offsets name its tenant's topics by the tenant's names
    hw = {(row[0], row[1], row[2]): row[3] for row in snap.partitions}
    # escaped names and the values once, for every family
    rows = [(label(row[0]), label(row[1]), str(row[2]), row[3:]) for row in snap.partitions]
    for name, kind, help_, col in (
        ("herald_partition_high_watermark", "gauge", "Offset below which records are durable", 0),
        ("herald_partition_log_start_offset", "gauge", "First offset still stored", 1),
        ("herald_partition_size_bytes", "gauge", "Bytes held by the partition's segments", 2),
        (
            "herald_partition_corruptions_detected",
            "counter",
            "Damaged ranges found in the partition's log (by recovery or by reads)",
            3,
        ),
        (
            "herald_partition_quarantined_ranges",
            "gauge",
            "Damaged ranges quarantined and never served",
            4,
        ),
        (
            "herald_partition_offline",
            "gauge",
            "1 if the partition stopped taking writes after an I/O error it cannot trust",
            5,
        ),
        (
            "herald_partition_syncs",
            "counter",
            "fdatasync rounds of the partition's log (each answers every append it covers)",
            6,
        ),
        (
            "herald_partition_inline_syncs",
            "counter",
            "Of those rounds, the lone appends written and synced on the event loop",
            7,
        ),
        (
            "herald_partition_aio_syncs",
            "counter",
            "Of those rounds, the ones whose fdatasyncs the kernel ran as AIO (no I/O thread)",
            8,
        ),
    ):
        # a counter's samples end in _total (what prometheus_client wrote before)
        sample = f"{name}_total" if kind == "counter" else name
        out.append(f"# HELP {name} {help_}\n# TYPE {name} {kind}\n")
        out.extend(
            f'{sample}{{partition="{p}",tenant="{tenant}",topic="{t}"}} {_value(values[col])}\n'
            for tenant, t, p, values in rows
        )
    out.append(
        "# HELP herald_group_lag High watermark minus committed offset\n"
        "# TYPE herald_group_lag gauge\n"
    )
    cut = len(snap.group_prefix)
    for key, stored in offsets.scan(snap.group_prefix):
        # from the right: a topic name has no NUL, a group name might
        group, topic, part = key.decode("utf-8", "replace").rsplit("\x00", 2)
        index = int(part)
        high = hw.get((group.partition("/")[0], topic, index))
        if high is None:
            continue  # a topic deleted, or not this tenant's
        out.append(
            f'herald_group_lag{{group="{label(group[cut:])}",partition="{index}",'
            f'topic="{label(topic)}"}} {_value(high - stored.offset)}\n'
        )
    out.append(
        "# HELP herald_group_members Live group members\n# TYPE herald_group_members gauge\n"
    )
    out.extend(f'herald_group_members{{group="{label(g)}"}} {_value(n)}\n' for g, n in snap.members)
    return "".join(out).encode()


class ProductCollector(Collector):
    """The notification families, read from counters the engine, the gateway and the SMS
    hooks keep as plain integers (operator only: they count over every tenant). Each part
    may be absent (a node without it); with gateway worker processes the sessions are the
    hub's count of the workers' devices, and the cut-offs (made in the workers) are not
    counted here."""

    def __init__(self, engine: Any = None, gateway: Any = None, sms: Any = None) -> None:
        self.engine = engine  # notify.engine.Engine
        self.gateway = gateway  # gateway.server.Gateway
        self.sms = sms  # notify.sms_http.SmsInbound

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        if engine is not None:
            fanout = engine.fanout
            if fanout is not None:
                yield CounterMetricFamily(
                    "herald_notify_events", "Events the fan-out handled", value=fanout.events
                )
                yield CounterMetricFamily(
                    "herald_notify_recipients",
                    "Recipients the fan-out resolved (one run each)",
                    value=fanout.recipients,
                )
                yield CounterMetricFamily(
                    "herald_notify_inapp_handed_over",
                    "In-app deliveries the fan-out handed straight to the in-app worker "
                    "(the rest went through __deliver.inapp)",
                    value=fanout.handed_over,
                )
            sends = CounterMetricFamily(
                "herald_notify_sends",
                "Sends a channel's worker made, by outcome: delivered (the provider took it), "
                "failed (a retry or a permanent failure); skipped: deliveries not sent "
                "(a repeat, a legal opt-out found at the send)",
                labels=["channel", "outcome"],
            )
            latency = HistogramMetricFamily(
                "herald_notify_delivery_seconds",
                "From the fan-out making a delivery to the channel delivering it (the provider "
                "took it; in-app: appended and shown), retries included",
                labels=["channel"],
            )
            breakers = GaugeMetricFamily(
                "herald_channel_breakers",
                "Circuit breakers of a channel's providers or endpoints, by state (closed, "
                "open: not tried until its cool-down ends, half_open: probing)",
                labels=["channel", "state"],
            )
            for name, worker in sorted(engine.workers.items()):
                sends.add_metric([name, "delivered"], worker.delivered)
                sends.add_metric([name, "failed"], worker.sent - worker.delivered)
                sends.add_metric([name, "skipped"], worker.skipped)
                lat = worker.latency
                latency.add_metric([name], lat.cumulative(), lat.sum_s)
                if isinstance(worker.channel, HasBreakers):
                    states = worker.channel.breaker_states()
                    for state in ("closed", "open", "half_open"):
                        breakers.add_metric([name, state], states.count(state))
            yield sends
            yield latency
            yield breakers
            transitions = CounterMetricFamily(
                "herald_notify_transitions",
                "Delivery transitions (and engagements) the audit index folded, by channel "
                "(* for a run-level transition or an engagement) and status",
                labels=["channel", "status"],
            )
            for (channel, status), n in sorted(engine.index.transitions.items()):
                transitions.add_metric([label(channel), label(status)], n)
            yield transitions
        gateway = self.gateway
        if gateway is not None:
            table = gateway.sessions
            hub = gateway.hub
            yield GaugeMetricFamily(
                "herald_gateway_sessions",
                "Devices connected (with gateway.workers: to every worker process)",
                value=hub.count if hub is not None else table.count,
            )
            if hub is not None:
                per_worker = GaugeMetricFamily(
                    "herald_gateway_worker_sessions",
                    "Devices connected to each gateway worker process",
                    labels=["worker"],
                )
                for index, n in sorted(hub.per_worker().items()):
                    per_worker.add_metric([str(index)], n)
                yield per_worker
            cut = CounterMetricFamily(
                "herald_gateway_cut_offs",
                "Sessions the gateway closed on its own, by reason (slow_consumer: a full send "
                "buffer; too_fast: over messages-per-second...)",
                labels=["reason"],
            )
            for why, n in sorted(table.cut_offs.items()):
                cut.add_metric([label(why)], n)
            yield cut
            reader = gateway.reader
            if reader is not None:
                yield CounterMetricFamily(
                    "herald_gateway_messages_pushed",
                    "In-app messages and broadcasts written to sessions",
                    value=reader.pushed,
                )
        sms = self.sms
        if sms is not None:
            receipts = CounterMetricFamily(
                "herald_sms_receipts",
                "Delivery receipts taken at POST /hooks/sms/status, by MessageStatus and what "
                "they did (invalidated, opted_out, noted, none, ignored)",
                labels=["status", "action"],
            )
            for (status, action), n in sorted(sms.receipts.items()):
                receipts.add_metric([label(status), action], n)
            yield receipts


class Metrics:
    """Renders ``/metrics`` for a principal (see the module docstring)."""

    def __init__(
        self,
        stats: Stats,
        offsets: Table[StoredOffset],
        product: ProductCollector | None = None,
    ) -> None:
        self.stats = stats
        self.offsets = offsets
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(stats))
        self.product = CollectorRegistry(auto_describe=False)
        if product is not None:
            self.product.register(product)
        self._rendering: dict[str, asyncio.Future[bytes]] = {}

    async def body(self, principal: Principal) -> bytes:
        view = "*" if principal.operator else principal.tenant
        running = self._rendering.get(view)
        if running is not None:
            return await asyncio.shield(running)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        self._rendering[view] = fut
        try:
            snap = self._snapshot(principal)
            quotas = CollectorRegistry(auto_describe=False)
            quotas.register(QuotaCollector(self.stats, None if principal.operator else view))
            head = generate_latest(self.registry) + generate_latest(quotas)
            if principal.operator:
                head += generate_latest(self.product)
            scaled = await loop.run_in_executor(None, _render_scaled, snap, self.offsets)
            body = head + scaled
            fut.set_result(body)
            return body
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: the waiters, if any, get it too
            raise
        finally:
            del self._rendering[view]

    def _snapshot(self, principal: Principal) -> _Snapshot:
        service = self.stats.service
        topics = service.topics
        operator = principal.operator
        owners: dict[str, tuple[str, str]] = {}  # stored name -> (tenant, its name)
        partitions = []
        for (stored, index), part in service.log.partitions.items():
            owner = owners.get(stored)
            if owner is None:
                tenant = topics.owner_of(stored) or OPERATOR_TENANT
                owner = owners[stored] = (tenant, local_name(tenant, stored))
            if operator or owner[0] == principal.tenant:
                partitions.append(
                    (
                        owner[0],
                        owner[1],
                        index,
                        part.high_watermark,
                        part.log_start_offset,
                        part.size_bytes,
                        part.corruptions_detected,
                        len(part.quarantined),
                        int(part.offline),
                        part.syncs,
                        part.inline_syncs,
                        part.aio_syncs,
                    )
                )
        prefix = "" if operator else f"{principal.tenant}/"
        cut = len(prefix)
        members = [
            (name[cut:], len(group.members))
            for name, group in service.groups.groups.items()
            if group.members and name.startswith(prefix)
        ]
        return _Snapshot(partitions, members, prefix)

"""Prometheus metrics. Counters on the hot path are plain integers the code already keeps
(connection stats, per-partition offsets); a collector turns them into metric families when
scraped, so serving requests costs no metric-library calls."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.auth import OPERATOR_TENANT
from broker.http import HttpStats
from broker.quotas import COUNTS, UNLIMITED, quota_key
from broker.service import BrokerService
from broker.tcp import TcpServer
from broker.topics import local_name


@dataclass(frozen=True, slots=True)
class Stats:
    """What the metrics are read from."""

    service: BrokerService
    tcp: TcpServer
    http: HttpStats


class NodeCollector(Collector):
    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        service = self.stats.service
        hw = GaugeMetricFamily(
            "herald_partition_high_watermark",
            "Offset below which records are durable",
            labels=["tenant", "topic", "partition"],
        )
        start = GaugeMetricFamily(
            "herald_partition_log_start_offset",
            "First offset still stored",
            labels=["tenant", "topic", "partition"],
        )
        size = GaugeMetricFamily(
            "herald_partition_size_bytes",
            "Bytes held by the partition's segments",
            labels=["tenant", "topic", "partition"],
        )
        corrupt = CounterMetricFamily(
            "herald_partition_corruptions_detected",
            "Damaged ranges found in the partition's log (by recovery or by reads)",
            labels=["tenant", "topic", "partition"],
        )
        quarantined = GaugeMetricFamily(
            "herald_partition_quarantined_ranges",
            "Damaged ranges quarantined and never served",
            labels=["tenant", "topic", "partition"],
        )
        offline = GaugeMetricFamily(
            "herald_partition_offline",
            "1 if the partition stopped taking writes after an I/O error it cannot trust",
            labels=["tenant", "topic", "partition"],
        )
        syncs = CounterMetricFamily(
            "herald_partition_syncs",
            "fdatasync rounds of the partition's log (each answers every append it covers)",
            labels=["tenant", "topic", "partition"],
        )
        inline_syncs = CounterMetricFamily(
            "herald_partition_inline_syncs",
            "Of those rounds, the lone appends written and synced on the event loop",
            labels=["tenant", "topic", "partition"],
        )
        # topics are per tenant: labelled by the owner and the owner's name for the topic
        names: dict[str, tuple[str, str]] = {}
        for (stored, index), part in service.log.partitions.items():
            owner_name = names.get(stored)
            if owner_name is None:
                owner = service.topics.owner_of(stored) or OPERATOR_TENANT
                owner_name = names[stored] = (owner, local_name(owner, stored))
            labels = [*owner_name, str(index)]
            hw.add_metric(labels, part.high_watermark)
            start.add_metric(labels, part.log_start_offset)
            size.add_metric(labels, part.size_bytes)
            corrupt.add_metric(labels, part.corruptions_detected)
            quarantined.add_metric(labels, len(part.quarantined))
            offline.add_metric(labels, int(part.offline))
            syncs.add_metric(labels, part.syncs)
            inline_syncs.add_metric(labels, part.inline_syncs)
        yield hw
        yield start
        yield size
        yield corrupt
        yield quarantined
        yield offline
        yield syncs
        yield inline_syncs
        yield GaugeMetricFamily(
            "herald_disk_free_bytes",
            "Free bytes on the data directory's filesystem",
            value=service.disk_free_bytes(),
        )
        lag = GaugeMetricFamily(
            "herald_group_lag",
            "High watermark minus committed offset",
            labels=["group", "topic", "partition"],
        )
        members = GaugeMetricFamily("herald_group_members", "Live group members", labels=["group"])
        for name, group in service.groups.groups.items():
            members.add_metric([name], len(group.members))
            for topic, index, committed in service.groups.group_offsets(name):
                # the group's names are its tenant's: its partitions are the tenant's topic's
                where = service.topics.resolve_in(group.tenant, topic)
                found = service.log.partitions.get((where, index)) if where else None
                if found is not None:
                    lag.add_metric(
                        [name, topic, str(index)], found.high_watermark - committed.offset
                    )
        yield lag
        yield members
        yield from self.quotas()
        s = self.stats.tcp.stats
        yield GaugeMetricFamily("herald_tcp_connections", "Open TCP connections", value=s.open)
        yield CounterMetricFamily(
            "herald_tcp_connections", "TCP connections accepted", value=s.total
        )
        yield CounterMetricFamily(
            "herald_tcp_connections_rejected",
            "Connections refused at the limit",
            value=s.rejected,
        )
        yield CounterMetricFamily("herald_tcp_requests", "TCP requests", value=s.requests)
        yield CounterMetricFamily(
            "herald_tcp_request_errors", "TCP requests answered with an error", value=s.errors
        )
        h = self.stats.http
        yield CounterMetricFamily("herald_http_requests", "HTTP requests", value=h.requests)
        yield CounterMetricFamily(
            "herald_http_request_errors", "HTTP requests answered 4xx/5xx", value=h.errors
        )
        yield CounterMetricFamily("herald_events_ingested", "Events accepted", value=h.events)

    def quotas(self) -> Iterator[Metric]:
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


def make_registry(stats: Stats) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(stats))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)

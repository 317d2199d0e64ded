"""Prometheus metrics. Counters on the hot path are plain integers the code already keeps
(connection stats, per-partition offsets); a collector turns them into metric families when
scraped, so serving requests costs no metric-library calls."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.http import HttpStats
from broker.service import BrokerService
from broker.tcp import TcpServer


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
            labels=["topic", "partition"],
        )
        start = GaugeMetricFamily(
            "herald_partition_log_start_offset",
            "First offset still stored",
            labels=["topic", "partition"],
        )
        size = GaugeMetricFamily(
            "herald_partition_size_bytes",
            "Bytes held by the partition's segments",
            labels=["topic", "partition"],
        )
        corrupt = CounterMetricFamily(
            "herald_partition_corruptions_detected",
            "Damaged ranges found in the partition's log (by recovery or by reads)",
            labels=["topic", "partition"],
        )
        quarantined = GaugeMetricFamily(
            "herald_partition_quarantined_ranges",
            "Damaged ranges quarantined and never served",
            labels=["topic", "partition"],
        )
        offline = GaugeMetricFamily(
            "herald_partition_offline",
            "1 if the partition stopped taking writes after an I/O error it cannot trust",
            labels=["topic", "partition"],
        )
        for (topic, index), part in service.log.partitions.items():
            labels = [topic, str(index)]
            hw.add_metric(labels, part.high_watermark)
            start.add_metric(labels, part.log_start_offset)
            size.add_metric(labels, part.size_bytes)
            corrupt.add_metric(labels, part.corruptions_detected)
            quarantined.add_metric(labels, len(part.quarantined))
            offline.add_metric(labels, int(part.offline))
        yield hw
        yield start
        yield size
        yield corrupt
        yield quarantined
        yield offline
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
            for topic, index, stored in service.groups.group_offsets(name):
                key = (topic, index)
                if key in service.log.partitions:
                    lag.add_metric(
                        [name, topic, str(index)],
                        service.log.partitions[key].high_watermark - stored.offset,
                    )
        yield lag
        yield members
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


def make_registry(stats: Stats) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(stats))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)

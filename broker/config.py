"""Node configuration: one TOML file decoded into ``msgspec.Struct``s.

Every key is documented in ``config.example.toml`` (a test decodes that file, so it cannot
drift from this module). Unknown keys are errors that name the key. Keys are kebab-case in
TOML. No other module reads the environment or a file for settings: the node gets a
:class:`Config` and passes pieces of it down.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Final, Literal

import msgspec

from channels.config import ChannelsConfig
from storage.partition import PartitionConfig


class ConfigError(Exception):
    code = "config_error"


class _Section(msgspec.Struct, forbid_unknown_fields=True, rename="kebab", kw_only=True):
    pass


class ListenConfig(_Section):
    host: str = "127.0.0.1"
    http_port: int = 8080
    tcp_port: int = 9092
    ws_port: int = 8765


class StorageConfig(_Section):
    data_dir: str = "./data"
    segment_bytes: int = 128 * 1024 * 1024
    segment_ms: int = 7 * 24 * 3600 * 1000
    index_interval_bytes: int = 4096
    checkpoint_interval_ms: int = 1000
    retention_check_interval_ms: int = 60_000
    kv_map_size: int = 1 << 30
    offsets_sync_interval_ms: int = 1000
    cache_window_bytes: int = 256 * 1024 * 1024
    preallocate_bytes: int = 1024 * 1024
    min_free_bytes: int = 64 * 1024 * 1024
    io_threads: int = 8
    inline_sync_max_ms: float = 5.0
    sync_engine: str = "aio"


class TopicDefaults(_Section):
    partitions: int = 4
    retention_ms: int | None = 7 * 24 * 3600 * 1000
    retention_bytes: int | None = None
    auto_create: bool = True
    events_partitions: int = 8
    # bounds on a batch's timestamps against the node's clock (Kafka's
    # message.timestamp.after.max.ms / before.max.ms): time retention and offset-by-time
    # look-ups trust them
    timestamp_after_max_ms: int = 3600 * 1000
    timestamp_before_max_ms: int | None = None


class LimitsConfig(_Section):
    max_frame_bytes: int = 16 * 1024 * 1024
    max_batch_bytes: int = 8 * 1024 * 1024
    max_batches_per_request: int = 1000
    max_fetch_bytes: int = 16 * 1024 * 1024
    max_wait_ms: int = 30_000
    max_connections: int = 10_000
    max_inflight_per_connection: int = 1024
    max_event_bytes: int = 1024 * 1024
    max_events_per_batch: int = 10_000
    max_http_body_bytes: int = 16 * 1024 * 1024
    max_records_per_batch: int = 100_000


class AdmissionConfig(_Section):
    """Who may hold a connection, for how long, and how many bytes the node buffers for
    clients: ``docs/SECURITY.md`` explains each value and ``broker/admission.py`` enforces
    them for every listener."""

    fd_reserve: int = 1024
    unauthenticated_share: float = 0.25
    max_unauthenticated_per_address: int = 256
    max_connections_per_address: int = 1024
    handshake_timeout_ms: int = 10_000
    header_timeout_ms: int = 10_000
    body_timeout_ms: int = 20_000
    body_min_rate: int = 8192
    idle_timeout_ms: int = 600_000
    send_timeout_ms: int = 60_000
    max_unauthenticated_frame_bytes: int = 64 * 1024
    max_request_bytes_in_flight: int = 256 * 1024 * 1024
    max_request_bytes_per_tenant: int = 64 * 1024 * 1024
    max_reply_bytes_per_connection: int = 64 * 1024 * 1024
    max_reply_bytes_in_flight: int = 1024 * 1024 * 1024
    max_reply_bytes_per_tenant: int = 256 * 1024 * 1024
    auth_failures_per_minute: int = 30
    allowed_hosts: list[str] = []
    allowed_origins: list[str] = []


class TlsConfig(_Section):
    """TLS for every listener (HTTP, TCP and the WebSocket gateway),
    on when both files are set; ``broker/tls.py`` makes the contexts."""

    cert_file: str | None = None
    key_file: str | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class GroupsConfig(_Section):
    min_session_timeout_ms: int = 1000
    max_session_timeout_ms: int = 300_000
    default_session_timeout_ms: int = 10_000
    default_assignor: Literal["range", "sticky"] = "sticky"
    max_members: int = 1000
    max_commit_metadata_bytes: int = 4096
    offsets_retention_ms: int = 7 * 24 * 3600 * 1000
    offsets_retention_check_interval_ms: int = 60_000


class TenantQuotas(_Section):
    """One tenant's quotas where they differ from the ``[quotas]`` defaults (a key left out
    takes the default; 0 means unlimited)."""

    tenant: str
    topics: int | None = None
    partitions: int | None = None
    groups: int | None = None
    producer_ids: int | None = None
    state_store_bytes: int | None = None
    produce_bytes_per_second: int | None = None
    fetch_bytes_per_second: int | None = None


class QuotasConfig(_Section):
    """Per-tenant quotas (the operator, tenant ``*``, has none) and the node's own totals.
    Counts refuse with ``quota_exceeded``; rates throttle (0: unlimited)."""

    topics: int = 200
    partitions: int = 1000
    groups: int = 1000
    producer_ids: int = 10_000
    state_store_bytes: int = 256 * 1024 * 1024
    produce_bytes_per_second: int = 0
    fetch_bytes_per_second: int = 0
    rate_burst_ms: int = 1000
    max_throttle_ms: int = 30_000
    producer_id_expiration_ms: int = 24 * 3600 * 1000
    producer_id_expiration_check_interval_ms: int = 60_000
    node_topics: int = 2000
    node_partitions: int = 5000
    tenants: list[TenantQuotas] = []

    def for_tenant(self, tenant: str) -> TenantQuotas:
        """The quotas of ``tenant``: its override, each missing key from the defaults."""
        override = self._overrides().get(tenant)
        return TenantQuotas(
            tenant=tenant,
            **{
                name: getattr(override, name, None)
                if getattr(override, name, None) is not None
                else getattr(self, name)
                for name in QUOTA_NAMES
            },
        )

    def _overrides(self) -> dict[str, TenantQuotas]:
        return {t.tenant: t for t in self.tenants}


# the per-tenant quotas, by field name (kebab-case in TOML and in error messages)
QUOTA_NAMES = (
    "topics",
    "partitions",
    "groups",
    "producer_ids",
    "state_store_bytes",
    "produce_bytes_per_second",
    "fetch_bytes_per_second",
)


class ApiKey(_Section):
    key: str
    tenant: str = "default"
    scopes: list[Literal["produce", "consume", "admin", "engage", "metrics"]] = msgspec.field(
        default_factory=lambda: ["produce", "consume"]
    )
    name: str = ""


class AuthConfig(_Section):
    keys: list[ApiKey] = []


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["logfmt", "json"] = "logfmt"


class RetrySchedule(_Section):
    """Waits between a delivery's attempts: attempt n+1 comes ``delays-ms[n-1]`` (+ jitter)
    after attempt n fails, so ``len(delays-ms) + 1`` attempts in all; then the dead-letter
    queue. Each distinct delay is a retry tier (``__retry.<channel>.<tier>``)."""

    delays_ms: list[int] = msgspec.field(
        default_factory=lambda: [
            60_000,
            300_000,
            900_000,
            3_600_000,
            7_200_000,
            21_600_000,
            50_400_000,
        ]
    )
    jitter: float = 0.2


class ChannelRetry(RetrySchedule, kw_only=True):
    channel: str


class TemplatesConfig(_Section):
    """Bounds of the tenants' templates (``notify/templates.py``, ``notify/render.py``)."""

    max_bytes: int = 65_536
    max_locales: int = 50
    max_per_tenant: int = 1000
    max_output_chars: int = 262_144
    sms_max_segments: int = 3
    cache_size: int = 4096


class ChannelLimits(_Section, kw_only=True):
    """One channel's own delivery pool: how many sends at once, how many deliveries per
    batch, and the queue depth past which it sheds low and normal priority (unset: the
    ``[notify]`` value). Each channel's workers, queue and breakers are its own already; this
    sizes them (an SMS sender at 1 message/s gains nothing from 64 sends at once)."""

    channel: str
    deliver_concurrency: int | None = None
    deliver_batch: int | None = None
    queue_depth_bound: int | None = None


class NotifyConfig(_Section):
    """The notifications core (``notify/``, docs/NOTIFY.md)."""

    channels: list[str] = msgspec.field(default_factory=lambda: ["console", "webhook"])
    default_channels: list[str] = msgspec.field(default_factory=lambda: ["console"])
    partitions: int = 8
    retry_partitions: int = 2
    # __audit: read only by this node's audit indexer, so partitions buy it nothing but a
    # write-and-sync round per partition a stage's batch touches (docs/NOTIFY.md)
    audit_partitions: int = 1
    fanout_page: int = 1000
    fanout_flush_records: int = 20_000
    deliver_batch: int = 2000
    deliver_concurrency: int = 64
    queue_depth_bound: int = 1_000_000
    dedupe_ttl_ms: int = 24 * 3600 * 1000
    audit_retention_ms: int = 30 * 24 * 3600 * 1000
    # how long the audit index may fall behind while it gives way to deliveries
    audit_max_lag_ms: int = 1000
    # after a batch smaller than its batch size, the fan-out and the delivery workers wait
    # this long before they fetch again (docs/NOTIFY.md, *Linger*); 0: fetch at once
    linger_ms: float = 1.0
    timer_batch: int = 1000
    # the node's HTTP API as mail recipients reach it (https://...), for the links Herald puts
    # in mail (one-click unsubscribe); empty: mail carries no such link
    public_url: str = ""
    # signs those links; empty: a random secret made at first start, kept in the state store
    link_secret: str = ""
    retry: RetrySchedule = msgspec.field(default_factory=RetrySchedule)
    retry_overrides: list[ChannelRetry] = []
    channel_limits: list[ChannelLimits] = []
    templates: TemplatesConfig = msgspec.field(default_factory=TemplatesConfig)

    def schedule(self, channel: str) -> RetrySchedule:
        for o in self.retry_overrides:
            if o.channel == channel:
                return o
        return self.retry

    def limits(self, channel: str) -> tuple[int, int, int]:
        """(deliver-concurrency, deliver-batch, queue-depth-bound) of ``channel``."""
        for o in self.channel_limits:
            if o.channel == channel:
                return (
                    o.deliver_concurrency or self.deliver_concurrency,
                    o.deliver_batch or self.deliver_batch,
                    o.queue_depth_bound or self.queue_depth_bound,
                )
        return self.deliver_concurrency, self.deliver_batch, self.queue_depth_bound


class GatewayConfig(_Section):
    """The WebSocket gateway (``gateway/``, docs/GATEWAY.md) on ``listen.ws-port``."""

    enabled: bool = True
    # the HMAC secret of tokens; None: generated into <data>/gateway.secret on first start
    token_secret: str | None = None
    # partitions of __inapp (keyed by user), created at first start
    partitions: int = 8
    max_connections: int = 50_000
    max_frame_bytes: int = 64 * 1024
    messages_per_second: float = 20.0
    message_burst: int = 40
    send_buffer_bytes: int = 256 * 1024
    ping_interval_ms: int = 20_000
    ping_timeout_ms: int = 20_000
    auth_timeout_ms: int = 10_000
    idle_timeout_ms: int = 0
    close_timeout_ms: int = 2_000
    backfill_max: int = 500
    inbox_retention_ms: int = 7 * 24 * 3600 * 1000
    # 0: the node serves ws-port itself; N: N worker processes share it (SO_REUSEPORT)
    workers: int = 0
    # bytes queued for one worker's link past which the worker is dropped and restarted
    worker_buffer_bytes: int = 64 * 1024 * 1024


class Config(_Section):
    node_id: int = 0
    listen: ListenConfig = msgspec.field(default_factory=ListenConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    topics: TopicDefaults = msgspec.field(default_factory=TopicDefaults)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    admission: AdmissionConfig = msgspec.field(default_factory=AdmissionConfig)
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    groups: GroupsConfig = msgspec.field(default_factory=GroupsConfig)
    quotas: QuotasConfig = msgspec.field(default_factory=QuotasConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    notify: NotifyConfig = msgspec.field(default_factory=NotifyConfig)
    channels: ChannelsConfig = msgspec.field(default_factory=ChannelsConfig)
    gateway: GatewayConfig = msgspec.field(default_factory=GatewayConfig)

    def partition_config(
        self,
        *,
        retention_ms: int | Literal["default"] | None = "default",
        retention_bytes: int | Literal["default"] | None = "default",
    ) -> PartitionConfig:
        s = self.storage
        return PartitionConfig(
            segment_bytes=s.segment_bytes,
            segment_ms=s.segment_ms,
            index_interval_bytes=s.index_interval_bytes,
            cache_window_bytes=s.cache_window_bytes,
            preallocate_bytes=s.preallocate_bytes,
            retention_ms=self.topics.retention_ms if retention_ms == "default" else retention_ms,
            retention_bytes=(
                self.topics.retention_bytes if retention_bytes == "default" else retention_bytes
            ),
            max_batch_bytes=self.limits.max_batch_bytes,
            checkpoint_interval_ms=s.checkpoint_interval_ms,
        )


def _validate(cfg: Config) -> Config:
    for name, port in (
        ("listen.http-port", cfg.listen.http_port),
        ("listen.tcp-port", cfg.listen.tcp_port),
        ("listen.ws-port", cfg.listen.ws_port),
    ):
        if not 0 <= port <= 65535:
            raise ConfigError(f"{name}: {port} is not a port number")
    if cfg.topics.partitions < 1 or cfg.topics.events_partitions < 1:
        raise ConfigError("topics.partitions and topics.events-partitions must be >= 1")
    if not 1 << 20 <= cfg.storage.segment_bytes < 1 << 32:
        # index entries hold 32-bit positions
        raise ConfigError("storage.segment-bytes must be at least 1 MiB and below 4 GiB")
    if not 0 <= cfg.storage.preallocate_bytes < 1 << 32:
        raise ConfigError("storage.preallocate-bytes must be >= 0 (0: off) and below 4 GiB")
    if cfg.storage.io_threads < 1:
        raise ConfigError("storage.io-threads must be >= 1")
    if cfg.storage.inline_sync_max_ms < 0:
        raise ConfigError("storage.inline-sync-max-ms must be >= 0 (0: never inline)")
    if cfg.storage.sync_engine not in ("aio", "threads"):
        raise ConfigError('storage.sync-engine must be "aio" or "threads"')
    if cfg.limits.max_batch_bytes > cfg.limits.max_frame_bytes:
        raise ConfigError("limits.max-batch-bytes must not exceed limits.max-frame-bytes")
    from channels.registry import BUILT_IN, WIRED_BY_NODE  # here: it imports the channels

    n = cfg.notify
    for name in n.channels:
        if name not in BUILT_IN and name not in WIRED_BY_NODE:
            raise ConfigError(
                f"notify.channels: no channel {name!r} in this build "
                f"(built in: {', '.join(BUILT_IN + WIRED_BY_NODE)})"
            )
    known = ("webhook", "console", "null", "inapp", "push", "email", "sms")
    named = (
        *n.default_channels,
        *(o.channel for o in n.retry_overrides),
        *(o.channel for o in n.channel_limits),
    )
    for name in named:
        if name not in known:
            raise ConfigError(f"notify: unknown channel {name!r} (known: {', '.join(known)})")
    for sched in (n.retry, *n.retry_overrides):
        if any(d <= 0 for d in sched.delays_ms) or not 0 <= sched.jitter < 1:
            raise ConfigError("notify.retry: delays-ms must be positive, 0 <= jitter < 1")
    for name, value in (
        ("partitions", n.partitions),
        ("retry-partitions", n.retry_partitions),
        ("audit-partitions", n.audit_partitions),
        ("fanout-page", n.fanout_page),
        ("fanout-flush-records", n.fanout_flush_records),
        ("deliver-batch", n.deliver_batch),
        ("deliver-concurrency", n.deliver_concurrency),
        ("timer-batch", n.timer_batch),
    ):
        if value < 1:
            raise ConfigError(f"notify.{name} must be >= 1")
    if not 0 <= n.linger_ms <= 1000:
        raise ConfigError("notify.linger-ms must be between 0 and 1000")
    for o in n.channel_limits:
        for limit in (o.deliver_concurrency, o.deliver_batch, o.queue_depth_bound):
            if limit is not None and limit < 1:
                raise ConfigError(f"notify.channel-limits ({o.channel}): values must be >= 1")
    _validate_quotas(cfg)
    _validate_gateway(cfg.gateway)
    a = cfg.admission
    if not 0 < a.unauthenticated_share < 1:
        raise ConfigError("admission.unauthenticated-share must be between 0 and 1 (exclusive)")
    if a.fd_reserve < 64:
        raise ConfigError("admission.fd-reserve must be at least 64 (the node's own files)")
    for name, value in (
        ("admission.max-unauthenticated-per-address", a.max_unauthenticated_per_address),
        ("admission.max-connections-per-address", a.max_connections_per_address),
        ("admission.handshake-timeout-ms", a.handshake_timeout_ms),
        ("admission.header-timeout-ms", a.header_timeout_ms),
        ("admission.body-timeout-ms", a.body_timeout_ms),
        ("admission.body-min-rate", a.body_min_rate),
        ("admission.idle-timeout-ms", a.idle_timeout_ms),
        ("admission.send-timeout-ms", a.send_timeout_ms),
        ("admission.auth-failures-per-minute", a.auth_failures_per_minute),
        ("limits.max-records-per-batch", cfg.limits.max_records_per_batch),
        ("limits.max-connections", cfg.limits.max_connections),
    ):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1")
    if not 1024 <= a.max_unauthenticated_frame_bytes <= cfg.limits.max_frame_bytes:
        raise ConfigError(
            "admission.max-unauthenticated-frame-bytes must be at least 1024 and at most "
            "limits.max-frame-bytes"
        )
    biggest_request = max(cfg.limits.max_frame_bytes, cfg.limits.max_http_body_bytes)
    if a.max_request_bytes_per_tenant < biggest_request:
        # one whole frame or body must always fit, or a client could never send one
        raise ConfigError(
            "admission.max-request-bytes-per-tenant must be at least limits.max-frame-bytes "
            "and limits.max-http-body-bytes"
        )
    if a.max_request_bytes_in_flight < a.max_request_bytes_per_tenant:
        raise ConfigError(
            "admission.max-request-bytes-in-flight must be at least "
            "admission.max-request-bytes-per-tenant"
        )
    if a.max_reply_bytes_per_connection < cfg.limits.max_fetch_bytes + cfg.limits.max_batch_bytes:
        # a fetch reserves its whole possible reply (max-fetch-bytes, plus one batch past it)
        raise ConfigError(
            "admission.max-reply-bytes-per-connection must be at least limits.max-fetch-bytes "
            "+ limits.max-batch-bytes"
        )
    if a.max_reply_bytes_per_tenant < a.max_reply_bytes_per_connection:
        raise ConfigError(
            "admission.max-reply-bytes-per-tenant must be at least "
            "admission.max-reply-bytes-per-connection"
        )
    if a.max_reply_bytes_in_flight < a.max_reply_bytes_per_tenant:
        raise ConfigError(
            "admission.max-reply-bytes-in-flight must be at least "
            "admission.max-reply-bytes-per-tenant"
        )
    if (cfg.tls.cert_file is None) != (cfg.tls.key_file is None):
        raise ConfigError("tls.cert-file and tls.key-file go together: set both or neither")
    seen = set()
    for i, key in enumerate(cfg.auth.keys):
        if len(key.key) < 16:
            raise ConfigError(f"auth.keys[{i}].key: API keys must be at least 16 characters")
        if key.key in seen:
            raise ConfigError(f"auth.keys[{i}].key: duplicate key")
        seen.add(key.key)
        if key.tenant != OPERATOR_TENANT and not TENANT_NAME.fullmatch(key.tenant):
            raise ConfigError(f"auth.keys[{i}].tenant: {TENANT_RULE}")
    return cfg


# Tenant names appear in stored topic names (``<tenant>~<topic>``, a directory name that must
# fit the file system's 255 bytes with the deletion suffix) and before the ``/`` of group keys.
TENANT_NAME: Final = re.compile(r"[A-Za-z0-9._-]{1,26}")
TENANT_RULE: Final = "a tenant is '*' or 1-26 characters of letters, digits, '.', '_', '-'"
OPERATOR_TENANT: Final = "*"


def _validate_quotas(cfg: Config) -> None:
    q = cfg.quotas
    for name in (*QUOTA_NAMES, "node_topics", "node_partitions", "max_throttle_ms"):
        if getattr(q, name) < 0:
            raise ConfigError(f"quotas.{name.replace('_', '-')} must not be negative")
    if q.rate_burst_ms < 1 or q.producer_id_expiration_ms < 1:
        raise ConfigError("quotas.rate-burst-ms and producer-id-expiration-ms must be >= 1")
    if q.producer_id_expiration_check_interval_ms < 1:
        raise ConfigError("quotas.producer-id-expiration-check-interval-ms must be >= 1")
    seen: set[str] = set()
    for i, t in enumerate(q.tenants):
        if t.tenant in seen:
            raise ConfigError(f"quotas.tenants[{i}].tenant: {t.tenant!r} appears twice")
        if not TENANT_NAME.fullmatch(t.tenant):
            raise ConfigError(f"quotas.tenants[{i}].tenant: {TENANT_RULE}")
        seen.add(t.tenant)
        for name in QUOTA_NAMES:
            value = getattr(t, name)
            if value is not None and value < 0:
                raise ConfigError(
                    f"quotas.tenants[{i}].{name.replace('_', '-')} must not be negative"
                )
    g = cfg.groups
    if g.max_members < 1 or g.max_commit_metadata_bytes < 0:
        raise ConfigError("groups.max-members must be >= 1, max-commit-metadata-bytes >= 0")
    if g.offsets_retention_ms < 1 or g.offsets_retention_check_interval_ms < 1:
        raise ConfigError("groups.offsets-retention-ms and its check interval must be >= 1")
    td = cfg.topics
    if td.timestamp_after_max_ms < 0 or (
        td.timestamp_before_max_ms is not None and td.timestamp_before_max_ms < 0
    ):
        raise ConfigError("topics.timestamp-after-max-ms / -before-max-ms must not be negative")


def _validate_gateway(g: GatewayConfig) -> None:
    for name in (
        "partitions",
        "max_connections",
        "max_frame_bytes",
        "message_burst",
        "send_buffer_bytes",
        "auth_timeout_ms",
        "close_timeout_ms",
        "backfill_max",
        "inbox_retention_ms",
        "worker_buffer_bytes",
    ):
        if getattr(g, name) < 1:
            raise ConfigError(f"gateway.{name.replace('_', '-')} must be >= 1")
    if not 0 <= g.workers <= 64:
        raise ConfigError("gateway.workers must be between 0 (in the node) and 64")
    if g.messages_per_second <= 0:
        raise ConfigError("gateway.messages-per-second must be positive")
    if g.ping_interval_ms < 0 or g.ping_timeout_ms < 0 or g.idle_timeout_ms < 0:
        raise ConfigError("gateway.ping-interval-ms, ping-timeout-ms, idle-timeout-ms: >= 0")
    if g.token_secret is not None and len(g.token_secret) < 32:
        raise ConfigError("gateway.token-secret must be at least 32 characters")


def load_config(path: Path | None) -> Config:
    """Read and validate the TOML file at ``path`` (or the embedded default if None).
    Raises :class:`ConfigError` with the offending key's path."""
    if path is None:
        return _validate(Config())
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    try:
        return _validate(msgspec.convert(raw, Config))
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None

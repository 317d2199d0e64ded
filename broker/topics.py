"""Topics as the broker sees them: names, ownership, visibility, creation and deletion, and
partition choice.

Names: 1-200 characters of ``[A-Za-z0-9._-]``, not ``.`` or ``..``. Names starting with
``__`` are reserved for Herald's internal topics (the product's queues: ``__events``,
``__deliver.<channel>``, ...), which live in the same log but are created only by the node
and shown only to the operator.

Names are per tenant: two tenants may each have ``orders``, and a tenant can neither see,
confirm nor take another tenant's names (every name it does not own answers as a free name
would). A tenant's topic ``orders`` is stored as ``<tenant>~orders`` (``~`` appears in no
topic or tenant name, so the mapping is one to one); the operator (tenant ``*``) addresses
and lists the stored names, may create ``<tenant>~<name>`` for a tenant, and owns the
internal ``__`` topics. Topics made before names were per tenant keep their stored name,
which is also their owner's name for them.

Ownership: each topic belongs to one tenant, recorded in the topic's own ``topic.meta``
(storage writes it with the topic, fsynced before the create is answered), so a topic never
outlives or predates its owner after a power cut. Topics made before that are migrated at
start-up: their owner moves from the old LMDB table into ``topic.meta``.

Creation: bounded by the owner's quotas (topics, partitions) and the node's totals
(``broker/quotas.py``), reserved before any file is made. The files are made in a worker
thread (one checkpoint and a few fsyncs per partition: a 2,000-partition create would stall
the loop for seconds), all or nothing: a create that fails part-way closes what it opened
and removes its directory. A create is owned by this class, not by the request that asked
for it: if that request goes away, the create still completes (or rolls back) and its
quota reservation follows. A produce to a missing topic (auto-create) raises
:class:`TopicPending`; the transport awaits the creation and produces again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
from collections.abc import Callable
from typing import Any, Final

import msgspec

from broker import protocol as p
from broker.auth import OPERATOR_TENANT, Principal
from broker.config import TENANT_NAME, Config
from broker.errors import InvalidRequest, InvalidTopic, TopicExists, UnknownTopic
from broker.names import shown
from broker.protocol import partition_for_key
from broker.quotas import Quotas
from storage.errors import StorageError, StorageFull
from storage.kv import KV
from storage.log import Log
from storage.partition import PartitionConfig

log = logging.getLogger("herald.broker")

INTERNAL_PREFIX: Final = "__"
EVENTS_TOPIC: Final = "__events"
SEPARATOR: Final = "~"  # between the tenant and its name in a stored name
MAX_PARTITIONS: Final = 10_000
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


def validate_topic_name(name: str, *, internal: bool = False) -> str:
    if not _NAME.match(name) or name in (".", ".."):
        raise InvalidTopic(
            f"invalid topic name {shown(name)}: use 1-200 characters of letters, digits, "
            "'.', '_', '-'"
        )
    if name.startswith(INTERNAL_PREFIX) and not internal:
        raise InvalidTopic(f"topic names starting with {INTERNAL_PREFIX!r} are reserved")
    return name


def is_internal(name: str) -> bool:
    return name.startswith(INTERNAL_PREFIX)


def stored_name(tenant: str, name: str) -> str:
    """The stored name of a new topic ``name`` of ``tenant``."""
    return name if tenant == OPERATOR_TENANT else f"{tenant}{SEPARATOR}{name}"


def local_name(tenant: str, stored: str) -> str:
    """What ``tenant`` calls its stored topic ``stored``."""
    if tenant == OPERATOR_TENANT:
        return stored
    prefix_len = len(tenant) + 1
    if stored[prefix_len - 1 : prefix_len] == SEPARATOR and stored.startswith(tenant):
        return stored[prefix_len:]
    return stored  # made before names were per tenant


class TopicOwner(msgspec.Struct, array_like=True):
    tenant: str


class TopicPending(Exception):
    """Not an answer: the topic is being auto-created. Await ``ready`` (it raises what the
    creation raised), then produce again. Never reaches a client."""

    def __init__(self, ready: asyncio.Future[None]) -> None:
        super().__init__("topic being created")
        self.ready = ready


async def created(pending: TopicPending) -> None:
    """Wait for an auto-created topic without cancelling its creation if the waiter goes."""
    await asyncio.shield(pending.ready)


__all__ = ["partition_for_key"]  # the wire's contract (broker/protocol.py), re-exported here


class Topics:
    """The node's topics as tenants see them (wraps :class:`storage.log.Log`)."""

    def __init__(self, config: Config, log_: Log, kv: KV, quotas: Quotas | None = None) -> None:
        self.config = config
        self.log = log_
        self.quotas = quotas or Quotas(config.quotas)
        # tenant -> its name -> stored name (the operator's names are the stored ones)
        self._names: dict[str, dict[str, str]] = {}
        self._creating: dict[str, asyncio.Future[None]] = {}  # stored name -> creation
        self._tasks: set[asyncio.Task[None]] = set()
        # (tenant, its name) of a topic created, deleted or grown: groups rebalance
        self.on_change: Callable[[str, str], None] = lambda tenant, name: None
        self._migrate_owners(kv)
        for meta in self.log.topics.values():
            self._index(meta.owner or OPERATOR_TENANT, meta.name, meta.partitions)

    def _migrate_owners(self, kv: KV) -> None:
        """Topics made before ``topic.meta`` recorded the owner: move it there from the old
        table (an unknown owner makes the topic the operator's, as it was visible only to
        the operator)."""
        legacy = kv.table("topic_owners", TopicOwner)
        for name, meta in list(self.log.topics.items()):
            if meta.owner is None:
                row = legacy.get(name)
                owner = row.tenant if row else OPERATOR_TENANT
                self.log.set_owner(name, owner)
                log.info("event=topic_owner_migrated topic=%s tenant=%s", name, owner)
        legacy.delete_prefix(b"")

    def _index(self, owner: str, stored: str, partitions: int) -> None:
        self._names.setdefault(owner, {})[local_name(owner, stored)] = stored
        if not is_internal(stored):
            usage = self.quotas.of(owner)
            usage.topics += 1
            usage.partitions += partitions
        self.quotas.node_topics += 1
        self.quotas.node_partitions += partitions

    # --------------------------------------------------------------------- names
    def resolve(self, principal: Principal, name: str) -> str | None:
        """The stored name of the principal's topic ``name``, or None if it has none."""
        if principal.tenant == OPERATOR_TENANT:
            return name if name in self.log.topics else None
        names = self._names.get(principal.tenant)
        return names.get(name) if names is not None else None

    def resolve_in(self, tenant: str, name: str) -> str | None:
        if tenant == OPERATOR_TENANT:
            return name if name in self.log.topics else None
        names = self._names.get(tenant)
        return names.get(name) if names is not None else None

    def local(self, principal: Principal, stored: str) -> str:
        return local_name(principal.tenant, stored)

    def owner_of(self, stored: str) -> str | None:
        meta = self.log.topics.get(stored)
        return None if meta is None else meta.owner or OPERATOR_TENANT

    def visible(self, principal: Principal, name: str) -> bool:
        return self.resolve(principal, name) is not None

    def names(self, principal: Principal) -> list[str]:
        """The principal's topics, by its names."""
        if principal.tenant == OPERATOR_TENANT:
            return sorted(self.log.topics)
        return sorted(self._names.get(principal.tenant, ()))

    def partition_count_in(self, tenant: str, name: str) -> int | None:
        """Partitions of ``tenant``'s topic ``name`` (None: it has none by that name)."""
        stored = self.resolve_in(tenant, name)
        return None if stored is None else self.log.topics[stored].partitions

    def partition_count(self, stored: str) -> int | None:
        """Partitions of the topic stored as ``stored`` (the node's own view: internal
        topics, the engines)."""
        meta = self.log.topics.get(stored)
        return meta.partitions if meta else None

    def _target(self, principal: Principal, name: str) -> tuple[str, str, str]:
        """(owner, its name, stored name) of a topic the principal creates as ``name``."""
        if principal.tenant != OPERATOR_TENANT:
            validate_topic_name(name)
            return principal.tenant, name, stored_name(principal.tenant, name)
        owner, sep, local = name.partition(SEPARATOR)
        if not sep:
            validate_topic_name(name)
            return OPERATOR_TENANT, name, name
        # the operator creating a topic for a tenant, by its stored name
        if not TENANT_NAME.fullmatch(owner):
            raise InvalidTopic(f"invalid topic name {shown(name)}: {owner!r} is not a tenant")
        validate_topic_name(local)
        return owner, local, name

    # ------------------------------------------------------------------ creation
    def ensure_internal(self, name: str, partitions: int) -> None:
        """Create the internal topic ``name`` if it does not exist yet (at start-up)."""
        if name not in self.log.topics:
            self.log.create_topic(
                name,
                partitions,
                self.config.partition_config(),
                internal=True,
                owner=OPERATOR_TENANT,
            )
            self._index(OPERATOR_TENANT, name, partitions)
            self.on_change(OPERATOR_TENANT, name)

    async def create(
        self,
        principal: Principal,
        name: str,
        *,
        partitions: int | None = None,
        retention_ms: int | None = None,
        retention_bytes: int | None = None,
        exist_ok: bool = False,
    ) -> tuple[p.TopicInfo, bool]:
        owner, local, stored = self._target(principal, name)
        n = self.config.topics.partitions if partitions is None else partitions
        if not 1 <= n <= MAX_PARTITIONS:
            raise InvalidRequest(f"partitions must be in [1, {MAX_PARTITIONS}]", field="partitions")
        for fld, val in (("retention_ms", retention_ms), ("retention_bytes", retention_bytes)):
            if val is not None and val <= 0:
                raise InvalidRequest(f"{fld} must be positive", field=fld)
        pending = self._creating.get(stored)
        if pending is not None:  # the same name asked twice: the first create decides
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)
        if self.resolve_in(owner, local) is not None:
            if exist_ok:
                return self.info(self.resolve_in(owner, local) or stored, name), False
            raise TopicExists(f"topic {shown(name)} already exists")
        cfg = self.config.partition_config(
            retention_ms=retention_ms if retention_ms is not None else "default",
            retention_bytes=retention_bytes if retention_bytes is not None else "default",
        )
        ready = self._start_create(principal, owner, local, stored, n, cfg)
        await asyncio.shield(ready)
        log.info(
            "event=topic_created topic=%s stored=%s partitions=%d tenant=%s",
            local,
            stored,
            n,
            owner,
        )
        return self.info(stored, name), True

    def _start_create(
        self,
        principal: Principal,
        owner: str,
        local: str,
        stored: str,
        partitions: int,
        cfg: PartitionConfig,
    ) -> asyncio.Future[None]:
        """Reserve the quotas and start making the topic; the future resolves once it is
        part of the log (or fails with the reason it is not). Raises at once if the quotas
        or the name do not allow it."""
        self.log.check_create(stored, partitions)
        usage = self.quotas.of(owner)
        if not principal.operator:
            self.quotas.admit(usage, "topics", 1)
            self.quotas.admit(usage, "partitions", partitions, field="partitions")
        self.quotas.admit_node(1, partitions)
        # reserved now, so concurrent creates cannot all pass the check
        usage.topics += 1
        usage.partitions += partitions
        self.quotas.node_topics += 1
        self.quotas.node_partitions += partitions
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        ready.add_done_callback(_retrieve)
        self._creating[stored] = ready
        task = loop.create_task(self._create(owner, local, stored, partitions, cfg, ready))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return ready

    async def _create(
        self,
        owner: str,
        local: str,
        stored: str,
        partitions: int,
        cfg: PartitionConfig,
        ready: asyncio.Future[None],
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            meta, parts = await loop.run_in_executor(
                None, lambda: self.log.prepare_topic(stored, partitions, cfg, owner=owner)
            )
        except BaseException as exc:
            self._release(owner, partitions)
            self._creating.pop(stored, None)
            log.warning("event=topic_create_failed topic=%s error=%r", stored, exc)
            if isinstance(exc, OSError | StorageError):
                # the message names the reason (EMFILE, ENOSPC), not the data directory; a
                # full disk is the retriable storage_full
                error = StorageFull if _disk_full(exc) else StorageError
                ready.set_exception(error(f"cannot create topic {shown(local)}: {_reason(exc)}"))
            elif isinstance(exc, Exception):
                ready.set_exception(exc)
            else:
                ready.cancel()
                raise
            return
        self.log.add_topic(meta, parts)
        self._names.setdefault(owner, {})[local] = stored
        self._creating.pop(stored, None)
        ready.set_result(None)
        self._changed(owner, local, stored)

    def _changed(self, owner: str, local: str, stored: str) -> None:
        self.on_change(owner, local)
        if owner != OPERATOR_TENANT:  # the operator's groups name it by its stored name
            self.on_change(OPERATOR_TENANT, stored)

    def _release(self, owner: str, partitions: int) -> None:
        usage = self.quotas.of(owner)
        usage.topics -= 1
        usage.partitions -= partitions
        self.quotas.node_topics -= 1
        self.quotas.node_partitions -= partitions

    async def settle(self) -> None:
        """Wait for the creates in progress (at shutdown: their files must be closed by the
        log, so they must be part of it, or gone)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def delete(self, principal: Principal, name: str) -> tuple[str, str, str]:
        """Delete the principal's topic ``name``. Returns (owner, owner's name for it,
        stored name)."""
        stored = self.resolve(principal, name)
        if stored is None or is_internal(stored):
            raise UnknownTopic(f"unknown topic {shown(name)}")
        meta = self.log.topics[stored]
        owner = meta.owner or OPERATOR_TENANT
        local = local_name(owner, stored)
        await self.log.delete_topic(stored)
        names = self._names.get(owner)
        if names is not None:
            names.pop(local, None)
        self._release(owner, meta.partitions)
        self._changed(owner, local, stored)
        log.info(
            "event=topic_deleted topic=%s stored=%s tenant=%s by=%s",
            local,
            stored,
            owner,
            principal.tenant,
        )
        return owner, local, stored

    def usable(self, principal: Principal, topic: str, *, produce: bool) -> tuple[str, int]:
        """(stored name, partition count) of a topic the principal may use. On produce, a
        missing topic is auto-created when the config allows: raises :class:`TopicPending`
        (or the quota error, at once). Raises :class:`UnknownTopic` otherwise."""
        stored = self.resolve(principal, topic)
        if stored is not None:
            return stored, self.log.topics[stored].partitions
        if produce and self.config.topics.auto_create and not is_internal(topic):
            try:
                owner, local, stored = self._target(principal, topic)
            except InvalidTopic:
                raise UnknownTopic(f"unknown topic {shown(topic)}") from None
            ready = self._creating.get(stored)
            if ready is None:
                ready = self._start_create(
                    principal,
                    owner,
                    local,
                    stored,
                    self.config.topics.partitions,
                    self.config.partition_config(),
                )
                ready.add_done_callback(_log_auto_created(local, stored, owner))
            raise TopicPending(ready)
        raise UnknownTopic(f"unknown topic {shown(topic)}")

    def info(self, stored: str, name: str | None = None) -> p.TopicInfo:
        """The topic ``stored``, shown as ``name`` (the asker's name for it)."""
        meta = self.log.topics[stored]
        parts = []
        for i in range(meta.partitions):
            part = self.log.partition(stored, i)
            parts.append(
                p.PartitionInfo(
                    partition=i,
                    leader=self.config.node_id,
                    log_start_offset=part.log_start_offset,
                    high_watermark=part.high_watermark,
                    size_bytes=part.size_bytes,
                    segments=len(part.segments),
                )
            )
        return p.TopicInfo(
            name=stored if name is None else name,
            partitions=parts,
            internal=meta.internal,
            retention_ms=meta.config.retention_ms,
            retention_bytes=meta.config.retention_bytes,
        )


def _log_auto_created(
    local: str, stored: str, owner: str
) -> Callable[[asyncio.Future[None]], None]:
    def done(fut: asyncio.Future[None]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            log.info("event=topic_auto_created topic=%s stored=%s tenant=%s", local, stored, owner)

    return done


def _reason(exc: BaseException) -> str:
    """What made a create fail, without the paths an OS error names."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


def _disk_full(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, StorageFull) or (
            isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a creation's failure as seen: nobody may be waiting for it any more."""
    if not fut.cancelled():
        fut.exception()

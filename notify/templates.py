"""Templates per (tenant, topic, channel), stored in the node's LMDB, compiled once per
version, and rendered with locale fallbacks (``notify/render.py`` renders).

Table ``notify.templates``: ``tenant\\0topic\\0channel`` -> :class:`StoredTemplate` (every
locale's parts as given, a version that grows by one on every PUT, the time). The topic ``*``
holds a tenant's fallback for every topic of a channel.

Which template renders a delivery: the (topic, channel) template, else the (``*``, channel)
one, else the built-in default (``render.default_templates``); within it the recipient's
locale, then its language, then ``default`` (``fr-CA`` -> ``fr-ca``, ``fr``, ``default``).
A template must have a ``default`` locale, so the chain always ends somewhere.

Bounds (``[notify.templates]``): ``max-bytes`` of source per template (all locales and
parts), ``max-locales`` per template, ``max-per-tenant`` templates, and the render bounds of
``notify/render.py``. Compiled templates are cached by (tenant, topic, channel) and version,
``cache-size`` entries at most (least recently used go first).

Lookups are remembered too, found or not (``cache-size`` entries, least recently used go
first): a delivery asks for its topic's template and the tenant's ``*`` one, and most find
neither, so without this each in-app, push, SMS or email delivery read the table twice. The
node's one :class:`Templates` is the table's only writer (:meth:`put`, :meth:`delete`), and
every write forgets what was remembered.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Final

import msgspec

from broker.config import TemplatesConfig
from broker.errors import InvalidRequest
from channels.base import Content
from notify import render
from notify.render import Compiled, RenderError, TemplateError
from storage.kv import KV

_LOCALE: Final = re.compile(r"default|[A-Za-z]{2,8}(?:[-_][A-Za-z0-9]{1,8}){0,4}")
MAX_ID_BYTES: Final = 200


class TemplateIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``PUT /templates/{topic}/{channel}``: each locale's parts (Jinja2 source). ``default``
    is required. Email parts: ``subject``, ``text``, optional ``html``; push and inapp:
    ``title``, ``body``; sms: ``text``."""

    locales: dict[str, dict[str, str]]


class StoredTemplate(msgspec.Struct, kw_only=True, omit_defaults=True):
    locales: dict[str, dict[str, str]]
    version: int
    updated_ms: int


class TemplateOut(msgspec.Struct, kw_only=True):
    topic: str
    channel: str
    locales: dict[str, dict[str, str]]
    version: int
    updated_ms: int


class PreviewIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /templates/{topic}/{channel}/preview``: sample data to render the stored
    template with (or ``template``, an unsaved one), as the given ``locale`` would see it."""

    data: Any = None
    locale: str | None = None
    recipient: dict[str, Any] | None = None
    category: str | None = None
    template: TemplateIn | None = None


class PreviewOut(msgspec.Struct, kw_only=True):
    locale: str  # the locale whose parts rendered
    source: str  # "topic", "tenant" (the * template), "built-in", or "given"
    content: dict[str, Any]


def template_key(tenant: str, topic: str, channel: str) -> bytes:
    parts = (tenant, topic, channel)
    for name, value in zip(("tenant", "topic", "channel"), parts, strict=True):
        raw = value.encode()
        if not raw or len(raw) > MAX_ID_BYTES or b"\0" in raw:
            raise InvalidRequest(f"{name}: 1-{MAX_ID_BYTES} bytes without NUL", field=name)
    return "\0".join(parts).encode()


class Templates:
    """The template store and its compiled cache."""

    def __init__(self, kv: KV, config: TemplatesConfig | None = None) -> None:
        self.kv = kv
        self.config = config or TemplatesConfig()
        self.table = kv.table("notify.templates", StoredTemplate)
        self._cache: OrderedDict[bytes, tuple[int, dict[str, Compiled]]] = OrderedDict()
        # what compiled() answered per key, None included, until the next put or delete
        self._looked: OrderedDict[bytes, dict[str, Compiled] | None] = OrderedDict()
        self.compiles = 0  # templates compiled (one per stored version used), for tests

    # ----------------------------------------------------------------------- storing
    def check(self, channel: str, body: TemplateIn) -> dict[str, Compiled]:
        """Compile every locale of ``body``; raises :class:`InvalidRequest` naming the part."""
        cfg = self.config
        if channel not in render.PARTS:
            raise InvalidRequest(
                f"channel: templates exist for {', '.join(render.PARTS)}"
                " (webhooks send the event's data as it is)",
                field="channel",
            )
        if "default" not in body.locales:
            raise InvalidRequest("locales.default: required (the last fallback)", field="locales")
        if len(body.locales) > cfg.max_locales:
            raise InvalidRequest(f"locales: at most {cfg.max_locales}", field="locales")
        size = sum(
            len(k) + sum(len(v.encode()) for v in p.values()) for k, p in body.locales.items()
        )
        if size > cfg.max_bytes:
            raise InvalidRequest(
                f"template of {size} bytes; at most {cfg.max_bytes}", field="locales"
            )
        out: dict[str, Compiled] = {}
        for locale, parts in body.locales.items():
            if not _LOCALE.fullmatch(locale):
                raise InvalidRequest(
                    f"locales.{locale[:40]}: a BCP 47 tag (en, fr-CA) or default",
                    field=f"locales.{locale[:40]}",
                )
            key = locale.replace("_", "-").lower()
            if key in out:
                raise InvalidRequest(f"locales.{locale}: given twice", field=f"locales.{locale}")
            try:
                out[key] = render.compile_locale(channel, locale, parts)
            except TemplateError as exc:
                raise InvalidRequest(str(exc), field=exc.field) from None
        self.compiles += len(out)
        return out

    async def put(
        self, tenant: str, topic: str, channel: str, body: TemplateIn, *, now_ms: int
    ) -> StoredTemplate:
        """Check, store (durable before it returns) and cache a template; version + 1."""
        key = template_key(tenant, topic, channel)
        compiled = self.check(channel, body)
        with self.kv.transaction() as txn:
            old = self.table.get(key, txn=txn)
            if old is None:
                count = sum(1 for _ in self.table.keys(tenant.encode() + b"\0", txn=txn))
                if count >= self.config.max_per_tenant:
                    raise InvalidRequest(
                        f"at most {self.config.max_per_tenant} templates per tenant",
                        field="topic",
                    )
            row = StoredTemplate(
                locales=body.locales,
                version=(old.version if old is not None else 0) + 1,
                updated_ms=now_ms,
            )
            self.table.put(key, row, txn=txn)
        self._looked.clear()
        await self.kv.sync()
        self._remember(key, row.version, compiled)
        return row

    def get(self, tenant: str, topic: str, channel: str) -> StoredTemplate | None:
        return self.table.get(template_key(tenant, topic, channel))

    async def delete(self, tenant: str, topic: str, channel: str) -> bool:
        key = template_key(tenant, topic, channel)
        found = self.table.delete(key)
        self._cache.pop(key, None)
        self._looked.clear()
        if found:
            await self.kv.sync()
        return found

    def list(self, tenant: str) -> list[tuple[str, str, StoredTemplate]]:
        """The tenant's templates as (topic, channel, template), in key order."""
        prefix = template_key(tenant, "x", "x")[: len(tenant.encode()) + 1]
        out = []
        for k, v in self.table.scan(prefix):
            topic, _, channel = k[len(prefix) :].decode().rpartition("\0")
            out.append((topic, channel, v))
        return out

    # --------------------------------------------------------------------- rendering
    def compiled(self, tenant: str, topic: str, channel: str) -> dict[str, Compiled] | None:
        """The (tenant, topic, channel) template compiled (from the cache when its version
        is), None when there is none."""
        key = template_key(tenant, topic, channel)
        looked = self._looked
        if key in looked:
            looked.move_to_end(key)
            return looked[key]
        found = self._compiled(key, topic, channel)
        looked[key] = found
        if len(looked) > self.config.cache_size:
            looked.popitem(last=False)
        return found

    def _compiled(self, key: bytes, topic: str, channel: str) -> dict[str, Compiled] | None:
        row = self.table.get(key)
        if row is None:
            self._cache.pop(key, None)
            return None
        hit = self._cache.get(key)
        if hit is not None and hit[0] == row.version:
            self._cache.move_to_end(key)
            return hit[1]
        try:
            compiled = self.check(channel, TemplateIn(locales=row.locales))
        except InvalidRequest as exc:  # stored by a node with other rules
            raise RenderError(f"{topic}/{channel}", f"stored template unusable: {exc}") from None
        self._remember(key, row.version, compiled)
        return compiled

    def _remember(self, key: bytes, version: int, compiled: dict[str, Compiled]) -> None:
        self._cache[key] = (version, compiled)
        self._cache.move_to_end(key)
        while len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)

    def choose(
        self, tenant: str, topic: str, channel: str, locale: str | None
    ) -> tuple[str, str, Compiled]:
        """(where it came from, the locale used, the compiled parts) for one delivery:
        topic template, else the tenant's ``*`` one, else the built-in default; the locale by
        :func:`render.locale_chain`."""
        for source, name in (("topic", topic), ("tenant", "*")):
            found = self.compiled(tenant, name, channel)
            if found is not None:
                for tag in render.locale_chain(locale):
                    if tag in found:
                        return source, tag, found[tag]
        return "built-in", "default", render.default_templates()[channel]

    def render(
        self,
        tenant: str,
        topic: str,
        channel: str,
        context: Mapping[str, Any],
        *,
        locale: str | None,
    ) -> Content:
        """Render the chosen template for one delivery. Raises :class:`RenderError`."""
        source, tag, compiled = self.choose(tenant, topic, channel, locale)
        where = f"{topic if source == 'topic' else '*'}/{channel}/{tag}"
        if source == "built-in":
            where = f"built-in/{channel}"
        return render.render(
            channel,
            compiled,
            context,
            where=where,
            max_output_chars=self.config.max_output_chars,
            sms_max_segments=self.config.sms_max_segments,
        )

"""The template store remembers its lookups, found or not (a delivery asks for two templates
and most find neither), and forgets them on every write: a template stored after deliveries
that found none is the one the next delivery renders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.config import TemplatesConfig
from channels.base import PushContent
from notify.templates import TemplateIn, Templates
from storage.kv import KV

CONTEXT = {
    "data": {"n": 1},
    "event": {"topic": "orders", "event_id": "e", "category": None, "priority": "normal"},
    "recipient": {"id": "u"},
    "activities": [],
    "unsubscribe_url": None,
}


@pytest.fixture
def kv(tmp_path: Path) -> Iterator[KV]:
    store = KV(tmp_path / "kv")
    yield store
    store.close()


def _title(templates: Templates, tenant: str = "t1") -> str:
    content = templates.render(tenant, "orders", "inapp", CONTEXT, locale=None)
    assert isinstance(content, PushContent)
    return content.title


def _inapp(title: str) -> TemplateIn:
    return TemplateIn(locales={"default": {"title": title, "body": "b"}})


async def test_lookups_are_remembered_until_a_write(kv: KV) -> None:
    templates = Templates(kv, TemplatesConfig(cache_size=8))
    reads = 0
    get = templates.table.get

    def counting_get(*args: object, **kwargs: object) -> object:
        nonlocal reads
        reads += 1
        return get(*args, **kwargs)  # type: ignore[arg-type]

    templates.table.get = counting_get  # type: ignore[method-assign,assignment]
    assert _title(templates) == "orders"  # the built-in: neither the topic's nor the * one
    assert reads == 2
    for _ in range(5):
        assert _title(templates) == "orders"
    assert reads == 2, "a lookup that found nothing is remembered"

    await templates.put("t1", "*", "inapp", _inapp("every topic"), now_ms=1)
    assert _title(templates) == "every topic"
    await templates.put("t1", "orders", "inapp", _inapp("orders v1"), now_ms=2)
    assert _title(templates) == "orders v1"
    await templates.put("t1", "orders", "inapp", _inapp("orders v2"), now_ms=3)
    assert _title(templates) == "orders v2"
    n = reads
    assert _title(templates) == "orders v2"
    assert reads == n
    assert _title(templates, "t2") == "orders", "another tenant's lookups are its own"
    assert await templates.delete("t1", "orders", "inapp")
    assert _title(templates) == "every topic"
    assert await templates.delete("t1", "*", "inapp")
    assert _title(templates) == "orders"


async def test_remembered_lookups_are_bounded(kv: KV) -> None:
    templates = Templates(kv, TemplatesConfig(cache_size=8))
    for i in range(100):
        assert _title(templates, f"tenant{i}") == "orders"
    assert len(templates._looked) == 8

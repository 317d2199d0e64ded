"""The notification registry (``notify/registry.py``) on a real LMDB: users, devices,
subscriptions and the topic index (paged), preferences, defaults, mandatory topics, the
consent ledger, workflows, GDPR export and erasure, tenant isolation, and writes that are
durable before they return. A state machine (hypothesis) keeps both sides of every
subscription and the counts in step through subscribe / unsubscribe / erase."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from broker.errors import InvalidRequest
from channels.signing import decode_secret
from notify.conditions import Scope
from notify.model import (
    Consent,
    ConsentState,
    ContactEvent,
    Device,
    Preferences,
    QuietHours,
    Rule,
    Subscription,
    User,
    WebhookEndpoint,
)
from notify.registry import CONTACT_LOG_MAX, MAX_DEVICES, SMALL_TOPIC, Registry, apply_consent
from notify.windows import Charge, tag_of
from storage.kv import KV

T = 1_767_225_600_000
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture
def kv(tmp_path: Path) -> Iterator[KV]:
    store = KV(tmp_path / "state", map_size=256 << 20)
    yield store
    store.close()


@pytest.fixture
async def reg(kv: KV) -> AsyncIterator[Registry]:
    yield Registry(kv)


def sub(*channels: str, filter: dict[str, Any] | None = None) -> Subscription:
    return Subscription(channels=list(channels), filter=filter)  # type: ignore[arg-type]


def everything_held(kv: KV) -> list[tuple[str, bytes]]:
    """Every (table, key) of the registry's tables."""
    out = []
    for name in (
        "notify.profiles",
        "notify.user_subs",
        "notify.topic_subs",
        "notify.topic_counts",
        "notify.consent",
        "notify.contact_log",
        "notify.phones",
        "notify.windows",
        "notify.defaults",
        "notify.mandatory",
        "notify.workflows",
    ):
        out.extend((name, k) for k in kv.table(name, msgspec.Raw).keys(b""))
    return out


# --------------------------------------------------------------------------- users
async def test_a_user_is_stored_and_read_back(reg: Registry) -> None:
    body = User(
        email="ada@example.com",
        phone="+14155550100",
        timezone="Europe/London",
        locale="en-GB",
        webhook=WebhookEndpoint(url="https://example.com/hook", secret=SECRET),
    )
    contact = await reg.put_user("acme", "u1", body, now_ms=T)
    assert reg.contact("acme", "u1") == contact
    assert (contact.email, contact.timezone, contact.updated_ms) == (
        "ada@example.com",
        "Europe/London",
        T,
    )
    assert contact.webhook is not None and contact.webhook.secret == SECRET
    assert reg.contact("acme", "u2") is None


async def test_a_webhook_without_a_secret_gets_one_and_keeps_it(reg: Registry) -> None:
    hook = WebhookEndpoint(url="https://example.com/hook")
    first = await reg.put_user("acme", "u1", User(webhook=hook), now_ms=T)
    assert first.webhook is not None and first.webhook.secret is not None
    decode_secret(first.webhook.secret)  # a usable Standard Webhooks secret
    again = await reg.put_user("acme", "u1", User(email="a@b.c", webhook=hook), now_ms=T + 1)
    assert again.webhook is not None and again.webhook.secret == first.webhook.secret
    other = await reg.put_user("acme", "u2", User(webhook=hook), now_ms=T)
    assert other.webhook is not None and other.webhook.secret != first.webhook.secret


async def test_replacing_contact_data_keeps_devices_and_preferences(reg: Registry) -> None:
    await reg.put_device("acme", "u1", "tok", Device(platform="fcm"), now_ms=T)
    await reg.put_preferences("acme", "u1", Preferences(rules=[Rule(allow=False)]), now_ms=T)
    await reg.put_user("acme", "u1", User(email="a@b.c"), now_ms=T + 1)
    profile = reg.profile("acme", "u1")
    assert profile is not None and set(profile.devices) == {"tok"}
    assert profile.preferences is not None and len(profile.preferences.rules) == 1
    assert profile.created_ms == T


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (User(timezone="Mars/Base"), "timezone"),
        (User(timezone="../../etc/passwd"), "timezone"),
        (User(email="nobody"), "email"),
        (User(phone="555-0100"), "phone"),
        (User(webhook=WebhookEndpoint(url="ftp://x")), "webhook.url"),
        (User(locale=""), "locale"),
        (User(webhook=WebhookEndpoint(url="https://x", secret="whsec_x")), "webhook.secret"),
    ],
)
async def test_bad_contact_data_names_the_field(reg: Registry, body: User, field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await reg.put_user("acme", "u1", body, now_ms=T)
    assert caught.value.field == field
    assert reg.profile("acme", "u1") is None


@pytest.mark.parametrize(
    ("tenant", "user", "field"),
    [
        ("", "u", "tenant"),
        ("t" * 65, "u", "tenant"),
        ("acme", "", "user"),
        ("acme", "a\0b", "user"),
    ],
)
async def test_bad_ids_are_refused(reg: Registry, tenant: str, user: str, field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await reg.put_user(tenant, user, User(), now_ms=T)
    assert caught.value.field == field


# ------------------------------------------------------------------------ devices
async def test_devices_are_invalidated_deleted_and_bounded(reg: Registry) -> None:
    await reg.put_device("acme", "u1", "a", Device(platform="apns"), now_ms=T)
    await reg.put_device("acme", "u1", "b", Device(platform="fcm"), now_ms=T + 1)
    assert await reg.invalidate_device("acme", "u1", "a", at_ms=T + 5)
    assert reg.devices("acme", "u1")["a"].invalid_since_ms == T + 5
    assert not await reg.invalidate_device("acme", "u1", "zzz", at_ms=T)
    # registering the token again clears the invalidation
    await reg.put_device("acme", "u1", "a", Device(platform="apns"), now_ms=T + 6)
    assert reg.devices("acme", "u1")["a"].invalid_since_ms is None
    assert await reg.delete_device("acme", "u1", "b")
    assert not await reg.delete_device("acme", "u1", "b")
    assert set(reg.devices("acme", "u1")) == {"a"}
    # past the bound an invalidated device goes first, then the oldest
    for i in range(MAX_DEVICES - 1):
        await reg.put_device("acme", "u1", f"d{i}", Device(platform="fcm"), now_ms=T + 10 + i)
    await reg.invalidate_device("acme", "u1", "d5", at_ms=T + 100)
    await reg.put_device("acme", "u1", "new1", Device(platform="fcm"), now_ms=T + 200)
    await reg.put_device("acme", "u1", "new2", Device(platform="fcm"), now_ms=T + 201)
    devices = reg.devices("acme", "u1")
    assert len(devices) == MAX_DEVICES
    # "a" was registered again at T+6, before d0 (T+10): the oldest
    assert "d5" not in devices and "a" not in devices and {"new1", "new2", "d0"} <= set(devices)


# ------------------------------------------------------------------ subscriptions
async def test_a_subscription_is_stored_on_both_sides(reg: Registry) -> None:
    row = await reg.subscribe("acme", "u1", "orders", sub("email", "sms", "email"), now_ms=T)
    assert row.channels == ["email", "sms"]  # repeats dropped
    assert reg.subscriptions("acme", "u1") == [("orders", row)]
    page = reg.subscribers("acme", "orders")
    assert [(s.user, s.channels, s.filter) for s in page.subscribers] == [
        ("u1", ("email", "sms"), None)
    ]
    assert reg.subscriber_count("acme", "orders") == 1
    # replacing keeps the creation time and the count
    again = await reg.subscribe("acme", "u1", "orders", sub("push"), now_ms=T + 5)
    assert (again.created_ms, again.updated_ms, again.channels) == (T, T + 5, ["push"])
    assert reg.subscribers("acme", "orders").subscribers[0].channels == ("push",)
    assert reg.subscriber_count("acme", "orders") == 1
    assert await reg.unsubscribe("acme", "u1", "orders")
    assert not await reg.unsubscribe("acme", "u1", "orders")
    assert reg.subscribers("acme", "orders").subscribers == []
    assert reg.subscriber_count("acme", "orders") == 0
    assert everything_held(reg._kv) == []


async def test_filters_are_checked_then_served_compiled(reg: Registry) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await reg.subscribe("acme", "u1", "orders", sub("email", filter={"region": "eu"}), now_ms=T)
    assert caught.value.field == "filter.region"
    with pytest.raises(InvalidRequest) as caught:
        await reg.subscribe("acme", "u1", "orders", sub(), now_ms=T)
    assert caught.value.field == "channels"
    assert reg.subscriber_count("acme", "orders") == 0
    f = {"data.region": {"in": ["eu", "uk"]}}
    await reg.subscribe("acme", "u1", "orders", sub("email", filter=f), now_ms=T)
    await reg.subscribe("acme", "u2", "orders", sub("email", filter=f), now_ms=T)
    await reg.subscribe("acme", "u3", "orders", sub("email", filter={}), now_ms=T)
    one, two, three = reg.subscribers("acme", "orders").subscribers
    assert one.filter is not None and one.filter is two.filter  # compiled once, shared
    assert one.filter.matches(Scope({"region": "uk"}, {}, {}))
    assert not one.filter.matches(Scope({"region": "us"}, {}, {}))
    assert three.filter is None
    assert reg.subscription("acme", "u1", "orders") is not None
    assert reg.subscription("acme", "u1", "orders").filter == f  # type: ignore[union-attr]


async def test_paging_visits_every_subscriber_once_in_order(reg: Registry) -> None:
    users = [f"user-{i:05d}" for i in range(2500)]
    reg.subscribe_many("acme", "news", [(u, sub("inapp")) for u in users], now_ms=T)
    reg.subscribe_many("acme", "news2", [("x", sub("inapp"))], now_ms=T)  # a longer topic
    reg.subscribe_many("acme", "new", [("y", sub("inapp"))], now_ms=T)  # a shorter one
    await reg.sync()
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page = reg.subscribers("acme", "news", after=after, limit=1000)
        pages += 1
        seen.extend(s.user for s in page.subscribers)
        if page.next_after is None:
            break
        after = page.next_after
    assert seen == users and pages == 3
    assert reg.subscriber_count("acme", "news") == 2500
    # after need not be a subscriber
    assert reg.subscribers("acme", "news", after="user-00099x", limit=1).subscribers[0].user == (
        "user-00100"
    )
    with pytest.raises(InvalidRequest):
        reg.subscribers("acme", "news", limit=0)


async def test_paging_while_subscriptions_change(reg: Registry) -> None:
    reg.subscribe_many("acme", "t", [(f"u{i:03d}", sub("inapp")) for i in range(100)], now_ms=T)
    first = reg.subscribers("acme", "t", limit=50)
    await reg.unsubscribe("acme", "u010", "t")  # already read: no effect on later pages
    await reg.unsubscribe("acme", "u060", "t")  # not read yet: not served
    await reg.subscribe("acme", "u0605", "t", sub("inapp"), now_ms=T)  # after the cursor
    rest = reg.subscribers("acme", "t", after=first.next_after, limit=100)
    later = [s.user for s in rest.subscribers]
    assert "u060" not in later and "u0605" in later
    both = [s.user for s in first.subscribers] + later
    assert len(both) == len(set(both)) == 100


async def test_tenants_see_nothing_of_each_other(reg: Registry) -> None:
    for tenant in ("acme", "globex"):
        await reg.put_user(tenant, "u1", User(email=f"u1@{tenant}.com"), now_ms=T)
        await reg.subscribe(tenant, "u1", "orders", sub("email"), now_ms=T)
    await reg.subscribe("acme", "u2", "orders", sub("email"), now_ms=T)
    await reg.put_workflow("acme", "orders", {"steps": [{"channel": "email"}]}, now_ms=T)
    await reg.set_mandatory("acme", "orders", True, now_ms=T)
    await reg.put_defaults("acme", Preferences(rules=[Rule(allow=False)]), now_ms=T)
    await reg.record_consent(
        "acme", "u1", Consent(channel="email", opted_in=False, at_ms=T, source="api")
    )
    assert [s.user for s in reg.subscribers("globex", "orders").subscribers] == ["u1"]
    assert reg.subscriber_count("globex", "orders") == 1
    assert reg.contact("globex", "u1").email == "u1@globex.com"  # type: ignore[union-attr]
    assert reg.plan("globex", "orders") is None
    assert not reg.is_mandatory("globex", "orders") and reg.mandatory_topics("globex") == []
    assert reg.defaults("globex") is None
    assert reg.consent_ledger("globex", "u1") == [] and reg.consent_state("globex", "u1") == {}
    await reg.erase_user("acme", "u1")
    assert reg.contact("globex", "u1") is not None
    assert reg.subscription("globex", "u1", "orders") is not None


async def test_ids_that_share_a_prefix_stay_apart(reg: Registry) -> None:
    await reg.subscribe("acme", "ab", "t", sub("inapp"), now_ms=T)
    await reg.subscribe("acme", "abc", "t2", sub("inapp"), now_ms=T)
    assert [s.user for s in reg.subscribers("acme", "t").subscribers] == ["ab"]
    assert [t for t, _s in reg.subscriptions("acme", "ab")] == ["t"]
    await reg.erase_user("acme", "ab")
    assert [s.user for s in reg.subscribers("acme", "t2").subscribers] == ["abc"]


# ------------------------------------------------------- preferences, defaults, mandatory
async def test_preferences_defaults_and_mandatory_topics(reg: Registry) -> None:
    body = Preferences(
        rules=[Rule(category="marketing", allow=False)],
        quiet_hours=QuietHours(start="22:00", end="07:00"),
    )
    stored = await reg.put_preferences("acme", "u1", body, now_ms=T)
    assert reg.preferences("acme", "u1") == stored
    assert stored.rules[0].category == "marketing" and stored.quiet_hours is not None
    with pytest.raises(InvalidRequest) as caught:
        await reg.put_preferences(
            "acme", "u1", Preferences(rules=[Rule(channel="fax", allow=True)]), now_ms=T
        )
    assert caught.value.field == "rules[0].channel"
    assert reg.preferences("acme", "u1") == stored  # unchanged
    await reg.put_defaults("acme", Preferences(rules=[Rule(channel="sms", allow=False)]), now_ms=T)
    assert reg.defaults("acme").rules[0].channel == "sms"  # type: ignore[union-attr]
    assert not await reg.set_mandatory("acme", "security", True, now_ms=T)
    assert await reg.set_mandatory("acme", "security", True, now_ms=T)
    await reg.set_mandatory("acme", "billing", True, now_ms=T)
    assert reg.mandatory_topics("acme") == ["billing", "security"]
    assert await reg.set_mandatory("acme", "billing", False, now_ms=T)
    assert reg.is_mandatory("acme", "security") and not reg.is_mandatory("acme", "billing")


# ------------------------------------------------------------------------- consent
async def test_the_consent_ledger_is_append_only_and_its_state_folded(reg: Registry) -> None:
    entries = [
        Consent(channel="sms", opted_in=True, at_ms=T, source="api"),
        Consent(channel="sms", opted_in=False, at_ms=T + 1, source="sms_stop", legal=True),
        Consent(
            channel="email", opted_in=False, at_ms=T + 2, source="unsubscribe_link", legal=True
        ),
        Consent(channel="sms", opted_in=False, at_ms=T + 3, source="api"),  # still legal
    ]
    states = [await reg.record_consent("acme", "u1", e) for e in entries]
    assert [s.legal for s in states] == [False, True, True, True]
    # recorded with their place in the user's whole ledger
    entries = [msgspec.structs.replace(e, order=i) for i, e in enumerate(entries, 1)]
    assert reg.consent_ledger("acme", "u1", "sms") == [entries[0], entries[1], entries[3]]
    assert reg.consent_ledger("acme", "u1") == entries  # oldest first, whatever the channel
    scoped = Consent(channel="sms", opted_in=False, at_ms=T + 4, source="api", scope="topic:deals")
    await reg.record_consent("acme", "u1", scoped)
    assert reg.consent_ledger("acme", "u1", "sms")[-1] == msgspec.structs.replace(scoped, order=5)
    state = reg.consent_state("acme", "u1")
    assert state["sms"] == ConsentState(opted_in=False, legal=True, at_ms=T + 3, source="api")
    back = await reg.record_consent(
        "acme", "u1", Consent(channel="sms", opted_in=True, at_ms=T + 4, source="sms_start")
    )
    assert back.opted_in and not back.legal
    with pytest.raises(InvalidRequest):
        await reg.record_consent(
            "acme", "u1", Consent(channel="fax", opted_in=True, at_ms=T, source="x")
        )


async def test_entries_of_one_millisecond_come_back_in_the_order_recorded(
    reg: Registry,
) -> None:
    """Whatever their channels' order as keys: an opt-out of sms, then an opt-in to email,
    in one millisecond, are listed sms first (the ledger is read channel by channel)."""
    for channel, opted_in in [("sms", False), ("email", True), ("push", False), ("email", False)]:
        await reg.record_consent(
            "acme", "u2", Consent(channel=channel, opted_in=opted_in, at_ms=T, source="api")
        )
    assert [(e.channel, e.opted_in) for e in reg.consent_ledger("acme", "u2")] == [
        ("sms", False),
        ("email", True),
        ("push", False),
        ("email", False),
    ]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), max_size=12))
def test_the_folded_state_is_the_last_entry_with_legality_kept_until_an_opt_in(
    entries: list[tuple[bool, bool]],
) -> None:
    state = None
    for i, (opted_in, legal) in enumerate(entries):
        state = apply_consent(
            state, Consent(channel="sms", opted_in=opted_in, at_ms=i, source="s", legal=legal)
        )
    if not entries:
        return
    assert state is not None and state.opted_in == entries[-1][0]
    last_in = max((i for i, (o, _l) in enumerate(entries) if o), default=-1)
    expected = not entries[-1][0] and any(l for o, l in entries[last_in + 1 :])  # noqa: E741
    assert state.legal == expected


# ------------------------------------------------------------------------ workflows
async def test_workflows_are_checked_versioned_and_parsed_once(reg: Registry) -> None:
    body = {"category": "billing", "steps": [{"channel": "email"}]}
    row = await reg.put_workflow("acme", "orders", body, now_ms=T)
    assert (row.version, row.body) == (1, body)
    plan = reg.plan("acme", "orders")
    assert plan is not None and plan.category == "billing"
    assert reg.plan("acme", "orders") is plan  # cached while the version holds
    with pytest.raises(InvalidRequest) as caught:
        await reg.put_workflow("acme", "orders", {"steps": [{"channel": "fax"}]}, now_ms=T)
    assert caught.value.field == "steps[0].channel"
    assert reg.workflow("acme", "orders") == row
    row2 = await reg.put_workflow("acme", "orders", {"steps": [{"channel": "sms"}]}, now_ms=T + 1)
    assert row2.version == 2
    plan2 = reg.plan("acme", "orders")
    assert plan2 is not None and plan2.channels() == {"sms"}
    assert await reg.delete_workflow("acme", "orders")
    assert reg.plan("acme", "orders") is None and not await reg.delete_workflow("acme", "orders")


# -------------------------------------------------------------------------- fan-out
async def test_recipients_and_cap_charges(reg: Registry) -> None:
    await reg.put_user("acme", "u1", User(email="a@b.c"), now_ms=T)
    got = reg.recipients("acme", ["u1", "ghost"])
    assert [r.id for r in got] == ["u1", "ghost"]
    assert got[0].profile is not None and got[0].profile.contact is not None
    assert got[1].profile is None and got[1].windows is None
    cap = Charge("cap\0*\0*\0*", 2, 3_600_000)
    sends = [("u1", (cap,), tag_of("d1")), ("u1", (cap,), tag_of("d1")), ("ghost", (), 0)]
    reg.record_charges("acme", sends, now_ms=T)  # the same delivery twice counts once
    await reg.sync()
    windows = reg.recipients("acme", ["u1"])[0].windows
    assert windows is not None and windows.logs[cap.key].times == [T]
    assert reg.recipients("acme", ["ghost"])[0].windows is None


# ----------------------------------------------------------------------------- GDPR
async def populate(reg: Registry, tenant: str, user: str) -> None:
    await reg.put_user(tenant, user, User(email="a@b.c", phone="+14155550100"), now_ms=T)
    await reg.put_device(tenant, user, "tok", Device(platform="apns"), now_ms=T)
    await reg.put_preferences(tenant, user, Preferences(rules=[Rule(allow=True)]), now_ms=T)
    for topic in ("orders", "news", "alerts"):
        await reg.subscribe(tenant, user, topic, sub("email", filter={"data.x": 1}), now_ms=T)
    for channel in ("sms", "email"):
        await reg.record_consent(
            tenant, user, Consent(channel=channel, opted_in=True, at_ms=T, source="api")
        )
    reg.record_charges(tenant, [(user, (Charge("cap\0*\0*\0*", 3, 60_000),), 1)], now_ms=T)


async def test_export_holds_everything_on_the_user(reg: Registry) -> None:
    await populate(reg, "acme", "u1")
    export = reg.export_user("acme", "u1")
    assert export.profile is not None and export.profile.contact is not None
    assert set(export.profile.devices) == {"tok"}
    assert sorted(export.subscriptions) == ["alerts", "news", "orders"]
    assert len(export.consent_ledger) == 2 and export.windows is not None
    text = msgspec.json.encode(export)  # what GET /users/{id}/export sends
    assert b"a@b.c" in text and b"+14155550100" in text


async def test_erase_removes_every_row_and_index_entry(reg: Registry) -> None:
    await populate(reg, "acme", "u1")
    await populate(reg, "acme", "u2")
    before = everything_held(reg._kv)
    n = await reg.erase_user("acme", "u1")
    after = everything_held(reg._kv)
    gone = [row for row in before if row not in after]
    assert n == len([r for r in gone if r[0] != "notify.topic_counts"])
    assert not [row for row in after if b"u1" in row[1]]
    assert [row for row in before if b"u2" in row[1]] == [row for row in after if b"u2" in row[1]]
    assert reg.subscriber_count("acme", "orders") == 1
    assert [s.user for s in reg.subscribers("acme", "orders").subscribers] == ["u2"]
    assert reg.export_user("acme", "u1") == reg.export_user("acme", "nobody").__class__(
        user="u1", profile=None, subscriptions={}, consent_ledger=[], windows=None
    )
    await reg.erase_user("acme", "u2")
    assert everything_held(reg._kv) == []


async def test_data_survives_a_reopen(tmp_path: Path) -> None:
    kv = KV(tmp_path / "s")
    reg = Registry(kv)
    await populate(reg, "acme", "u1")
    kv.close()
    kv = KV(tmp_path / "s")
    try:
        reg = Registry(kv)
        assert reg.subscriber_count("acme", "orders") == 1
        assert reg.export_user("acme", "u1").profile is not None
    finally:
        kv.close()


# ----------------------------------------------------------------------- durability
WRITES: list[tuple[str, Callable[[Registry], Coroutine[Any, Any, Any]]]] = [
    ("put_user", lambda r: r.put_user("acme", "u9", User(), now_ms=T)),
    ("put_device", lambda r: r.put_device("acme", "u9", "t", Device(platform="fcm"), now_ms=T)),
    ("invalidate_device", lambda r: r.invalidate_device("acme", "u1", "tok", at_ms=T)),
    ("delete_device", lambda r: r.delete_device("acme", "u1", "tok")),
    ("subscribe", lambda r: r.subscribe("acme", "u9", "orders", sub("email"), now_ms=T)),
    ("unsubscribe", lambda r: r.unsubscribe("acme", "u1", "orders")),
    ("put_preferences", lambda r: r.put_preferences("acme", "u9", Preferences(), now_ms=T)),
    ("put_defaults", lambda r: r.put_defaults("acme", Preferences(), now_ms=T)),
    ("set_mandatory", lambda r: r.set_mandatory("acme", "orders", True, now_ms=T)),
    (
        "record_consent",
        lambda r: r.record_consent(
            "acme", "u9", Consent(channel="sms", opted_in=False, at_ms=T, source="x")
        ),
    ),
    (
        "put_workflow",
        lambda r: r.put_workflow("acme", "o", {"steps": [{"channel": "sms"}]}, now_ms=T),
    ),
    ("delete_workflow", lambda r: r.delete_workflow("acme", "orders")),
    ("erase_user", lambda r: r.erase_user("acme", "u1")),
]


@pytest.mark.parametrize(("name", "write"), WRITES, ids=[n for n, _w in WRITES])
async def test_a_write_returns_only_after_its_sync(
    kv: KV,
    name: str,
    write: Callable[[Registry], Coroutine[Any, Any, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reg = Registry(kv)
    await populate(reg, "acme", "u1")
    await reg.put_workflow("acme", "orders", {"steps": [{"channel": "sms"}]}, now_ms=T)
    gate = threading.Event()
    synced = threading.Event()
    real = kv.sync_now

    def gated() -> None:
        gate.wait(5)
        real()
        synced.set()

    monkeypatch.setattr(kv, "sync_now", gated)
    task = asyncio.create_task(write(reg))
    await asyncio.sleep(0.05)
    assert not task.done(), f"{name} answered before its fsync"
    gate.set()
    async with asyncio.timeout(5):
        await task
    assert synced.is_set()


# ------------------------------------------------------------------- state machine
class SubscriptionsMachine(RuleBasedStateMachine):
    """Both sides of every subscription and the topic counts agree with a model."""

    USERS = ("a", "ab", "b")
    TOPICS = ("t", "t2", "u")

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = tempfile.TemporaryDirectory()
        self.kv = KV(Path(self.dir.name), map_size=16 << 20)
        self.reg = Registry(self.kv)
        self.model: dict[tuple[str, str], list[str]] = {}
        self.loop = asyncio.new_event_loop()

    def teardown(self) -> None:
        self.loop.close()
        self.kv.close()
        self.dir.cleanup()

    @rule(
        user=st.sampled_from(USERS),
        topic=st.sampled_from(TOPICS),
        channels=st.lists(st.sampled_from(["email", "sms", "inapp"]), min_size=1, max_size=3),
    )
    def subscribe(self, user: str, topic: str, channels: list[str]) -> None:
        self.loop.run_until_complete(self.reg.subscribe("x", user, topic, sub(*channels), now_ms=T))
        self.model[(user, topic)] = list(dict.fromkeys(channels))

    @rule(user=st.sampled_from(USERS), topic=st.sampled_from(TOPICS))
    def unsubscribe(self, user: str, topic: str) -> None:
        found = self.loop.run_until_complete(self.reg.unsubscribe("x", user, topic))
        assert found == ((user, topic) in self.model)
        self.model.pop((user, topic), None)

    @rule(user=st.sampled_from(USERS))
    def erase(self, user: str) -> None:
        self.loop.run_until_complete(self.reg.erase_user("x", user))
        self.model = {k: v for k, v in self.model.items() if k[0] != user}

    @invariant()
    def both_sides_agree(self) -> None:
        for topic in self.TOPICS:
            page = self.reg.subscribers("x", topic, limit=100).subscribers
            expected = sorted(
                (u, tuple(sorted(ch))) for (u, t), ch in self.model.items() if t == topic
            )
            assert sorted((s.user, tuple(sorted(s.channels))) for s in page) == expected
            assert self.reg.subscriber_count("x", topic) == len(expected)
        for user in self.USERS:
            mine = [t for t, _s in self.reg.subscriptions("x", user)]
            assert mine == sorted(t for (u, t) in self.model if u == user)


SubscriptionsMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None
)
test_subscriptions_state_machine = SubscriptionsMachine.TestCase


async def test_a_users_contact_log_keeps_its_newest_entries_only(reg: Registry) -> None:
    """Soft bounces come with every mail to a full mailbox: the log is capped, oldest out."""
    await reg.put_user("t", "ann", User(email="ann@example.com"), now_ms=1)
    for i in range(CONTACT_LOG_MAX + 5):
        reg.note_contact(
            "t",
            "ann",
            ContactEvent(at_ms=i, channel="email", kind="soft_bounce", source="bounce_hook"),
        )
    log = reg.contact_log("t", "ann")
    assert len(log) == CONTACT_LOG_MAX
    assert [e.at_ms for e in log] == list(range(5, CONTACT_LOG_MAX + 5))


# ----------------------------------------------- the fan-out's reads, kept between changes
def users_of(reg: Registry, topic: str) -> list[tuple[str, tuple[str, ...]]]:
    return [(s.user, s.channels) for s in reg.subscribers("acme", topic).subscribers]


async def test_a_topic_read_as_empty_shows_every_later_change_of_its_subscribers(
    reg: Registry, kv: KV
) -> None:
    assert users_of(reg, "news") == []  # kept: the topic has no subscribers
    assert users_of(reg, "news") == []
    await reg.subscribe("acme", "u1", "news", sub("email"), now_ms=T)
    assert users_of(reg, "news") == [("u1", ("email",))]
    await reg.subscribe(
        "acme", "u1", "news", sub("sms", filter={"data.region": "eu"}), now_ms=T + 1
    )
    [only] = reg.subscribers("acme", "news").subscribers
    assert only.channels == ("sms",) and only.filter is not None
    # written through another registry on the same store (another Table object)
    other = Registry(kv)
    await other.subscribe("acme", "u2", "news", sub("push"), now_ms=T + 2)
    assert users_of(reg, "news") == [("u1", ("sms",)), ("u2", ("push",))]
    assert await reg.unsubscribe("acme", "u1", "news")
    assert users_of(reg, "news") == [("u2", ("push",))]
    await reg.erase_user("acme", "u2")
    assert users_of(reg, "news") == []


async def test_a_large_topic_is_read_whole_each_time_and_stays_right(reg: Registry) -> None:
    many = [(f"u{i:03d}", sub("email")) for i in range(SMALL_TOPIC + 4)]
    reg.subscribe_many("acme", "big", many, now_ms=T)
    assert len(users_of(reg, "big")) == SMALL_TOPIC + 4
    await reg.subscribe("acme", "u999", "big", sub("sms"), now_ms=T + 1)
    assert users_of(reg, "big")[-1] == ("u999", ("sms",))
    assert len(users_of(reg, "big")) == SMALL_TOPIC + 5


async def test_a_workflow_read_as_absent_shows_its_creation_change_and_removal(
    reg: Registry,
) -> None:
    assert reg.workflow("acme", "orders") is None  # kept: no workflow
    row = await reg.put_workflow("acme", "orders", {"steps": [{"channel": "email"}]}, now_ms=T)
    assert reg.workflow("acme", "orders") == row
    row2 = await reg.put_workflow("acme", "orders", {"steps": [{"channel": "sms"}]}, now_ms=T + 1)
    seen = reg.workflow("acme", "orders")
    assert seen is not None and seen.version == row2.version == 2
    assert await reg.delete_workflow("acme", "orders")
    assert reg.workflow("acme", "orders") is None
    assert reg.plan("acme", "orders") is None

"""Delivery policy (``notify/policy.py``, ``notify/preferences.py``): the documented order,
rule specificity and layers, caps over sliding windows, quiet hours across midnight and DST
(against a brute-force clock, hypothesis), each answer with its reason. No I/O: the clock
and the zone database are arguments."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import InvalidRequest
from notify import windows
from notify.conditions import parse
from notify.model import (
    Cap,
    ConsentState,
    Contact,
    Preferences,
    Profile,
    QuietHours,
    Rule,
    StoredDevice,
    StoredPreferences,
    StoredWebhook,
    UserWindows,
)
from notify.policy import (
    Defer,
    Deliver,
    Occasion,
    Recipient,
    Suppress,
    decide,
    quiet_until,
    wall_instant_ms,
)
from notify.preferences import check_preferences
from notify.windows import tag_of
from notify.workflows import Send

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a Thursday
HOUR = 3_600_000
NY = zoneinfo.ZoneInfo("America/New_York")
ONE_DAY = dt.timedelta(days=1)


def ms(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).timestamp() * 1000)


def prefs(**body: Any) -> StoredPreferences:
    return check_preferences(Preferences(**body), now_ms=0)


def person(
    *,
    tz: str = "UTC",
    consent: dict[str, ConsentState] | None = None,
    preferences: StoredPreferences | None = None,
    devices: dict[str, StoredDevice] | None = None,
    windows_: UserWindows | None = None,
    email: str | None = "ada@example.com",
) -> Recipient:
    contact = Contact(
        email=email,
        phone="+15550100",
        timezone=tz,
        locale="en-GB",
        webhook=StoredWebhook(url="https://example.com/h"),
    )
    profile = Profile(
        contact=contact,
        devices=devices
        if devices is not None
        else {"tok": StoredDevice(platform="fcm", added_ms=0)},
        preferences=preferences,
        consent=consent or {},
    )
    return Recipient("u1", profile, windows_)


def send(channel: str = "sms", cond: dict[str, Any] | None = None) -> Send:
    return Send(3, "steps[3]", channel, None if cond is None else parse(cond, where="steps[3].if"))


def occasion(**kw: Any) -> Occasion:
    base: dict[str, Any] = {
        "topic": "orders.paid",
        "category": "billing",
        "data": {"amount": 50},
        "fields": {"topic": "orders.paid"},
    }
    base.update(kw)
    return Occasion(**base)


STOP = ConsentState(opted_in=False, legal=True, at_ms=T0, source="sms_stop")


def code(decision: Any) -> str:
    if isinstance(decision, Deliver):
        return "deliver"
    return str(decision.reason.code)


# ----------------------------------------------------------------------- the order
def test_a_legal_opt_out_beats_mandatory_and_critical() -> None:
    r = person(consent={"sms": STOP})
    d = decide(send("sms"), occasion(mandatory=True, priority="critical"), r, None, now_ms=T0)
    assert isinstance(d, Suppress) and d.reason.code == "legal_opt_out"
    assert "sms_stop" in d.reason.detail and "2026-01-01T00:00:00Z" in d.reason.detail
    # other channels are not touched by an SMS STOP
    assert isinstance(decide(send("email"), occasion(), r, None, now_ms=T0), Deliver)
    # an opt-out of every channel
    everything = person(consent={"*": STOP})
    assert code(decide(send("inapp"), occasion(), everything, None, now_ms=T0)) == ("legal_opt_out")


def test_an_opt_in_after_a_legal_opt_out_delivers_again() -> None:
    back = ConsentState(opted_in=True, at_ms=T0 + 1, source="sms_start")
    assert isinstance(
        decide(send(), occasion(), person(consent={"sms": back}), None, now_ms=T0), Deliver
    )


def test_the_condition_comes_before_channel_data_and_names_what_failed() -> None:
    r = person(email=None)
    d = decide(send("email", {"data.amount": {"in": [100, 200]}}), occasion(), r, None, now_ms=T0)
    assert isinstance(d, Suppress) and d.reason.code == "condition"
    assert d.reason.detail == "steps[3].if: data.amount in [100,200] (is 50)"
    d = decide(send("email", {"data.amount": 50}), occasion(), r, None, now_ms=T0)
    assert isinstance(d, Suppress) and d.reason.code == "no_channel_data"
    assert d.reason.detail == "no email address"


def test_conditions_see_the_recipient_and_the_event() -> None:
    step = send("sms", {"recipient.locale": {"prefix": "en"}, "event.topic": "orders.paid"})
    assert isinstance(decide(step, occasion(), person(), None, now_ms=T0), Deliver)
    other = send("sms", {"recipient.locale": "fr"})
    assert code(decide(other, occasion(), person(), None, now_ms=T0)) == "condition"


@pytest.mark.parametrize(
    ("channel", "profile", "detail"),
    [
        ("email", Profile(contact=Contact()), "no email address"),
        ("sms", Profile(contact=Contact(email="a@b")), "no phone number"),
        ("webhook", Profile(contact=Contact(phone="+1")), "no webhook endpoint"),
        ("push", Profile(contact=Contact()), "no push device"),
        (
            "push",
            Profile(devices={"t": StoredDevice(platform="apns", added_ms=0, invalid_since_ms=5)}),
            "no valid push device (1 invalidated)",
        ),
        ("email", None, "no email address"),
    ],
)
def test_a_channel_without_data_is_suppressed(
    channel: str, profile: Profile | None, detail: str
) -> None:
    d = decide(send(channel), occasion(), Recipient("u1", profile), None, now_ms=T0)
    assert isinstance(d, Suppress) and (d.reason.code, d.reason.detail) == (
        "no_channel_data",
        detail,
    )


@pytest.mark.parametrize("channel", ["inapp", "console", "null"])
def test_some_channels_need_no_data(channel: str) -> None:
    assert isinstance(
        decide(send(channel), occasion(), Recipient("nobody"), None, now_ms=T0), Deliver
    )


def test_mandatory_skips_preferences_and_plain_opt_outs_but_not_caps_or_quiet_hours() -> None:
    muted = prefs(rules=[Rule(topic="orders.paid", allow=False)])
    optout = ConsentState(opted_in=False, at_ms=T0, source="api")
    r = person(preferences=muted, consent={"sms": optout})
    assert code(decide(send(), occasion(), r, None, now_ms=T0)) == "opt_out"
    assert isinstance(decide(send(), occasion(mandatory=True), r, None, now_ms=T0), Deliver)
    quiet = prefs(
        rules=[Rule(topic="orders.paid", allow=False)],
        quiet_hours=QuietHours(start="22:00", end="07:00"),
        caps=[Cap(max=1, per="1d")],
    )
    d = decide(send(), occasion(mandatory=True), person(preferences=quiet), None, now_ms=T0)
    assert isinstance(d, Defer) and d.reason.code == "quiet_hours"
    full = windows.charge(
        None, [windows.Charge("cap\x00*\x00*\x00*", 1, 24 * HOUR)], now_ms=T0, tag=1
    )
    r = person(preferences=quiet, windows_=full)
    assert code(decide(send(), occasion(mandatory=True), r, None, now_ms=T0 + 8 * HOUR)) == "cap"


def test_critical_skips_caps_and_quiet_hours_but_not_preferences() -> None:
    p = prefs(quiet_hours=QuietHours(start="22:00", end="07:00"), caps=[Cap(max=1, per="1d")])
    full = windows.charge(
        None, [windows.Charge("cap\x00*\x00*\x00*", 1, 24 * HOUR)], now_ms=T0, tag=1
    )
    r = person(preferences=p, windows_=full)
    assert code(decide(send(), occasion(), r, None, now_ms=T0 + HOUR)) == "cap"
    d = decide(send(), occasion(priority="critical"), r, None, now_ms=T0 + HOUR)
    assert d == Deliver()  # and it counts in no cap
    muted = person(preferences=prefs(rules=[Rule(channel="sms", allow=False)]))
    assert code(decide(send(), occasion(priority="critical"), muted, None, now_ms=T0)) == (
        "preference"
    )


# ------------------------------------------------------------------- preferences
SPECIFICITY = [
    # (rule, rank): each allows or denies; the most specific matching one must decide
    (Rule(topic="orders.paid", channel="sms", allow=False), 5),
    (Rule(topic="orders.paid", allow=True), 4),
    (Rule(category="billing", channel="sms", allow=False), 3),
    (Rule(category="billing", allow=True), 2),
    (Rule(topic="*", channel="sms", allow=False), 1),
    (Rule(allow=True), 0),
]


@pytest.mark.parametrize("top", range(len(SPECIFICITY)))
def test_the_most_specific_rule_wins(top: int) -> None:
    rules = [r for r, _rank in SPECIFICITY[top:]]
    rules.reverse()  # order in the body does not matter
    winner = SPECIFICITY[top][0]
    d = decide(send("sms"), occasion(), person(preferences=prefs(rules=rules)), None, now_ms=T0)
    if winner.allow:
        assert isinstance(d, Deliver)
    else:
        assert isinstance(d, Suppress) and d.reason.code == "preference"
        assert d.reason.detail.startswith(f"user rule rules[{rules.index(winner)}]")


def test_rules_that_do_not_match_are_ignored() -> None:
    rules = [
        Rule(topic="orders.refunded", allow=False),
        Rule(category="marketing", allow=False),
        Rule(channel="email", allow=False),
    ]
    r = person(preferences=prefs(rules=rules))
    assert isinstance(decide(send("sms"), occasion(), r, None, now_ms=T0), Deliver)
    assert code(decide(send("email"), occasion(), r, None, now_ms=T0)) == "preference"
    # a category rule needs the occasion to have that category
    r = person(preferences=prefs(rules=[Rule(category="billing", allow=False)]))
    assert isinstance(decide(send(), occasion(category=None), r, None, now_ms=T0), Deliver)


def test_a_users_rule_beats_every_tenant_default() -> None:
    tenant = prefs(rules=[Rule(category="billing", channel="sms", allow=True)])
    user = prefs(rules=[Rule(channel="sms", allow=False)])  # less specific, but the user's
    d = decide(send(), occasion(), person(preferences=user), tenant, now_ms=T0)
    assert isinstance(d, Suppress)
    assert d.reason.detail == "user rule rules[0] (*, channel=sms): deny"
    # without a matching user rule the tenant's default decides
    tenant = prefs(rules=[Rule(category="billing", allow=False)])
    d = decide(send(), occasion(), person(preferences=prefs()), tenant, now_ms=T0)
    assert isinstance(d, Suppress)
    assert d.reason.detail == "tenant default rule rules[0] (category=billing, channel=*): deny"
    assert isinstance(decide(send(), occasion(), person(), None, now_ms=T0), Deliver)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"rules": [Rule(topic="a", category="b", allow=True)]}, "rules[0]"),
        ({"rules": [Rule(channel="fax", allow=True)]}, "rules[0].channel"),
        ({"rules": [Rule(topic="", allow=True)]}, "rules[0].topic"),
        (
            {"rules": [Rule(topic="a", allow=True), Rule(topic="a", channel="*", allow=False)]},
            "rules[1]",
        ),
        ({"rules": [Rule(allow=True), Rule(topic="*", allow=False)]}, "rules[1]"),
        ({"quiet_hours": QuietHours(start="22:00", end="22:00")}, "quiet_hours"),
        ({"quiet_hours": QuietHours(start="25:00", end="07:00")}, "quiet_hours.start"),
        ({"quiet_hours": QuietHours(start="22:00", end="7")}, "quiet_hours.end"),
        ({"caps": [Cap(max=0, per="1d")]}, "caps[0].max"),
        ({"caps": [Cap(max=3, per="1s")]}, "caps[0].per"),
        ({"caps": [Cap(max=3, per="91d")]}, "caps[0].per"),
        ({"caps": [Cap(max=3, per="1d"), Cap(max=5, per="7d")]}, "caps[1]"),
        ({"caps": [Cap(topic="a", category="b", max=3, per="1d")]}, "caps[0]"),
        ({"rules": [Rule(allow=True)] * 101}, "rules"),
    ],
)
def test_preference_errors_name_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        prefs(**body)
    assert caught.value.field == field


# -------------------------------------------------------------------------- caps
def test_a_cap_suppresses_once_full_and_names_the_cap_and_the_next_slot() -> None:
    p = prefs(caps=[Cap(category="billing", max=2, per="1d")])
    r = person(preferences=p)
    state: UserWindows | None = None
    answers = []
    for i in range(3):
        now = T0 + i * HOUR
        d = decide(send(), occasion(), Recipient("u1", r.profile, state), None, now_ms=now)
        answers.append(d)
        if isinstance(d, Deliver):
            state = windows.charge(state, d.charges, now_ms=now, tag=tag_of(f"d{i}"))
    assert [code(a) for a in answers] == ["deliver", "deliver", "cap"]
    last = answers[2]
    assert isinstance(last, Suppress)
    assert last.reason.detail == (
        "user cap caps[0] (category=billing, channel=*): 2 per 1d reached "
        "(2 sent; next slot at 2026-01-02T00:00:00Z)"
    )
    # a day after the first send one slot is free again
    d = decide(send(), occasion(), Recipient("u1", r.profile, state), None, now_ms=T0 + 24 * HOUR)
    assert isinstance(d, Deliver)


def test_caps_match_by_scope_and_a_users_cap_replaces_the_tenants() -> None:
    tenant = prefs(caps=[Cap(max=1, per="1d"), Cap(channel="email", max=1, per="1d")])
    user = prefs(caps=[Cap(max=5, per="1d")])  # same scope as the tenant's first: replaces it
    d = decide(send("sms"), occasion(), person(preferences=user), tenant, now_ms=T0)
    assert isinstance(d, Deliver)
    assert [(c.max, c.per_ms) for c in d.charges] == [(5, 24 * HOUR)]
    d = decide(send("email"), occasion(), person(preferences=user), tenant, now_ms=T0)
    assert isinstance(d, Deliver) and sorted(c.max for c in d.charges) == [1, 5]


# --------------------------------------------------------------------- quiet hours
def quiet(start: str, end: str, tz: str = "UTC") -> Recipient:
    return person(tz=tz, preferences=prefs(quiet_hours=QuietHours(start=start, end=end)))


@pytest.mark.parametrize(
    ("start", "end", "now", "until"),
    [
        ("22:00", "07:00", "2026-01-01T23:30:00+00:00", "2026-01-02T07:00:00+00:00"),
        ("22:00", "07:00", "2026-01-02T03:00:00+00:00", "2026-01-02T07:00:00+00:00"),
        ("22:00", "07:00", "2026-01-02T06:59:59+00:00", "2026-01-02T07:00:00+00:00"),
        ("22:00", "07:00", "2026-01-02T22:00:00+00:00", "2026-01-03T07:00:00+00:00"),
        ("22:00", "07:00", "2026-01-02T07:00:00+00:00", None),
        ("22:00", "07:00", "2026-01-02T21:59:59+00:00", None),
        ("12:00", "14:00", "2026-01-02T13:00:00+00:00", "2026-01-02T14:00:00+00:00"),
        ("12:00", "14:00", "2026-01-02T14:00:00+00:00", None),
        ("00:00", "06:00", "2026-01-02T00:00:00+00:00", "2026-01-02T06:00:00+00:00"),
    ],
)
def test_quiet_hours_defer_to_the_windows_end(
    start: str, end: str, now: str, until: str | None
) -> None:
    d = decide(send(), occasion(), quiet(start, end), None, now_ms=ms(now))
    if until is None:
        assert isinstance(d, Deliver)
    else:
        assert isinstance(d, Defer) and d.until_ms == ms(until)
        assert d.reason.code == "quiet_hours"


def test_quiet_hours_are_in_the_users_zone_and_say_so() -> None:
    r = quiet("22:00", "07:00", "Europe/Paris")
    d = decide(send(), occasion(), r, None, now_ms=ms("2026-01-01T22:30:00+00:00"))  # 23:30 Paris
    assert isinstance(d, Defer)
    assert d.until_ms == ms("2026-01-02T07:00:00+01:00")
    assert d.reason.detail == (
        "user quiet hours 22:00-07:00 Europe/Paris; deferred to 07:00 local (2026-01-02T06:00:00Z)"
    )
    # 21:30 UTC is 22:30 in Paris but only 16:30 in New York
    assert isinstance(
        decide(send(), occasion(), r, None, now_ms=ms("2026-01-01T21:30:00+00:00")), Defer
    )
    ny = quiet("22:00", "07:00", "America/New_York")
    assert isinstance(
        decide(send(), occasion(), ny, None, now_ms=ms("2026-01-01T21:30:00+00:00")), Deliver
    )


def test_tenant_quiet_hours_apply_when_the_user_has_none_and_unknown_zones_read_as_utc() -> None:
    tenant = prefs(quiet_hours=QuietHours(start="22:00", end="07:00"))
    r = person(tz="Mars/Olympus_Mons", preferences=prefs())
    d = decide(send(), occasion(), r, tenant, now_ms=ms("2026-01-01T23:00:00+00:00"))
    assert isinstance(d, Defer)
    assert d.reason.detail.startswith(
        "tenant default quiet hours 22:00-07:00 Mars/Olympus_Mons (unknown zone, read as UTC)"
    )


def test_the_zone_database_is_injected() -> None:
    asked = []

    def zones(name: str) -> dt.tzinfo:
        asked.append(name)
        return dt.timezone(dt.timedelta(hours=10))

    d = decide(
        send(),
        occasion(),
        quiet("22:00", "07:00", "Custom/Ten"),
        None,
        now_ms=ms("2026-01-01T13:00:00+00:00"),
        zones=zones,
    )  # 23:00 at +10
    assert asked == ["Custom/Ten"]
    assert isinstance(d, Defer) and d.until_ms == ms("2026-01-02T07:00:00+10:00")


def test_dst_spring_forward_the_end_in_the_gap_is_the_gaps_end() -> None:
    # New York, 2025-03-09: 02:00 EST jumps to 03:00 EDT; 02:30 does not exist
    start, end = 22 * 60, 2 * 60 + 30
    now = ms("2025-03-09T01:45:00-05:00")
    assert quiet_until(start, end, NY, now) == ms("2025-03-09T03:00:00-04:00")
    # a window that starts in the gap starts when it ends
    assert wall_instant_ms(dt.date(2025, 3, 9), 2 * 60 + 15, NY) == ms("2025-03-09T03:00-04:00")
    # the night is an hour shorter: 22:00 EST to 07:00 EDT is 8 hours
    until = quiet_until(22 * 60, 7 * 60, NY, ms("2025-03-08T22:00:00-05:00"))
    assert until is not None and until - ms("2025-03-08T22:00:00-05:00") == 8 * HOUR


def test_dst_fall_back_the_repeated_hour_does_not_reopen_the_window() -> None:
    # New York, 2025-11-02: 02:00 EDT goes back to 01:00 EST; 01:00-01:59 happens twice
    start, end = 0, 90  # 00:00-01:30
    first_0130 = ms("2025-11-02T01:30:00-04:00")
    assert quiet_until(start, end, NY, ms("2025-11-02T01:10:00-04:00")) == first_0130
    assert quiet_until(start, end, NY, ms("2025-11-02T01:10:00-05:00")) is None  # 2nd 01:10
    # the night is an hour longer: 22:00 EDT to 07:00 EST is 10 hours
    until = quiet_until(22 * 60, 7 * 60, NY, ms("2025-11-01T22:00:00-04:00"))
    assert until is not None and until - ms("2025-11-01T22:00:00-04:00") == 10 * HOUR


def test_a_skipped_day_still_ends_the_window() -> None:
    apia = zoneinfo.ZoneInfo("Pacific/Apia")  # 2011-12-30 did not happen there
    now = ms("2011-12-29T23:00:00-10:00")
    until = quiet_until(22 * 60, 7 * 60, apia, now)
    assert until == ms("2011-12-31T00:00:00+14:00")  # the first instant showing >= 07:00


ZONES = [
    "UTC",
    "America/New_York",
    "Europe/Berlin",
    "Australia/Lord_Howe",  # DST shifts by 30 minutes
    "America/St_Johns",  # -03:30 / -02:30
    "Asia/Kolkata",  # +05:30, no DST
    "Pacific/Chatham",  # +12:45 / +13:45
    "Pacific/Apia",
    "America/Santiago",  # DST at midnight
    "Asia/Tehran",
]


def brute_wall_instant(day: dt.date, minutes: int, zone: dt.tzinfo) -> int:
    """The first minute at which the zone's clock shows at least that time on that day."""
    naive = dt.datetime(day.year, day.month, day.day, minutes // 60, minutes % 60)
    t = int(naive.replace(tzinfo=dt.UTC).timestamp()) - 15 * 3600
    while dt.datetime.fromtimestamp(t, zone).replace(tzinfo=None) < naive:
        t += 60
    return t * 1000


def brute_quiet_until(start: int, end: int, zone: dt.tzinfo, now_ms: int) -> int | None:
    today = dt.datetime.fromtimestamp(now_ms / 1000, zone).date()
    for back in (2, 1, 0):
        day = today - dt.timedelta(days=back)
        s = brute_wall_instant(day, start, zone)
        e = brute_wall_instant(day + dt.timedelta(days=0 if end > start else 1), end, zone)
        if s <= now_ms < e:
            return e
    return None


@settings(max_examples=200, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    now=st.integers(ms("2000-01-01T00:00:00+00:00"), ms("2037-01-01T00:00:00+00:00")).map(
        lambda t: t - t % 60_000
    ),
    start=st.integers(0, 24 * 60 - 1),
    end=st.integers(0, 24 * 60 - 1),
    near_transition=st.booleans(),
    snap=st.sampled_from([None, ("end", 16), ("end", -30), ("start", 16), ("start", -30)]),
)
def test_quiet_until_agrees_with_a_minute_by_minute_clock(
    zone: str,
    now: int,
    start: int,
    end: int,
    near_transition: bool,
    snap: tuple[str, int] | None,
) -> None:
    """Near a clock change (sometimes), with a boundary moved into the hour the change skips
    (+16 min past the old clock's last minute) or repeats (-30 min) (sometimes)."""
    tz = zoneinfo.ZoneInfo(zone)
    if near_transition:  # move to the next offset change (if any within a year), 0-3 h before

        def offset(t: int) -> dt.timedelta | None:
            return dt.datetime.fromtimestamp(t / 1000, tz).utcoffset()

        for h in range(0, 366 * 24, 6):
            if offset(now + h * HOUR) != offset(now):
                lo, hi = now + (h - 6) * HOUR, now + h * HOUR  # bisect to the change
                while hi - lo > 60_000:
                    mid = (lo + hi) // 2 // 60_000 * 60_000
                    lo, hi = (lo, mid) if offset(mid) != offset(lo) else (mid, hi)
                if snap is not None:
                    last = dt.datetime.fromtimestamp((hi - 60_000) / 1000, tz)
                    minute = (last.hour * 60 + last.minute + snap[1]) % (24 * 60)
                    start, end = (start, minute) if snap[0] == "end" else (minute, end)
                now = hi - (now % 7) * HOUR // 2
                break
    if start == end:
        return
    got = quiet_until(start, end, tz, now)
    assert got == brute_quiet_until(start, end, tz, now)
    if got is not None:
        assert got > now
        # deferred once, delivered then; unless the open time between two windows vanished
        # into a skipped hour, and the next window starts the instant this one ends
        if quiet_until(start, end, tz, got) is not None:
            day = dt.datetime.fromtimestamp(got / 1000, tz).date()
            assert got in (
                brute_wall_instant(day, start, tz),
                brute_wall_instant(day - ONE_DAY, start, tz),
            )


@settings(max_examples=300, deadline=None)
@given(
    topic=st.sampled_from([None, "*", "orders.paid", "other"]),
    category=st.sampled_from([None, "*", "billing", "other"]),
    channel=st.sampled_from(["*", "sms", "email"]),
    event_category=st.sampled_from([None, "billing"]),
)
def test_the_fast_rank_agrees_with_the_scope_rank(
    topic: str | None, category: str | None, channel: str, event_category: str | None
) -> None:
    from notify import preferences as p
    from notify.model import StoredRule

    rule = StoredRule(topic=topic, category=category, channel=channel, allow=True)
    for ch in ("sms", "email", "push"):
        assert p._rank(rule, "orders.paid", event_category, ch) == p.rank(
            p.scope_of(rule), "orders.paid", event_category, ch
        )

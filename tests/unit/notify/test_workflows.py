"""Workflow bodies (``notify/workflows.py``): the issue's examples become typed steps, every
error names the field as the client wrote it, bounds hold, and (hypothesis) any JSON either
parses or is refused with a field."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import InvalidRequest
from notify.conditions import Scope
from notify.durations import DAY, HOUR, MINUTE
from notify.model import CHANNELS, Workflow
from notify.workflows import (
    MAX_STEPS,
    Batch,
    Delay,
    Send,
    Throttle,
    WaitSeen,
    default_plan,
    delay_until_ms,
    key_value,
    parse_workflow,
    walk,
)

FULL: dict[str, Any] = {
    "category": "billing",
    "strict_order": True,
    "steps": [
        {"throttle": {"max": 3, "per": "1d", "key": "data.account"}},
        {"batch": {"window": "1h", "key": "data.thread_id", "max": 50}},
        {"channel": "inapp"},
        {"wait_seen": "15m", "else": [{"delay": "5m"}, {"channel": "email"}]},
        {"delay": {"until": "data.due_at"}},
        {"channel": "sms", "if": {"data.amount": {"in": [100, 200]}}},
    ],
}


def test_a_full_workflow_becomes_typed_steps() -> None:
    plan = parse_workflow(FULL)
    assert plan.category == "billing" and plan.strict_order
    throttle, batch, inapp, wait, until, sms = plan.steps
    assert throttle == Throttle(0, "steps[0]", 3, DAY, throttle.key)
    assert throttle.key is not None and throttle.key.text == "data.account"
    assert isinstance(batch, Batch) and (batch.window_ms, batch.max) == (HOUR, 50)
    assert isinstance(inapp, Send) and inapp.channel == "inapp" and inapp.condition is None
    assert isinstance(wait, WaitSeen) and wait.within_ms == 15 * MINUTE
    delay, email = wait.otherwise
    assert delay == Delay(4, "steps[3].else[0]", for_ms=5 * MINUTE)
    assert isinstance(email, Send) and (email.index, email.path) == (5, "steps[3].else[1]")
    assert isinstance(until, Delay) and until.until is not None and until.index == 6
    assert isinstance(sms, Send) and sms.condition is not None and sms.index == 7
    assert sms.condition.matches(Scope({"amount": 200}, {}, {}))
    assert [s.index for s in walk(plan.steps)] == list(range(8))
    assert plan.by_index[5] is email
    assert plan.channels() == {"inapp", "email", "sms"}


def test_a_decoded_body_parses_like_its_json() -> None:
    body = msgspec.json.decode(msgspec.json.encode(FULL), type=Workflow)
    assert parse_workflow(body).steps == parse_workflow(FULL).steps
    assert parse_workflow(body).source is body


def test_indexes_are_stable_for_a_body() -> None:
    a = parse_workflow(FULL)
    b = parse_workflow(msgspec.json.decode(msgspec.json.encode(FULL)))
    assert [(s.index, s.path) for s in walk(a.steps)] == [(s.index, s.path) for s in walk(b.steps)]


def test_the_default_plan_sends_on_each_subscribed_channel_with_fixed_indexes() -> None:
    plan = default_plan(["sms", "email"])
    assert [(s.channel, s.index) for s in plan.steps if isinstance(s, Send)] == [
        ("email", CHANNELS.index("email")),
        ("sms", CHANNELS.index("sms")),
    ]
    assert default_plan(["email"]).steps[0] == plan.steps[0]  # same id whatever else chosen
    with pytest.raises(ValueError):
        default_plan(["pigeon"])


@pytest.mark.parametrize(
    ("steps", "field", "words"),
    [
        ([], "steps", "at least one step"),
        ([{"delay": "1m"}], "steps", "at least one channel step"),
        (["email"], "steps[0]", "Expected `object`"),
        ([{}], "steps[0]", "exactly one of"),
        ([{"channel": "email", "delay": "1m"}], "steps[0]", "found channel, delay"),
        ([{"channel": "pigeon"}], "steps[0].channel", "Invalid enum value"),
        ([{"channel": "email", "iff": {}}], "steps[0].iff", "unknown field"),
        ([{"channel": "email", "if": {"amount": 1}}], "steps[0].if.amount", "data.amount"),
        ([{"channel": "email"}, {"delay": "10"}], "steps[1].delay", "not a duration"),
        ([{"channel": "email"}, {"delay": "31d"}], "steps[1].delay", "outside"),
        ([{"channel": "email"}, {"delay": {"at": "x"}}], "steps[1].delay", "until"),
        ([{"channel": "email"}, {"delay": {"until": "due"}}], "steps[1].delay.until", "data."),
        (
            [{"channel": "email"}, {"delay": {"until": "event.topic"}}],
            "steps[1].delay.until",
            "data.",
        ),
        ([{"batch": {"window": 5}}, {"channel": "email"}], "steps[0].batch.window", "Expected"),
        ([{"batch": {}}, {"channel": "email"}], "steps[0].batch.window", "missing required"),
        ([{"batch": {"window": "8d"}}, {"channel": "email"}], "steps[0].batch.window", "1s..1w"),
        ([{"batch": {"window": "1h", "max": 0}}, {"channel": "sms"}], "steps[0].batch.max", "1"),
        (
            [{"batch": {"window": "1h", "key": "thread"}}, {"channel": "sms"}],
            "steps[0].batch.key",
            "must start with",
        ),
        (
            [{"batch": {"window": "1h"}}, {"batch": {"window": "1h"}}, {"channel": "sms"}],
            "steps[1].batch",
            "at most one batch",
        ),
        ([{"throttle": {"max": 3}}, {"channel": "sms"}], "steps[0].throttle.per", "missing"),
        (
            [{"throttle": {"max": 0, "per": "1d"}}, {"channel": "sms"}],
            "steps[0].throttle.max",
            "1 to",
        ),
        ([{"wait_seen": "15m", "else": [{"channel": "sms"}]}], "steps[0].wait_seen", "nothing"),
        ([{"channel": "inapp"}, {"wait_seen": "15m"}], "steps[1].else", "at least one step"),
        (
            [{"channel": "inapp"}, {"wait_seen": "15m", "else": [{"delay": "x"}]}],
            "steps[1].else[0].delay",
            "not a duration",
        ),
        (
            [{"channel": "inapp"}, {"wait_seen": "15m", "else": [{"channel": "x"}]}],
            "steps[1].else[0].channel",
            "enum",
        ),
        (
            [{"channel": "inapp"}, {"wait_seen": "8d", "else": [{"channel": "sms"}]}],
            "steps[1].wait_seen",
            "outside",
        ),
    ],
)
def test_errors_name_the_field_as_written(steps: list[Any], field: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_workflow({"steps": steps})
    assert caught.value.field == field, str(caught.value)
    assert words in str(caught.value)
    assert str(caught.value).startswith(field)


def test_body_level_errors() -> None:
    for body, field in [
        ({}, "steps"),
        ({"steps": "x"}, "steps"),
        ({"steps": [{"channel": "sms"}], "category": ""}, "category"),
        ({"steps": [{"channel": "sms"}], "colour": "red"}, "colour"),
        ({"steps": [{"channel": "sms"}], "strict_order": "yes"}, "strict_order"),
    ]:
        with pytest.raises(InvalidRequest) as caught:
            parse_workflow(body)
        assert caught.value.field == field


def test_steps_and_branch_depth_are_bounded() -> None:
    parse_workflow({"steps": [{"channel": "inapp"}] * MAX_STEPS})
    with pytest.raises(InvalidRequest, match="at most 20 steps") as caught:
        parse_workflow({"steps": [{"channel": "inapp"}] * (MAX_STEPS + 1)})
    assert caught.value.field == f"steps[{MAX_STEPS}]"
    branch: list[Any] = [{"channel": "sms"}]
    for _ in range(4):
        branch = [{"channel": "inapp"}, {"wait_seen": "1m", "else": branch}]
    with pytest.raises(InvalidRequest, match="nest at most"):
        parse_workflow({"steps": branch})


def test_delay_until_reads_an_rfc3339_time_from_the_data() -> None:
    step = parse_workflow(
        {"steps": [{"delay": {"until": "data.due_at"}}, {"channel": "sms"}]}
    ).steps[0]
    assert isinstance(step, Delay)

    def at(value: Any) -> int | None:
        return delay_until_ms(step, Scope({"due_at": value}, {}, {}))

    assert at("2026-01-02T03:04:05Z") == 1767323045000
    assert at("2026-01-02T04:04:05+01:00") == 1767323045000
    assert at("2026-01-02T03:04:05") is None  # no offset: never guess a zone
    assert at("tomorrow") is None
    assert at(1767323045000) is None
    assert delay_until_ms(step, Scope({}, {}, {})) is None


def test_key_values() -> None:
    plan = parse_workflow(
        {"steps": [{"batch": {"window": "1h", "key": "data.k"}}, {"channel": "sms"}]}
    )
    batch = plan.steps[0]
    assert isinstance(batch, Batch)
    assert key_value(batch.key, Scope({"k": "t-1"}, {}, {})) == "t-1"
    assert key_value(batch.key, Scope({"k": 7}, {}, {})) == "7"
    assert key_value(batch.key, Scope({"k": {"a": [1]}}, {}, {})) == '{"a":[1]}'
    assert key_value(batch.key, Scope({}, {}, {})) == ""
    assert key_value(None, Scope({"k": 1}, {}, {})) == ""
    assert len(key_value(batch.key, Scope({"k": "x" * 1000}, {}, {}))) == 256


step_st = st.recursive(
    st.one_of(
        st.builds(lambda c: {"channel": c}, st.sampled_from([*CHANNELS, "fax", 3])),
        st.builds(lambda d: {"delay": d}, st.sampled_from(["1m", "0s", "31d", {"until": "x"}])),
        st.builds(
            lambda w, m: {"batch": {"window": w, "max": m}},
            st.sampled_from(["1h", "1y"]),
            st.integers(-1, 2000),
        ),
        st.builds(
            lambda m, p: {"throttle": {"max": m, "per": p}},
            st.integers(-1, 2000),
            st.sampled_from(["1d", "", 5]),
        ),
        st.dictionaries(st.text(max_size=5), st.none() | st.integers(), max_size=2),
    ),
    lambda inner: st.builds(
        lambda w, e: {"wait_seen": w, "else": e},
        st.sampled_from(["15m", "1s", "9d"]),
        st.lists(inner, max_size=3),
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(step_st, max_size=6), category=st.none() | st.text(max_size=3))
def test_any_body_either_parses_or_names_a_field(steps: list[Any], category: Any) -> None:
    body: dict[str, Any] = {"steps": steps}
    if category is not None:
        body["category"] = category
    try:
        plan = parse_workflow(body)
    except InvalidRequest as exc:
        assert exc.field is not None
        assert exc.field.split("[")[0].split(".")[0] in ("steps", "category")
        return
    indexes = [s.index for s in walk(plan.steps)]
    assert indexes == list(range(len(indexes))) == sorted(plan.by_index)

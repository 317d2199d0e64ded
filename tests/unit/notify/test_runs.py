"""The run machine (``notify/runs.py``): each step kind, where a run parks and resumes, and
that the ids it produces are stable (the property a redo after a crash relies on)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from notify import ids
from notify.conditions import Scope
from notify.runs import END, Go, Hold, Skip, advance, layout
from notify.workflows import Send, Throttle, default_plan, parse_workflow

NOW = 1_800_000_000_000


def run(body: dict[str, Any], at: int | None = None, *, data: Any = None, **kw: Any) -> Any:
    plan = parse_workflow(body)
    where = layout(plan)
    return advance(
        plan,
        where,
        where.first if at is None else at,
        seed="run-1",
        scope=Scope(data or {}, {"id": "u1"}, {"topic": "t"}),
        now_ms=NOW,
        decide=kw.get("decide", lambda step: Go()),
        throttle=kw.get("throttle", lambda step, key: None),
    )


def test_channel_steps_emit_one_delivery_each_with_stable_ids() -> None:
    out = run({"steps": [{"channel": "webhook"}, {"channel": "console"}]})
    assert [(e.channel, e.step) for e in out.emits] == [("webhook", 0), ("console", 1)]
    assert out.emits[0].delivery_id == ids.delivery_id("run-1", "webhook", 0)
    assert out.park is None
    again = run({"steps": [{"channel": "webhook"}, {"channel": "console"}]})
    assert again.emits == out.emits


def test_suppression_is_noted_with_its_reason_and_the_run_goes_on() -> None:
    def decide(step: Send) -> Any:
        return Skip("preference", "deny orders x webhook") if step.channel == "webhook" else Go()

    out = run({"steps": [{"channel": "webhook"}, {"channel": "console"}]}, decide=decide)
    assert [e.channel for e in out.emits] == ["console"]
    (note,) = out.notes
    assert (note.status, note.channel, note.reason) == ("suppressed", "webhook", "preference")


def test_quiet_hours_park_the_run_at_the_deferred_step_itself() -> None:
    out = run(
        {"steps": [{"channel": "webhook"}, {"channel": "console"}]},
        decide=lambda step: Hold(NOW + 60_000, "quiet_hours", "22:00-07:00"),
    )
    assert out.emits == []
    assert out.park is not None
    assert (out.park.kind, out.park.until_ms, out.park.resume_at) == (
        "quiet_hours",
        NOW + 60_000,
        0,
    )
    assert out.notes[0].status == "deferred" and out.notes[0].until_ms == NOW + 60_000


def test_delay_parks_and_resumes_after_it() -> None:
    body = {"steps": [{"delay": "10m"}, {"channel": "webhook"}]}
    out = run(body)
    assert out.park is not None and out.park.kind == "delay"
    assert out.park.until_ms == NOW + 600_000 and out.park.resume_at == 1
    resumed = run(body, at=out.park.resume_at)
    assert [e.channel for e in resumed.emits] == ["webhook"] and resumed.park is None


def test_delay_until_a_data_field_and_a_missing_field_does_not_wait() -> None:
    body = {"steps": [{"delay": {"until": "data.due"}}, {"channel": "webhook"}]}
    # NOW is 2027-01-15T08:00:00Z
    out = run(body, data={"due": "2027-01-15T09:00:00Z"})
    assert out.park is not None and out.park.until_ms == NOW + 3_600_000
    past = run(body, data={"due": "2027-01-15T07:00:00Z"})
    assert past.park is None and [e.channel for e in past.emits] == ["webhook"]
    missing = run(body, data={})
    assert missing.park is None and [e.channel for e in missing.emits] == ["webhook"]
    assert missing.notes[0].status == "delay_skipped"


def test_batch_parks_with_its_key_and_window() -> None:
    body = {"steps": [{"batch": {"window": "1h", "key": "data.thread"}}, {"channel": "webhook"}]}
    out = run(body, data={"thread": "t9"})
    assert out.park is not None
    assert (out.park.kind, out.park.batch_key, out.park.window_ms) == ("batch", "t9", 3_600_000)
    assert out.park.resume_at == 1


def test_throttle_refusal_ends_the_run_with_a_note() -> None:
    def throttle(step: Throttle, key: str) -> Skip | None:
        return Skip("throttle", f"max {step.max} per {step.per_ms} ms for {key!r}")

    out = run(
        {"steps": [{"throttle": {"max": 1, "per": "1h"}}, {"channel": "webhook"}]},
        throttle=throttle,
    )
    assert out.emits == [] and out.park is None
    assert out.notes[0].reason == "throttle"


def test_wait_seen_parks_then_its_else_branch_runs_and_ends_the_run() -> None:
    body = {
        "steps": [
            {"channel": "webhook"},
            {"wait_seen": "15m", "else": [{"channel": "console"}]},
        ]
    }
    out = run(body)
    assert [e.channel for e in out.emits] == ["webhook"]
    assert out.park is not None and out.park.kind == "wait_seen"
    assert out.park.until_ms == NOW + 900_000
    escalated = run(body, at=out.park.resume_at)
    assert [e.channel for e in escalated.emits] == ["console"] and escalated.park is None


def test_layout_of_the_default_plan() -> None:
    plan = default_plan(["webhook", "console"])
    where = layout(plan)
    order = []
    i = where.first
    while i != END:
        order.append(plan.by_index[i])
        i = where.after[i]
    assert [s.channel for s in order if isinstance(s, Send)] == ["webhook", "console"]


@given(st.lists(st.sampled_from(["webhook", "console", "email", "sms"]), min_size=1, max_size=4))
def test_delivery_ids_depend_only_on_seed_channel_and_step(channels: list[str]) -> None:
    steps = [{"channel": c} for c in channels]
    a = run({"steps": steps})
    b = run({"steps": steps})
    assert [e.delivery_id for e in a.emits] == [e.delivery_id for e in b.emits]
    assert len({e.delivery_id for e in a.emits}) == len(a.emits)

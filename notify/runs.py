"""The workflow step machine for one run: one event for one recipient. Pure: no I/O, no clock
(``now_ms`` is an argument), no registry (its answers come in as values and callables).

A run starts at its plan's first step (or, resumed by a timer, at the step the timer names)
and goes step by step until it ends or parks:

- a channel step (:class:`~notify.workflows.Send`) asks the policy (``decide``) and emits a
  delivery (:class:`Emit`), notes a suppression and goes on, or parks until the policy's
  deferral ends (quiet hours), to decide that step again then;
- ``delay`` parks until ``now + for`` or the time at its ``until`` field (a missing or
  malformed time, or one already past, does not wait: the run goes on, noted as
  ``delay_skipped``);
- ``batch`` parks in a batch window (``notify.digests`` decides whether this run opens the
  window, then it is resumed with every member's activity when the window closes, or joins
  one, then it ends here);
- ``throttle`` lets the run through or ends it (``throttle`` callable: the sliding window);
- ``wait_seen`` parks until its deadline; the timer resumes the ``else`` branch only if the
  notification was not seen by then (the caller checks), else the run ends.

The run ends at the end of its sequence (an ``else`` branch ends the run too). What a run
produces is a :class:`Progress`: deliveries to queue, notes for the audit, and at most one
:class:`Park`. The caller makes them durable; computing the same run again gives the same
ids (``notify.ids``), which is what makes a redo after a crash harmless.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

from notify import ids
from notify.conditions import Scope
from notify.workflows import (
    Batch,
    Delay,
    Plan,
    Send,
    Step,
    Throttle,
    WaitSeen,
    delay_until_ms,
    key_value,
)

END: Final = -1  # a resume point meaning "the run is over"

ParkKind = Literal["delay", "quiet_hours", "batch", "wait_seen", "deliver_at"]


# ------------------------------------------------------------------ what the policy says
@dataclass(frozen=True, slots=True)
class Go:
    """Deliver now; ``charges`` are the policy's cap windows, recorded once queued."""

    charges: tuple[object, ...] = ()


@dataclass(frozen=True, slots=True)
class Skip:
    """Do not deliver (suppressed), with the reason's ``code`` and human ``detail``."""

    code: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Hold:
    """Decide again at ``until_ms`` (a quiet-hours deferral)."""

    until_ms: int
    code: str
    detail: str = ""


Verdict = Go | Skip | Hold
Decide = Callable[[Send], Verdict]
ThrottleCheck = Callable[[Throttle, str], Skip | None]


# ------------------------------------------------------------------------- its outputs
@dataclass(frozen=True, slots=True)
class Emit:
    """Queue one delivery on ``channel`` for the channel step ``step``."""

    channel: str
    step: int
    delivery_id: str
    charges: tuple[object, ...] = ()


@dataclass(frozen=True, slots=True)
class Note:
    """An audit transition of the run: ``status`` (suppressed, deferred, ...) of ``channel``
    (None for the run as a whole) at ``step``, with the deciding reason."""

    status: str
    step: int
    channel: str | None = None
    reason: str | None = None
    detail: str | None = None
    until_ms: int | None = None
    delivery_id: str | None = None


@dataclass(frozen=True, slots=True)
class Park:
    """The run waits: until ``until_ms`` (``kind`` says for what), then resumes at
    ``resume_at`` (a step index, or :data:`END`). ``step`` is the step that parked it;
    ``batch_key``/``window_ms``/``max_items`` describe a batch window."""

    kind: ParkKind
    until_ms: int
    resume_at: int
    step: int
    batch_key: str = ""
    window_ms: int = 0
    max_items: int = 0


@dataclass(slots=True)
class Progress:
    emits: list[Emit] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    park: Park | None = None


# ------------------------------------------------------------------------ the layout
@dataclass(frozen=True, slots=True)
class Layout:
    """Where each step goes next: ``after[i]`` is the step that follows step ``i`` in its
    sequence (:data:`END` at a sequence's end); ``first`` the plan's first step."""

    first: int
    after: dict[int, int]


def layout(plan: Plan) -> Layout:
    after: dict[int, int] = {}

    def walk(steps: tuple[Step, ...]) -> None:
        for pos, step in enumerate(steps):
            after[step.index] = steps[pos + 1].index if pos + 1 < len(steps) else END
            if isinstance(step, WaitSeen):
                walk(step.otherwise)

    walk(plan.steps)
    return Layout(plan.steps[0].index if plan.steps else END, after)


def wait_seen_branch(plan: Plan, step: int) -> int:
    """The first step of the ``else`` branch of the wait_seen step ``step``."""
    ws = plan.by_index[step]
    assert isinstance(ws, WaitSeen)
    return ws.otherwise[0].index


# ------------------------------------------------------------------------- the machine
def advance(
    plan: Plan,
    where: Layout,
    at: int,
    *,
    seed: str,
    scope: Scope,
    now_ms: int,
    decide: Decide,
    throttle: ThrottleCheck,
) -> Progress:
    """Run from step ``at`` until the run ends or parks. ``seed`` is what delivery ids
    derive from (the run id; a closed batch's id when resuming after a batch). Never
    raises for any data: conditions and key paths answer for missing fields."""
    out = Progress()
    i = at
    while i != END:
        step = plan.by_index[i]
        nxt = where.after[i]
        if isinstance(step, Send):
            verdict = decide(step)
            did = ids.delivery_id(seed, step.channel, i)
            if isinstance(verdict, Go):
                out.emits.append(Emit(step.channel, i, did, verdict.charges))
            elif isinstance(verdict, Skip):
                out.notes.append(
                    Note("suppressed", i, step.channel, verdict.code, verdict.detail, None, did)
                )
            else:
                out.notes.append(
                    Note(
                        "deferred",
                        i,
                        step.channel,
                        verdict.code,
                        verdict.detail,
                        verdict.until_ms,
                        did,
                    )
                )
                out.park = Park("quiet_hours", verdict.until_ms, i, i)
                return out
        elif isinstance(step, Delay):
            until = now_ms + step.for_ms if step.for_ms is not None else delay_until_ms(step, scope)
            if until is not None and until > now_ms:
                out.park = Park("delay", until, nxt, i)
                return out
            if until is None:
                path = step.until.text if step.until is not None else "?"
                out.notes.append(
                    Note("delay_skipped", i, None, "delay_until", f"{path} is not an RFC 3339 time")
                )
        elif isinstance(step, Batch):
            out.park = Park(
                "batch",
                now_ms + step.window_ms,
                nxt,
                i,
                batch_key=key_value(step.key, scope),
                window_ms=step.window_ms,
                max_items=step.max,
            )
            return out
        elif isinstance(step, Throttle):
            refused = throttle(step, key_value(step.key, scope))
            if refused is not None:
                out.notes.append(Note("suppressed", i, None, refused.code, refused.detail))
                return out
        else:
            assert isinstance(step, WaitSeen)
            out.park = Park("wait_seen", now_ms + step.within_ms, step.otherwise[0].index, i)
            return out
        i = nxt
    return out


def throttle_key(topic: str, step: int, key: str) -> str:
    """The sliding-window key of a throttle step (per user, topic, step and key value)."""
    return f"throttle\0{topic}\0{step}\0{key}"

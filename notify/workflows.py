"""Workflows: check a workflow body once and turn it into typed, immutable steps. Pure.

``PUT /workflows/{topic}`` takes ``{"category"?, "strict_order"?, "steps": [...]}`` where each
step is exactly one of::

    {"channel": "email", "if"?: condition}            send on a channel (notify.conditions)
    {"delay": "10m"} | {"delay": {"until": "data.due_at"}}
    {"batch": {"window": "1h", "key"?: "data.thread_id", "max"?: 100}}
    {"throttle": {"max": 3, "per": "1d", "key"?: "data.account"}}
    {"wait_seen": "15m", "else": [steps]}             escalate when not seen in time

:func:`parse_workflow` answers a :class:`Plan`, or raises :class:`InvalidRequest` naming the
field at fault the way a client wrote it (``steps[2].batch.window``,
``steps[3].else[0].channel``). Every duration and count is bounded (the ``MAX_*`` / ``*_MS``
constants below). Each step carries an ``index``, unique in its workflow (pre-order through
``else`` branches) and stable for a given body: a delivery id is derived from it, so editing
a workflow changes the ids of the steps that moved, never those of an event already fanned
out under the old body.

A topic without a workflow delivers on each channel the recipient subscribed with:
:func:`default_plan`. Its send steps are numbered by channel (``CHANNELS`` order), so a
recipient's delivery id on a channel does not depend on which other channels they chose.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import msgspec

from broker.errors import InvalidRequest, field_of
from notify.conditions import MISSING, FieldPath, Predicate, Scope, parse, parse_path
from notify.durations import DAY, SECOND, parse_duration
from notify.model import (
    CHANNELS,
    BatchStep,
    ChannelStep,
    DelayStep,
    ThrottleStep,
    WaitSeenStep,
    Workflow,
)

MAX_STEPS: Final = 20  # every step, those inside else branches included
MAX_BRANCH_DEPTH: Final = 3  # wait_seen inside an else inside a wait_seen's else ...
MAX_CATEGORY: Final = 100  # characters
DELAY_MS: Final = (SECOND, 30 * DAY)
BATCH_WINDOW_MS: Final = (SECOND, 7 * DAY)
BATCH_MAX_ITEMS: Final = 1_000
THROTTLE_PER_MS: Final = (SECOND, 30 * DAY)
THROTTLE_MAX: Final = 1_000
WAIT_SEEN_MS: Final = (SECOND, 7 * DAY)
MAX_KEY_TEXT: Final = 256  # characters of a batch or throttle key value

_KINDS: Final = ("channel", "delay", "batch", "throttle", "wait_seen")
S = TypeVar("S")


# ------------------------------------------------------------------------------- steps
@dataclass(frozen=True, slots=True)
class Send:
    """Send on ``channel`` if ``condition`` (None: always) holds."""

    index: int
    path: str  # where it is in the body, e.g. "steps[3].else[0]"
    channel: str
    condition: Predicate | None = None


@dataclass(frozen=True, slots=True)
class Delay:
    """Wait ``for_ms``, or until the time at ``until`` (exactly one is set)."""

    index: int
    path: str
    for_ms: int | None = None
    until: FieldPath | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """Collect this recipient's events per ``key`` value for ``window_ms`` from the first,
    then continue once with all of them (at most ``max`` kept; the count is kept whole)."""

    index: int
    path: str
    window_ms: int
    max: int
    key: FieldPath | None = None


@dataclass(frozen=True, slots=True)
class Throttle:
    """Let at most ``max`` runs per recipient and ``key`` value through per ``per_ms``
    (sliding window, ``notify.windows``); the others stop here."""

    index: int
    path: str
    max: int
    per_ms: int
    key: FieldPath | None = None


@dataclass(frozen=True, slots=True)
class WaitSeen:
    """Wait up to ``within_ms`` for the notification to be seen; if it is not, run
    ``otherwise`` (the ``else`` steps), else end the run."""

    index: int
    path: str
    within_ms: int
    otherwise: tuple[Step, ...]


Step = Send | Delay | Batch | Throttle | WaitSeen


@dataclass(frozen=True, slots=True)
class Plan:
    """A checked workflow. ``source`` is the body as given (store it, answer GET with it);
    ``by_index`` holds every step, those inside ``else`` branches included."""

    steps: tuple[Step, ...]
    category: str | None = None
    strict_order: bool = False
    source: Workflow | None = None  # None for the default plan
    by_index: dict[int, Step] = field(default_factory=dict, compare=False)

    def channels(self) -> frozenset[str]:
        """Every channel a run of this plan may send on."""
        return frozenset(s.channel for s in self.by_index.values() if isinstance(s, Send))


# ----------------------------------------------------------------------------- parsing
def parse_workflow(body: Workflow | dict[str, Any]) -> Plan:
    """Check ``body`` (a decoded ``Workflow`` or its JSON object) and build its plan.

    Raises :class:`InvalidRequest` naming the field at fault when: a step is not exactly one
    of the five kinds or has a field of the wrong type or an unknown one; a duration or count
    is out of bounds; a condition or field path is malformed (``notify.conditions``); there is
    no channel step; a ``wait_seen`` comes before anything was sent on its branch or has an
    empty ``else``; there are more than :data:`MAX_STEPS` steps, branches deeper than
    :data:`MAX_BRANCH_DEPTH` or more than one batch step."""
    if not isinstance(body, Workflow):
        body = _convert(body, Workflow, "")
    if body.category is not None and not 1 <= len(body.category) <= MAX_CATEGORY:
        raise InvalidRequest(f"category: 1-{MAX_CATEGORY} characters", field="category")
    builder = _Builder()
    steps = builder.branch(body.steps, "steps", depth=0, sent_before=False)
    if not any(isinstance(s, Send) for s in builder.by_index.values()):
        raise InvalidRequest("steps: a workflow needs at least one channel step", field="steps")
    return Plan(steps, body.category, body.strict_order, body, builder.by_index)


def default_plan(channels: Iterable[str]) -> Plan:
    """The plan of a topic without a workflow for a recipient subscribed with ``channels``:
    one send per channel, in ``CHANNELS`` order, indexed by the channel's position there.
    Raises :class:`ValueError` for a channel Herald does not know."""
    wanted = set(channels)
    unknown = wanted.difference(CHANNELS)
    if unknown:
        raise ValueError(f"unknown channels {sorted(unknown)}")
    steps = tuple(Send(CHANNELS.index(ch), f"default[{ch}]", ch) for ch in CHANNELS if ch in wanted)
    return Plan(steps, by_index={s.index: s for s in steps})


class _Builder:
    def __init__(self) -> None:
        self.by_index: dict[int, Step] = {}
        self.count = 0  # indexes handed out (a wait_seen takes its own before its branch's)
        self.batches = 0

    def branch(
        self, raw: list[Any], where: str, *, depth: int, sent_before: bool
    ) -> tuple[Step, ...]:
        if not raw:
            raise InvalidRequest(f"{where}: at least one step", field=where)
        out: list[Step] = []
        for i, item in enumerate(raw):
            here = f"{where}[{i}]"
            step = self.step(item, here, depth=depth, sent_before=sent_before)
            sent_before = sent_before or isinstance(step, Send)
            out.append(step)
        return tuple(out)

    def _next_index(self, where: str) -> int:
        index = self.count
        if index >= MAX_STEPS:
            raise InvalidRequest(f"{where}: a workflow has at most {MAX_STEPS} steps", field=where)
        self.count += 1
        return index

    def step(self, item: Any, where: str, *, depth: int, sent_before: bool) -> Step:
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where}: a step is an object", field=where)
        kinds = [k for k in _KINDS if k in item]
        if len(kinds) != 1:
            found = f"found {', '.join(kinds)}" if kinds else f"keys were {sorted(item)[:5]}"
            raise InvalidRequest(
                f"{where}: a step has exactly one of {', '.join(_KINDS)} ({found})", field=where
            )
        kind = kinds[0]
        index = self._next_index(where)
        step: Step
        if kind == "channel":
            ch = _convert(item, ChannelStep, where)
            cond = None if ch.if_ is None else parse(ch.if_, where=f"{where}.if")
            step = Send(index, where, ch.channel, cond)
        elif kind == "delay":
            step = _delay(_convert(item, DelayStep, where), index, where)
        elif kind == "batch":
            b = _convert(item, BatchStep, where).batch
            self.batches += 1
            if self.batches > 1:
                raise InvalidRequest(
                    f"{where}.batch: a workflow has at most one batch step", field=f"{where}.batch"
                )
            window = parse_duration(
                b.window,
                field=f"{where}.batch.window",
                min_ms=BATCH_WINDOW_MS[0],
                max_ms=BATCH_WINDOW_MS[1],
            )
            _count(b.max, BATCH_MAX_ITEMS, f"{where}.batch.max")
            step = Batch(index, where, window, b.max, _key(b.key, f"{where}.batch.key"))
        elif kind == "throttle":
            t = _convert(item, ThrottleStep, where).throttle
            _count(t.max, THROTTLE_MAX, f"{where}.throttle.max")
            per = parse_duration(
                t.per,
                field=f"{where}.throttle.per",
                min_ms=THROTTLE_PER_MS[0],
                max_ms=THROTTLE_PER_MS[1],
            )
            step = Throttle(index, where, t.max, per, _key(t.key, f"{where}.throttle.key"))
        else:
            w = _convert(item, WaitSeenStep, where)
            if not sent_before:
                raise InvalidRequest(
                    f"{where}.wait_seen: nothing is sent before it, so nothing can be seen",
                    field=f"{where}.wait_seen",
                )
            if depth + 1 > MAX_BRANCH_DEPTH:
                raise InvalidRequest(
                    f"{where}.else: branches nest at most {MAX_BRANCH_DEPTH} deep",
                    field=f"{where}.else",
                )
            within = parse_duration(
                w.wait_seen,
                field=f"{where}.wait_seen",
                min_ms=WAIT_SEEN_MS[0],
                max_ms=WAIT_SEEN_MS[1],
            )
            otherwise = self.branch(w.else_, f"{where}.else", depth=depth + 1, sent_before=True)
            step = WaitSeen(index, where, within, otherwise)
        self.by_index[index] = step
        return step


def _delay(d: DelayStep, index: int, where: str) -> Delay:
    if isinstance(d.delay, str):
        ms = parse_duration(d.delay, field=f"{where}.delay", min_ms=DELAY_MS[0], max_ms=DELAY_MS[1])
        return Delay(index, where, for_ms=ms)
    if set(d.delay) != {"until"}:
        raise InvalidRequest(
            f'{where}.delay: a duration such as "10m" or {{"until": "data.<field>"}}',
            field=f"{where}.delay",
        )
    path = parse_path(d.delay["until"], where=f"{where}.delay.until", roots=("data",))
    return Delay(index, where, until=path)


def _key(text: str | None, where: str) -> FieldPath | None:
    return None if text is None else parse_path(text, where=where)


def _count(n: int, most: int, where: str) -> None:
    if not 1 <= n <= most:
        raise InvalidRequest(f"{where}: 1 to {most}", field=where)


def _convert(item: Any, kind: type[S], where: str) -> S:
    """msgspec's checks of ``item`` as ``kind``, its errors renamed to the client's path."""
    try:
        return msgspec.convert(item, kind)
    except msgspec.ValidationError as exc:
        message = str(exc)
        rel = field_of(message)
        name = ".".join(p for p in (where, rel) if p) or kind.__name__
        text = message.split(" - at `")[0]
        raise InvalidRequest(f"{name}: {text}", field=name) from None


# --------------------------------------------------------------------- run-time helpers
def delay_until_ms(step: Delay, scope: Scope) -> int | None:
    """The Unix ms a ``{"until": path}`` delay waits for: the RFC 3339 time (with an offset
    or ``Z``) at the path. None when the field is missing or not such a time (the run's
    machine decides what then; it never guesses a time zone)."""
    if step.until is None:
        return None
    value = step.until.resolve(scope)
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return int(when.timestamp() * 1000)


def key_value(path: FieldPath | None, scope: Scope) -> str:
    """The text of a batch or throttle key for ``scope``: a string as is, another JSON
    value as its JSON text, ``""`` when there is no key or the field is missing. Longer
    than :data:`MAX_KEY_TEXT` characters, it is cut (values that share that prefix share
    a batch)."""
    if path is None:
        return ""
    value = path.resolve(scope)
    if value is MISSING or value is None:
        return ""
    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    return text[:MAX_KEY_TEXT]


def walk(steps: Iterable[Step]) -> Iterator[Step]:
    """Every step of ``steps`` in index order (pre-order through ``else`` branches)."""
    for step in steps:
        yield step
        if isinstance(step, WaitSeen):
            yield from walk(step.otherwise)

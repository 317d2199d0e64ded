"""The condition language: small, declarative, never code. Pure: no clock, no I/O.

One language serves a workflow step's ``if``, a subscription's ``filter`` (SNS filter policies
are the model) and anything else that asks "does this notification match?". A condition is a
JSON object; each key is a **field path** or a **combinator**, and every key must hold (AND)::

    {"data.amount": 100}                          equals (a string, number, boolean or null)
    {"data.region": {"in": ["eu", "us"]}}         one of; a bare list means the same
    {"recipient.locale": {"prefix": "en"}}        a string starting with
    {"data.coupon": {"exists": false}}            present (a null counts as absent)
    {"event.topic": {"not": {"prefix": "test."}}} the negation of any of the above
    {"any": [cond, ...]}, {"all": [cond, ...]}, {"not": cond}

A field path starts at ``data`` (the event's data), ``recipient`` (id, email, phone, timezone,
locale) or ``event`` (topic, category, priority, event_id, ...) and goes down object keys and
list indexes: ``data.items.0.sku``. Matching is exact and typed: ``1`` equals ``1.0`` but not
``true`` or ``"1"``; strings are case-sensitive. A field holding a list matches when any of
its elements does (so ``{"data.tags": "urgent"}`` matches ``["new", "urgent"]``), and its
``not`` form when none does. A missing field equals only ``null``.

:func:`parse` checks a condition once (every error is an :class:`InvalidRequest` naming the
offending field, e.g. ``steps[2].if.any[0].data.amount``) and compiles it into a
:class:`Predicate` whose :attr:`Predicate.matches` is a tree of closures: no parsing, no
dispatch on operator names at evaluation. Sizes are bounded (:data:`MAX_NODES`,
:data:`MAX_DEPTH`, :data:`MAX_IN`, :data:`MAX_TEXT`), so a stored condition costs little
memory and a bounded time to evaluate.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import msgspec

from broker.errors import InvalidRequest

ROOTS: Final = ("data", "recipient", "event")
COMBINATORS: Final = ("all", "any", "not")
OPERATORS: Final = ("equals", "in", "prefix", "exists", "not")

MAX_NODES: Final = 64  # field tests and combinators in one condition
MAX_DEPTH: Final = 6  # nesting of all / any / not
MAX_IN: Final = 100  # values of one "in"
MAX_TEXT: Final = 1024  # characters of one string operand
MAX_PATH_SEGMENTS: Final = 8  # below the root
MAX_PATH_CHARS: Final = 256

_SEGMENT: Final = re.compile(r"[A-Za-z0-9_\-]{1,64}")


class Scope(NamedTuple):
    """What a condition is evaluated against. ``data`` is any decoded JSON value;
    ``recipient`` and ``event`` map names to JSON values (leave out what is unknown)."""

    data: Any
    recipient: Mapping[str, Any]
    event: Mapping[str, Any]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()
"""What :meth:`FieldPath.resolve` answers for a path that leads nowhere."""

Test = Callable[[Scope], bool]


# --------------------------------------------------------------------------- field paths
@dataclass(frozen=True, slots=True)
class FieldPath:
    """A parsed field path such as ``data.items.0.sku``."""

    text: str
    root: int  # index into Scope
    steps: tuple[tuple[str, int | None], ...]  # (object key, list index if the key is digits)

    def resolve(self, scope: Scope) -> Any:
        """The value at this path in ``scope``, or :data:`MISSING`. Never raises."""
        cur: Any = scope[self.root]
        for key, index in self.steps:
            kind = type(cur)
            if kind is dict or (kind is not list and isinstance(cur, Mapping)):
                cur = cur.get(key, MISSING)
                if cur is MISSING:
                    return MISSING
            elif index is not None and kind is list:
                if index >= len(cur):
                    return MISSING
                cur = cur[index]
            else:
                return MISSING
        return cur


def parse_path(text: object, *, where: str, roots: tuple[str, ...] = ROOTS) -> FieldPath:
    """Parse a field path that starts at one of ``roots``. Raises :class:`InvalidRequest`
    naming ``where``."""
    if not isinstance(text, str):
        raise InvalidRequest(f"{where}: a field path is text such as 'data.amount'", field=where)
    parts = text.split(".")
    if parts[0] not in roots or len(parts) < 2:
        hint = f" (did you mean 'data.{text}'?)" if parts[0] not in roots else ""
        raise InvalidRequest(
            f"{where}: field path {text[:MAX_PATH_CHARS]!r} must start with "
            f"{' or '.join(r + '.' for r in roots)}{hint}",
            field=where,
        )
    if len(text) > MAX_PATH_CHARS or len(parts) - 1 > MAX_PATH_SEGMENTS:
        raise InvalidRequest(
            f"{where}: field path longer than {MAX_PATH_SEGMENTS} segments or "
            f"{MAX_PATH_CHARS} characters",
            field=where,
        )
    for seg in parts[1:]:
        if not _SEGMENT.fullmatch(seg):
            raise InvalidRequest(
                f"{where}: field path {text!r}: segment {seg!r} must be 1-64 letters, digits, "
                "'_' or '-'",
                field=where,
            )
    steps = tuple((seg, int(seg) if seg.isdigit() else None) for seg in parts[1:])
    return FieldPath(text, ROOTS.index(parts[0]), steps)


# ---------------------------------------------------------------------------- the tree
@dataclass(frozen=True, slots=True)
class Leaf:
    """One field test: ``op`` is "equals", "in", "prefix" or "exists"."""

    path: FieldPath
    op: str
    operand: Any
    negated: bool = False


@dataclass(frozen=True, slots=True)
class AllOf:
    parts: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    parts: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class NotOf:
    part: Node


Node = Leaf | AllOf | AnyOf | NotOf


class Predicate:
    """A checked, compiled condition. ``matches(scope)`` answers whether it holds (never
    raises, whatever the data); ``source`` is the condition as written (for GET answers and
    storage); ``roots`` names the roots it reads, so a caller can evaluate a condition that
    reads no ``recipient`` field before loading the recipient."""

    __slots__ = ("matches", "node", "roots", "source")

    def __init__(self, source: dict[str, Any], node: Node) -> None:
        self.source = source
        self.node = node
        self.matches: Test = _compile(node)
        self.roots: frozenset[str] = frozenset(ROOTS[leaf.path.root] for leaf in _leaves(node))

    def explain(self, scope: Scope) -> str:
        """Why the condition does not hold for ``scope``: the first failing field test, e.g.
        ``data.amount equals 100 (is 50)``. Slow path, for a suppression's reason only."""
        return _explain(self.node, scope) or "the condition holds"

    def __eq__(self, other: object) -> bool:
        """Two predicates are equal when they were written the same (key order aside)."""
        return isinstance(other, Predicate) and _canonical(self.source) == _canonical(other.source)

    def __hash__(self) -> int:
        return hash(_canonical(self.source))

    def __repr__(self) -> str:
        return f"Predicate({self.source!r})"


def _canonical(source: dict[str, Any]) -> bytes:
    return msgspec.json.encode(source, order="sorted")


# ---------------------------------------------------------------------------- parsing
def parse(spec: object, *, where: str = "if") -> Predicate:
    """Check and compile a condition. Raises :class:`InvalidRequest` naming the offending
    field (``where`` is the location of ``spec`` in the request, e.g. ``steps[2].if``) when
    the condition is malformed or over a size bound. The empty object is refused: a
    condition that always holds is written by leaving the condition out."""
    budget = [MAX_NODES]
    node = _parse_condition(spec, where, 0, budget)
    assert isinstance(spec, dict)  # _parse_condition refused anything else
    return Predicate(spec, node)


def never(source: dict[str, Any]) -> Predicate:
    """A predicate that matches nothing, standing for ``source`` (e.g. a stored condition
    this node cannot read: written by a newer node with syntax it lacks)."""
    return Predicate(source, AnyOf(()))


def parse_filter(spec: object, *, where: str = "filter") -> Predicate | None:
    """A subscription filter: a condition, where ``None`` or ``{}`` means "no filter"
    (None is returned). Raises like :func:`parse`."""
    if spec is None or spec == {}:
        return None
    return parse(spec, where=where)


def _parse_condition(spec: object, where: str, depth: int, budget: list[int]) -> Node:
    if not isinstance(spec, dict):
        raise InvalidRequest(
            f"{where}: a condition is an object of field paths and all / any / not",
            field=where,
        )
    if not spec:
        raise InvalidRequest(
            f"{where}: an empty condition (leave it out to match everything)", field=where
        )
    if depth > MAX_DEPTH:
        raise InvalidRequest(f"{where}: nested deeper than {MAX_DEPTH} levels", field=where)
    parts: list[Node] = []
    for key, value in spec.items():
        here = f"{where}.{key}"
        _spend(budget, here)
        if key in ("all", "any"):
            if not isinstance(value, list) or not value:
                raise InvalidRequest(f"{here}: a non-empty list of conditions", field=here)
            subs = tuple(
                _parse_condition(v, f"{here}[{i}]", depth + 1, budget) for i, v in enumerate(value)
            )
            parts.append(AllOf(subs) if key == "all" else AnyOf(subs))
        elif key == "not":
            parts.append(NotOf(_parse_condition(value, here, depth + 1, budget)))
        else:
            path = parse_path(key, where=here)
            parts.append(_parse_test(path, value, here, negated=False))
    return parts[0] if len(parts) == 1 else AllOf(tuple(parts))


def _spend(budget: list[int], where: str) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise InvalidRequest(
            f"{where}: the condition has more than {MAX_NODES} tests and combinators",
            field=where,
        )


def _parse_test(path: FieldPath, value: object, where: str, *, negated: bool) -> Leaf:
    if isinstance(value, list):
        return Leaf(path, "in", _in_operand(value, where), negated)
    if not isinstance(value, dict):
        return Leaf(path, "equals", _scalar(value, where), negated)
    if len(value) != 1:
        raise InvalidRequest(
            f"{where}: a field test has exactly one of {', '.join(OPERATORS)} "
            "(combine several with all / any)",
            field=where,
        )
    ((op, operand),) = value.items()
    here = f"{where}.{op}"
    if op == "equals":
        return Leaf(path, "equals", _scalar(operand, here), negated)
    if op == "in":
        if not isinstance(operand, list):
            raise InvalidRequest(f"{here}: a list of 1-{MAX_IN} values", field=here)
        return Leaf(path, "in", _in_operand(operand, here), negated)
    if op == "prefix":
        if not isinstance(operand, str) or not operand or len(operand) > MAX_TEXT:
            raise InvalidRequest(f"{here}: a string of 1-{MAX_TEXT} characters", field=here)
        return Leaf(path, "prefix", operand, negated)
    if op == "exists":
        if not isinstance(operand, bool):
            raise InvalidRequest(f"{here}: true or false", field=here)
        return Leaf(path, "exists", operand, negated)
    if op == "not":
        if negated:
            raise InvalidRequest(f"{here}: 'not' inside 'not'", field=here)
        return _parse_test(path, operand, here, negated=True)
    raise InvalidRequest(
        f"{here}: unknown operator {op[:40]!r} (one of {', '.join(OPERATORS)})", field=here
    )


def _scalar(value: object, where: str) -> str | int | float | bool | None:
    if value is None or isinstance(value, bool | int | float):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
            raise InvalidRequest(f"{where}: integers are limited to +-2^53", field=where)
        return value
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise InvalidRequest(f"{where}: strings are limited to {MAX_TEXT} chars", field=where)
        return value
    raise InvalidRequest(
        f"{where}: compare with a string, number, boolean or null "
        f"(not {type(value).__name__}); use in / prefix / exists for more",
        field=where,
    )


def _in_operand(values: list[Any], where: str) -> tuple[Any, ...]:
    if not values or len(values) > MAX_IN:
        raise InvalidRequest(f"{where}: a list of 1-{MAX_IN} values", field=where)
    return tuple(_scalar(v, f"{where}[{i}]") for i, v in enumerate(values))


# --------------------------------------------------------------------------- compiling
def _compile(node: Node) -> Test:
    if isinstance(node, Leaf):
        return _compile_leaf(node)
    if isinstance(node, NotOf):
        inner = _compile(node.part)
        return lambda s: not inner(s)
    tests = tuple(_compile(p) for p in node.parts)
    if isinstance(node, AllOf):
        if len(tests) == 2:
            a, b = tests
            return lambda s: a(s) and b(s)
        return lambda s: all(t(s) for t in tests)
    if len(tests) == 2:
        a, b = tests
        return lambda s: a(s) or b(s)
    return lambda s: any(t(s) for t in tests)


def _value_test(op: str, operand: Any) -> Callable[[Any], bool]:
    """A test of one present, non-list value."""
    if op == "prefix":
        return lambda v: type(v) is str and v.startswith(operand)
    values = operand if op == "in" else (operand,)
    strs = frozenset(v for v in values if type(v) is str)
    nums = frozenset(v for v in values if type(v) in (int, float))
    bools = frozenset(v for v in values if type(v) is bool)
    null = any(v is None for v in values)

    def test(v: Any) -> bool:
        t = type(v)
        if t is str:
            return v in strs
        if t is int or t is float:
            return v in nums
        if t is bool:
            return v in bools
        return v is None and null

    return test


def _compile_leaf(leaf: Leaf) -> Test:
    resolve = leaf.path.resolve
    negated = leaf.negated
    if leaf.op == "exists":
        want: bool = leaf.operand != negated  # "not exists true" is "exists false"

        def exists(s: Scope) -> bool:
            v = resolve(s)
            return (v is not MISSING and v is not None) == want

        return exists

    test = _value_test(leaf.op, leaf.operand)
    matches_missing = leaf.op != "prefix" and test(None)  # a missing field equals only null

    def check(s: Scope) -> bool:
        v = resolve(s)
        if v is MISSING:
            hit = matches_missing
        elif type(v) is list:
            hit = any(test(x) for x in v)
        else:
            hit = test(v)
        return hit != negated

    return check


def _leaves(node: Node) -> list[Leaf]:
    if isinstance(node, Leaf):
        return [node]
    if isinstance(node, NotOf):
        return _leaves(node.part)
    return [leaf for p in node.parts for leaf in _leaves(p)]


# ---------------------------------------------------------------------------- explain
def _show(value: Any) -> str:
    if value is MISSING:
        return "missing"
    try:
        text = msgspec.json.encode(value).decode()
    except (TypeError, msgspec.EncodeError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(leaf: Leaf) -> str:
    operand = leaf.operand
    if leaf.op == "in":
        operand = list(operand)
    verb = f"not {leaf.op}" if leaf.negated else leaf.op
    return f"{leaf.path.text} {verb} {_show(operand)}"


def _explain(node: Node, scope: Scope) -> str | None:
    """The description of what fails in ``node`` for ``scope``, None if it holds."""
    if isinstance(node, Leaf):
        if _compile_leaf(node)(scope):
            return None
        return f"{_describe(node)} (is {_show(node.path.resolve(scope))})"
    if isinstance(node, NotOf):
        if not _compile(node.part)(scope):
            return None
        return f"not ({_summary(node.part)}) (it holds)"
    if isinstance(node, AllOf):
        for part in node.parts:
            why = _explain(part, scope)
            if why is not None:
                return why
        return None
    if any(_compile(p)(scope) for p in node.parts):
        return None
    return "none of: " + "; ".join(_explain(p, scope) or "" for p in node.parts)


def _summary(node: Node) -> str:
    if isinstance(node, Leaf):
        return _describe(node)
    if isinstance(node, NotOf):
        return f"not ({_summary(node.part)})"
    joiner = " and " if isinstance(node, AllOf) else " or "
    return joiner.join(_summary(p) for p in node.parts)

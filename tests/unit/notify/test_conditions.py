"""The condition language (``notify/conditions.py``): what each operator matches, errors that
name the offending field, the size bounds, and (hypothesis) agreement with a plain
interpreter of the documented rules on random conditions and data."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import InvalidRequest
from notify import conditions as c
from notify.conditions import MISSING, Scope, parse, parse_filter, parse_path


def scope(data: Any = None, **recipient: Any) -> Scope:
    return Scope(data or {}, recipient, {"topic": "orders.paid", "priority": "normal"})


def holds(cond: dict[str, Any], sc: Scope) -> bool:
    return parse(cond).matches(sc)


# ------------------------------------------------------------------------- operators
@pytest.mark.parametrize(
    ("cond", "data", "expected"),
    [
        ({"data.amount": 100}, {"amount": 100}, True),
        ({"data.amount": 100}, {"amount": 100.0}, True),  # numbers compare as numbers
        ({"data.amount": 100}, {"amount": "100"}, False),  # but not as text
        ({"data.flag": True}, {"flag": 1}, False),  # a boolean is not a number
        ({"data.count": 1}, {"count": True}, False),
        ({"data.kind": "a"}, {"kind": "A"}, False),  # case-sensitive
        ({"data.kind": {"equals": "a"}}, {"kind": "a"}, True),
        ({"data.kind": None}, {}, True),  # a missing field equals only null
        ({"data.kind": None}, {"kind": None}, True),
        ({"data.kind": None}, {"kind": 0}, False),
        ({"data.kind": "a"}, {}, False),
        ({"data.region": {"in": ["eu", "us"]}}, {"region": "eu"}, True),
        ({"data.region": ["eu", "us"]}, {"region": "us"}, True),  # a bare list is "in"
        ({"data.region": {"in": ["eu", "us"]}}, {"region": "ap"}, False),
        ({"data.region": {"in": ["eu", 1, True]}}, {"region": 1.0}, True),
        ({"data.region": {"in": ["eu", 1]}}, {"region": True}, False),
        ({"data.sku": {"prefix": "ab"}}, {"sku": "abc"}, True),
        ({"data.sku": {"prefix": "ab"}}, {"sku": "xab"}, False),
        ({"data.sku": {"prefix": "1"}}, {"sku": 12}, False),  # prefixes only of strings
        ({"data.coupon": {"exists": True}}, {"coupon": "X"}, True),
        ({"data.coupon": {"exists": True}}, {"coupon": None}, False),  # null is absent
        ({"data.coupon": {"exists": False}}, {}, True),
        ({"data.coupon": {"exists": False}}, {"coupon": 0}, False),
        ({"data.tags": "urgent"}, {"tags": ["new", "urgent"]}, True),  # any element
        ({"data.tags": {"not": "urgent"}}, {"tags": ["new", "urgent"]}, False),  # none
        ({"data.tags": {"not": "urgent"}}, {"tags": ["new"]}, True),
        ({"data.kind": {"not": {"in": ["a", "b"]}}}, {"kind": "c"}, True),
        ({"data.kind": {"not": {"in": ["a", "b"]}}}, {}, True),
        ({"data.kind": {"not": {"exists": True}}}, {}, True),
        ({"data.items.1.sku": "b"}, {"items": [{"sku": "a"}, {"sku": "b"}]}, True),
        ({"data.items.2.sku": "b"}, {"items": [{"sku": "a"}, {"sku": "b"}]}, False),
        ({"data.m.0": "x"}, {"m": {"0": "x"}}, True),  # digits are a key of an object
        ({"data.a.b": 1}, {"a": "not an object"}, False),
        ({"data.a.b": 1, "data.c": 2}, {"a": {"b": 1}, "c": 2}, True),  # keys AND
        ({"data.a.b": 1, "data.c": 2}, {"a": {"b": 1}, "c": 3}, False),
        ({"any": [{"data.a": 1}, {"data.a": 2}]}, {"a": 2}, True),
        ({"any": [{"data.a": 1}, {"data.a": 2}]}, {"a": 3}, False),
        ({"all": [{"data.a": 1}, {"data.b": 2}, {"data.c": 3}]}, {"a": 1, "b": 2, "c": 3}, True),
        ({"not": {"data.a": 1}}, {"a": 1}, False),
    ],
)
def test_each_operator_matches_as_documented(
    cond: dict[str, Any], data: dict[str, Any], expected: bool
) -> None:
    assert holds(cond, scope(data)) is expected


def test_recipient_and_event_fields() -> None:
    sc = scope({}, id="u1", locale="en-GB")
    assert holds({"recipient.locale": {"prefix": "en"}}, sc)
    assert holds({"event.topic": {"prefix": "orders."}}, sc)
    assert not holds({"recipient.email": {"exists": True}}, sc)


def test_data_that_is_not_an_object_matches_nothing_and_raises_nothing() -> None:
    for data in (None, 3, "text", [1, 2], [{"a": 1}]):
        assert not holds({"data.a": 1}, Scope(data, {}, {}))


def test_roots_name_what_a_condition_reads() -> None:
    pred = parse({"data.a": 1, "any": [{"event.topic": "x"}, {"not": {"data.b": 2}}]})
    assert pred.roots == {"data", "event"}
    assert "recipient" in parse({"recipient.locale": "en"}).roots


def test_explain_names_the_failing_test() -> None:
    pred = parse({"data.amount": 100, "data.region": {"in": ["eu", "us"]}})
    assert pred.explain(scope({"amount": 100, "region": "ap"})) == (
        'data.region in ["eu","us"] (is "ap")'
    )
    assert pred.explain(scope({"region": "eu"})) == "data.amount equals 100 (is missing)"
    anyof = parse({"any": [{"data.a": 1}, {"data.b": {"not": 2}}]})
    assert anyof.explain(scope({"a": 0, "b": 2})) == (
        "none of: data.a equals 1 (is 0); data.b not equals 2 (is 2)"
    )
    assert parse({"not": {"data.a": 1}}).explain(scope({"a": 1})) == (
        "not (data.a equals 1) (it holds)"
    )


def test_resolve_answers_missing_for_a_path_that_leads_nowhere() -> None:
    path = parse_path("data.a.0.b", where="x")
    assert path.resolve(Scope({"a": [{"b": 5}]}, {}, {})) == 5
    assert path.resolve(Scope({"a": []}, {}, {})) is MISSING
    assert path.resolve(Scope({"a": [3]}, {}, {})) is MISSING


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("cond", "field", "words"),
    [
        ({"amount": 1}, "if.amount", "did you mean 'data.amount'"),
        ({"data": 1}, "if.data", "must start with"),
        ({"data.a b": 1}, "if.data.a b", "segment 'a b'"),
        ({"data.a": {"in": 5}}, "if.data.a.in", "a list"),
        ({"data.a": {"in": []}}, "if.data.a.in", "a list"),
        ({"data.a": {"in": [1, {"x": 1}]}}, "if.data.a.in[1]", "compare with"),
        ({"data.a": {"prefix": 3}}, "if.data.a.prefix", "a string"),
        ({"data.a": {"exists": "yes"}}, "if.data.a.exists", "true or false"),
        ({"data.a": {"gt": 3}}, "if.data.a.gt", "unknown operator"),
        ({"data.a": {"in": [1], "prefix": "x"}}, "if.data.a", "exactly one"),
        ({"data.a": {"not": {"not": 1}}}, "if.data.a.not.not", "'not' inside 'not'"),
        ({"data.a": {}}, "if.data.a", "exactly one"),
        ({"any": []}, "if.any", "non-empty list"),
        ({"all": {"data.a": 1}}, "if.all", "non-empty list"),
        ({"any": [{"data.a": 1}, {"data.b": {"in": "x"}}]}, "if.any[1].data.b.in", "a list"),
        ({"not": {}}, "if.not", "empty condition"),
        ({}, "if", "empty condition"),
        ({"data.a": "x" * 2000}, "if.data.a", "limited to"),
        ({"data.a": 2**60}, "if.data.a", "limited to"),
    ],
)
def test_errors_name_the_offending_field(cond: Any, field: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(cond)
    assert caught.value.field == field
    assert words in str(caught.value)
    assert str(caught.value).startswith(field)


def test_where_prefixes_every_error() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse({"all": [{"data.a": {"prefix": ""}}]}, where="steps[2].if")
    assert caught.value.field == "steps[2].if.all[0].data.a.prefix"


def test_not_an_object_is_refused() -> None:
    for bad in (None, [], "data.a == 1", 3):
        with pytest.raises(InvalidRequest):
            parse(bad)


def test_size_and_depth_are_bounded() -> None:
    wide = {f"data.f{i}": i for i in range(c.MAX_NODES + 1)}
    with pytest.raises(InvalidRequest, match="more than"):
        parse(wide)
    parse({f"data.f{i}": i for i in range(c.MAX_NODES)})
    deep: dict[str, Any] = {"data.a": 1}
    for _ in range(c.MAX_DEPTH + 1):
        deep = {"not": deep}
    with pytest.raises(InvalidRequest, match="deeper"):
        parse(deep)
    with pytest.raises(InvalidRequest, match="values"):
        parse({"data.a": list(range(c.MAX_IN + 1))})
    with pytest.raises(InvalidRequest, match="segments"):
        parse({"data." + ".".join("a" * 9): 1})


def test_a_filter_may_be_empty() -> None:
    assert parse_filter(None) is None
    assert parse_filter({}) is None
    pred = parse_filter({"data.region": "eu"})
    assert pred is not None and pred.matches(scope({"region": "eu"}))
    with pytest.raises(InvalidRequest) as caught:
        parse_filter({"region": "eu"})
    assert caught.value.field == "filter.region"


# ------------------------------------------------------------------------ properties
PATHS = ["data.a", "data.b", "data.a.b", "data.l.0", "recipient.locale", "event.topic"]
SCALARS = st.sampled_from(["x", "y", "xy", "", 0, 1, 1.0, 2.5, True, False, None])


def field_tests() -> st.SearchStrategy[Any]:
    scalar_ops = st.one_of(
        SCALARS,
        st.lists(SCALARS, min_size=1, max_size=3),
        st.builds(lambda v: {"equals": v}, SCALARS),
        st.builds(lambda v: {"in": v}, st.lists(SCALARS, min_size=1, max_size=3)),
        st.builds(lambda v: {"prefix": v}, st.sampled_from(["x", "y", "xy"])),
        st.builds(lambda v: {"exists": v}, st.booleans()),
    )
    return st.one_of(scalar_ops, st.builds(lambda v: {"not": v}, scalar_ops))


conditions_st: st.SearchStrategy[dict[str, Any]] = st.recursive(
    st.dictionaries(st.sampled_from(PATHS), field_tests(), min_size=1, max_size=3),
    lambda inner: st.one_of(
        st.builds(lambda xs: {"all": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda xs: {"any": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda x: {"not": x}, inner),
        st.builds(lambda a, b: {**a, **b}, inner, inner),
    ),
    max_leaves=8,
)
values_st = st.recursive(
    SCALARS | st.text(max_size=3),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "b", "l", "0"]), inner, max_size=3)
    ),
    max_leaves=10,
)
data_st = st.dictionaries(st.sampled_from(["a", "b", "l"]), values_st, max_size=3) | values_st


def oracle(cond: dict[str, Any], sc: Scope) -> bool:
    """The documented rules, interpreted directly from the JSON."""
    results = []
    for key, value in cond.items():
        if key == "all":
            results.append(all(oracle(x, sc) for x in value))
        elif key == "any":
            results.append(any(oracle(x, sc) for x in value))
        elif key == "not":
            results.append(not oracle(value, sc))
        else:
            results.append(field_test(lookup(key, sc), value))
    return all(results)


def lookup(path: str, sc: Scope) -> Any:
    root, *keys = path.split(".")
    cur: Any = {"data": sc.data, "recipient": sc.recipient, "event": sc.event}[root]
    for k in keys:
        if isinstance(cur, dict) and k in cur:
            cur = cur[k]
        elif isinstance(cur, list) and k.isdigit() and int(k) < len(cur):
            cur = cur[int(k)]
        else:
            return MISSING
    return cur


def same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def field_test(v: Any, test: Any) -> bool:
    if isinstance(test, dict) and "not" in test:
        return not field_test(v, test["not"])
    if isinstance(test, dict) and "exists" in test:
        return (v is not MISSING and v is not None) == test["exists"]
    if isinstance(test, dict) and "prefix" in test:
        cands = v if isinstance(v, list) else [v]
        return any(isinstance(x, str) and x.startswith(test["prefix"]) for x in cands)
    if isinstance(test, dict):
        test = test.get("in", [test.get("equals")])
    options = test if isinstance(test, list) else [test]
    if v is MISSING:
        return any(o is None for o in options)
    cands = v if isinstance(v, list) else [v]
    return any(same(x, o) for x in cands for o in options)


@settings(max_examples=400, deadline=None)
@given(cond=conditions_st, data=data_st, locale=st.sampled_from(["x", "xy", "z"]))
def test_compiled_conditions_agree_with_the_documented_rules(
    cond: dict[str, Any], data: Any, locale: str
) -> None:
    sc = Scope(data, {"locale": locale}, {"topic": "xy"})
    pred = parse(cond)
    assert pred.matches(sc) is oracle(cond, sc)
    if not pred.matches(sc):
        assert pred.explain(sc) != "the condition holds"
    negated = parse({"not": cond}).matches(sc)
    assert negated is not pred.matches(sc)


json_st = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["data.a", "all", "any", "not", "in", "prefix", "exists", "x", "data"])
            | st.text(max_size=6),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(spec=json_st, data=data_st)
def test_any_json_either_parses_or_is_refused_with_a_field(spec: Any, data: Any) -> None:
    try:
        pred = parse(spec)
    except InvalidRequest as exc:
        assert exc.field is not None and exc.field.startswith("if")
        return
    assert isinstance(pred.matches(Scope(data, {}, {})), bool)

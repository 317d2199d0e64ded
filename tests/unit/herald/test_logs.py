"""Log lines: a client-chosen value (a group name, a client id) can neither start a new line
nor add a field, in logfmt or JSON; ordinary values stay bare and readable."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from herald.logs import JsonFormatter, LogfmtFormatter, escape_value, parse_pairs


def record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("herald.groups", logging.INFO, __file__, 1, msg, args, None)


def test_ordinary_values_stay_bare() -> None:
    line = LogfmtFormatter().format(
        record("event=member_joined group=%s member=%s n=%d t=%.3f", "acme/G", "c-1-ab", 3, 0.5)
    )
    assert line.endswith("event=member_joined group=acme/G member=c-1-ab n=3 t=0.500")


@pytest.mark.parametrize(
    "evil",
    [
        "g\nts=2024 level=error logger=herald.auth event=login_ok tenant=*",
        "g event=topic_deleted topic=orders",
        'g" admin="yes',
        "g\r\x00\x1b[2J\u2028",
        "",
        "a=b",
        "\\",
    ],
)
def test_a_client_chosen_value_cannot_forge_a_line_or_a_field(evil: str) -> None:
    line = LogfmtFormatter().format(record("event=member_joined group=%s member=%r", evil, evil))
    assert "\n" not in line and "\r" not in line and "\u2028" not in line
    fields = parse_pairs(line.split(" ", 3)[3])
    assert fields == {"event": "member_joined", "group": evil, "member": evil}
    entry = json.loads(JsonFormatter().format(record("event=x group=%s", evil)))
    assert entry["group"] == evil and entry["event"] == "x"
    assert set(entry) == {"ts", "level", "logger", "event", "group"}


@given(st.text())
def test_every_string_round_trips_through_one_value(value: str) -> None:
    escaped = escape_value(value)
    assert escaped.isprintable()
    assert parse_pairs(f"k={escaped} z=1") == {"k": value, "z": "1"}


def test_a_message_that_is_not_pairs_stays_a_message_in_json() -> None:
    entry = json.loads(JsonFormatter().format(record("Task was destroyed: %s", "x y")))
    assert entry["msg"] == 'Task was destroyed: "x y"'

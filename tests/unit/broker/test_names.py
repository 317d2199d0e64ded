"""Client-chosen names are bounded in length and characters, and refused with the field."""

from __future__ import annotations

import pytest

from broker.errors import InvalidGroup, InvalidRequest
from broker.names import validate_client_id, validate_group, validate_member_id


@pytest.mark.parametrize("name", ["g", "billing.invoices_v2", "connect-sink:eu@prod", "a+b=c"])
def test_ordinary_group_names_pass(name: str) -> None:
    assert validate_group(name) == name


@pytest.mark.parametrize("name", ["", "a\x00b", "a b", "a/b", "x" * 201, "g\n", "é"])
def test_group_names_outside_the_rules_are_refused_without_echoing_them_whole(name: str) -> None:
    with pytest.raises(InvalidGroup) as info:
        validate_group(name + "x" * 10_000 if name == "a b" else name)
    assert info.value.field == "group" and len(info.value.message) < 300


def test_client_and_member_ids_are_printable_ascii_and_bounded() -> None:
    assert validate_client_id("") == ""
    assert validate_client_id("svc a=b") == "svc a=b"
    for bad in ("c\x00", "c\n", "c" * 101, "\u2028"):
        with pytest.raises(InvalidRequest) as info:
            validate_client_id(bad)
        assert info.value.field == "client_id"
    assert validate_member_id("svc-1-abcd") == "svc-1-abcd"
    for bad in ("", "m" * 201, "m\x7f"):
        with pytest.raises(InvalidRequest):
            validate_member_id(bad)

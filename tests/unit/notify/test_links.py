"""Signed unsubscribe tokens and bounce references."""

from __future__ import annotations

from pathlib import Path

import pytest

from notify.links import BadToken, Signer, node_secret, unsubscribe_scope
from storage.kv import KV


def test_a_token_names_what_it_stops_and_cannot_be_forged() -> None:
    signer = Signer(b"k" * 32)
    token = signer.unsubscribe_token("acme", "u-1", "email", "category:marketing")
    claim = signer.open_unsubscribe(token)
    assert (claim.tenant, claim.user, claim.channel, claim.scope) == (
        "acme",
        "u-1",
        "email",
        "category:marketing",
    )
    assert len(token) < 120  # fits a List-Unsubscribe line with room to spare
    payload, sig = token.split(".")
    other = Signer(b"k" * 32).unsubscribe_token("acme", "u-2", "email", "category:marketing")
    for bad in (
        f"{other.split('.')[0]}.{sig}",  # someone else's payload under this signature
        f"{payload}.{sig[:-2]}AA",
        token + "x",
        "",
        "a.b.c",
    ):
        with pytest.raises(BadToken):
            signer.open_unsubscribe(bad)
    with pytest.raises(BadToken):  # another node's secret
        Signer(b"z" * 32).open_unsubscribe(token)


def test_a_bounce_reference_is_not_an_unsubscribe_token() -> None:
    signer = Signer(b"k" * 32)
    ref = signer.ref("acme", "u-1")
    assert signer.open_ref(ref).user == "u-1"
    with pytest.raises(BadToken):
        signer.open_unsubscribe(ref)


def test_a_receipt_reference_names_its_delivery_and_no_other_kind_passes_for_it() -> None:
    signer = Signer(b"k" * 32)
    token = signer.receipt("acme", "u-1", "ev-1", "run-1", "dl-1", "orders.shipped")
    claim = signer.open_receipt(token)
    assert (claim.tenant, claim.user, claim.event_id, claim.run_id) == (
        "acme",
        "u-1",
        "ev-1",
        "run-1",
    )
    assert (claim.delivery_id, claim.topic) == ("dl-1", "orders.shipped")
    for other in (signer.ref("acme", "u-1"), signer.unsubscribe_token("acme", "u-1", "sms")):
        with pytest.raises(BadToken):
            signer.open_receipt(other)
    with pytest.raises(BadToken):
        signer.open_ref(token)
    with pytest.raises(BadToken):  # another node's secret
        Signer(b"z" * 32).open_receipt(token)


def test_the_scope_is_the_category_else_the_topic() -> None:
    assert unsubscribe_scope("marketing", "news") == "category:marketing"
    assert unsubscribe_scope(None, "news") == "topic:news"


def test_the_node_secret_is_made_once_and_kept(tmp_path: Path) -> None:
    kv = KV(tmp_path / "state", map_size=1 << 24)
    try:
        first = node_secret(kv)
        assert len(first) == 32 and node_secret(kv) == first
        assert (
            node_secret(kv, "configured-secret-of-a-deployment")
            == b"configured-secret-of-a-deployment"
        )
    finally:
        kv.close()


@pytest.mark.parametrize("token", ["é.abc", "abc.é", "a\udcff.b", "\u00ff\u00fe.x"])
def test_a_token_with_non_ascii_characters_is_a_bad_token(token: str) -> None:
    signer = Signer(b"k" * 32)
    with pytest.raises(BadToken):
        signer.open_unsubscribe(token)
    with pytest.raises(BadToken):
        signer.open_ref(token)

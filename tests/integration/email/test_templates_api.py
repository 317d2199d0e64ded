"""The templates API on a real node: store, read, list, preview, delete; errors name the
part at fault."""

from __future__ import annotations

from .conftest import StartNode

ORDER = {
    "locales": {
        "default": {"subject": "Order {{ data.order }}", "text": "Order {{ data.order }} shipped"},
        "de": {"subject": "Bestellung {{ data.order }}", "text": "Versandt"},
    }
}


async def test_templates_are_stored_versioned_previewed_and_deleted(
    email_node: StartNode,
) -> None:
    node = await email_node()
    code, row = await node.call("PUT", "/templates/orders.shipped/email", ORDER)
    assert code == 200 and row["version"] == 1 and row["locales"] == ORDER["locales"]
    code, row = await node.call("PUT", "/templates/orders.shipped/email", ORDER)
    assert row["version"] == 2
    code, row = await node.call("GET", "/templates/orders.shipped/email")
    assert code == 200 and row["topic"] == "orders.shipped" and row["version"] == 2
    code, listing = await node.call("GET", "/templates")
    assert [(t["topic"], t["channel"]) for t in listing["templates"]] == [
        ("orders.shipped", "email")
    ]

    preview = {"data": {"order": 7}, "locale": "de-AT"}
    code, shown = await node.call("POST", "/templates/orders.shipped/email/preview", preview)
    assert code == 200, shown
    assert shown["locale"] == "de" and shown["source"] == "topic"
    assert shown["content"]["subject"] == "Bestellung 7"
    # a missing field in the sample data: the render error, named
    code, err = await node.call("POST", "/templates/orders.shipped/email/preview", {"data": {}})
    assert code == 400 and "render_error" in err["error"]["message"]
    # an unsaved template can be tried first; sms shows its segments
    sms = {"data": {"n": 3}, "template": {"locales": {"default": {"text": "{{ data.n }} new"}}}}
    code, shown = await node.call("POST", "/templates/x/sms/preview", sms)
    assert code == 200 and shown["content"] == {
        "text": "3 new",
        "segments": 1,
        "encoding": "gsm7",
        "truncated": False,
    }

    code, _ = await node.call("DELETE", "/templates/orders.shipped/email")
    assert code == 200
    code, err = await node.call("GET", "/templates/orders.shipped/email")
    assert code == 404


async def test_a_bad_template_is_refused_naming_the_part(email_node: StartNode) -> None:
    node = await email_node()
    cases = [
        ({"locales": {"default": {"subject": "{{ oops", "text": "t"}}}, "locales.default.subject"),
        ({"locales": {"default": {"subject": "s"}}}, "locales.default.text"),
        ({"locales": {"fr": {"subject": "s", "text": "t"}}}, "locales"),
        ({"locales": {"default": {"subject": "s", "text": "t", "title": "x"}}},
         "locales.default.title"),
        ({"locales": {"default": {"subject": "s", "text": "x" * 70_000}}}, "locales"),
    ]  # fmt: skip
    for body, field in cases:
        code, err = await node.call("PUT", "/templates/t/email", body)
        assert code == 400 and err["error"]["field"] == field, (body, err)
    code, err = await node.call("PUT", "/templates/t/webhook", {"locales": {"default": {}}})
    assert code == 400 and err["error"]["field"] == "channel"
    code, _ = await node.call("GET", "/templates/t/email")
    assert code == 404

"""Templates rendered in the sandbox: fallbacks, escaping, missing fields, bounds, SMS."""

from __future__ import annotations

import pytest

from channels.base import EmailContent, PushContent, SmsContent
from notify import render
from notify.render import RenderError, TemplateError, locale_chain, segments_of, sms_content


def _render(channel: str, parts: dict[str, str], context: dict[str, object]) -> object:
    compiled = render.compile_locale(channel, "default", parts)
    return render.render(
        channel,
        compiled,
        context,
        where=f"t/{channel}/default",
        max_output_chars=10_000,
        sms_max_segments=3,
    )


def test_locale_chain_goes_from_region_to_language_to_default() -> None:
    assert locale_chain("fr-CA") == ("fr-ca", "fr", "default")
    assert locale_chain("zh_Hant_TW") == ("zh-hant-tw", "zh-hant", "zh", "default")
    assert locale_chain(None) == ("default",)


def test_html_is_escaped_and_text_is_not() -> None:
    out = _render(
        "email",
        {"subject": "{{ data.x }}", "text": "{{ data.x }}", "html": "<p>{{ data.x }}</p>"},
        {"data": {"x": "<script>&"}},
    )
    assert out == EmailContent(
        subject="<script>&", text="<script>&", html="<p>&lt;script&gt;&amp;</p>"
    )


def test_a_missing_field_is_a_render_error_naming_the_part() -> None:
    with pytest.raises(RenderError) as err:
        _render("email", {"subject": "x", "text": "Hi {{ data.name }}"}, {"data": {}})
    assert err.value.where == "t/email/default.text"
    assert "name" in str(err.value)
    # optional fields have to say so
    out = _render(
        "email",
        {"subject": "x", "text": "Hi {{ data.name | default('there') }}"},
        {"data": {}},
    )
    assert isinstance(out, EmailContent) and out.text == "Hi there"


@pytest.mark.parametrize(
    "source",
    [
        "{{ data.__class__.__mro__ }}",
        "{{ ''.__class__.__subclasses__() }}",
        "{{ data.update({'a': 1}) }}",
        "{% for i in range(100000) %}{% endfor %}",
    ],
)
def test_the_sandbox_refuses_what_a_template_must_not_do(source: str) -> None:
    with pytest.raises(RenderError):
        _render("sms", {"text": source}, {"data": {"a": 0}})


def test_template_code_errors_and_huge_output_are_render_errors() -> None:
    with pytest.raises(RenderError, match="ZeroDivisionError"):
        _render("sms", {"text": "{{ 1 / 0 }}"}, {})
    compiled = render.compile_locale(
        "sms", "default", {"text": "{% for i in range(1000) %}{{ data }}{% endfor %}"}
    )
    with pytest.raises(RenderError, match="longer than"):
        render.render(
            "sms", compiled, {"data": "x" * 100}, where="w", max_output_chars=5000,
            sms_max_segments=3,
        )  # fmt: skip


def test_templates_are_checked_when_stored() -> None:
    with pytest.raises(TemplateError) as err:
        render.compile_locale("email", "fr", {"subject": "{{ oops", "text": "t"})
    assert err.value.field == "locales.fr.subject"
    with pytest.raises(TemplateError, match="required"):
        render.compile_locale("email", "default", {"subject": "s"})
    with pytest.raises(TemplateError, match="not a part"):
        render.compile_locale("sms", "default", {"text": "t", "html": "h"})
    deep = "{% for a in x %}{% for b in a %}{% for c in b %}{% endfor %}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateError, match="nest 3 deep"):
        render.compile_locale("sms", "default", {"text": deep})
    with pytest.raises(TemplateError):
        render.compile_locale("webhook", "default", {"text": "t"})


def test_push_parts_are_cut_to_their_limits() -> None:
    out = _render("push", {"title": "{{ 'T' * 300 }}", "body": "b"}, {})
    assert isinstance(out, PushContent)
    assert len(out.title) == 200 and out.title.endswith("…")


# ------------------------------------------------------------------------------- SMS
def test_sms_segments_by_encoding() -> None:
    assert segments_of("a" * 160) == (1, "gsm7")
    assert segments_of("a" * 161) == (2, "gsm7")
    assert segments_of("a" * 306) == (2, "gsm7")  # 153 per segment once split
    assert segments_of("a" * 307) == (3, "gsm7")
    assert segments_of("{" * 80) == (1, "gsm7")  # extension characters count twice
    assert segments_of("{" * 81) == (2, "gsm7")
    assert segments_of("é" * 160) == (1, "gsm7")  # é is in the GSM alphabet
    assert segments_of("ç" * 70) == (1, "ucs2")  # ç (lower case) is not
    assert segments_of("ç" * 71) == (2, "ucs2")
    assert segments_of("😀" * 35) == (1, "ucs2")  # two UTF-16 units each


def test_a_long_sms_is_truncated_at_a_word_with_an_ellipsis() -> None:
    words = " ".join(["segment"] * 100)  # 799 GSM characters, 6 segments
    out = sms_content(words, 3)
    assert out.truncated and out.segments == 3 and out.encoding == "gsm7"
    assert out.text.endswith("segment...") and len(out.text) <= 459
    assert words.startswith(out.text[:-3])
    fits = sms_content("short", 3)
    assert fits == SmsContent(text="short", segments=1, encoding="gsm7")


def test_truncation_never_splits_a_surrogate_pair() -> None:
    out = sms_content("😀" * 200, 2)  # 400 units; 2 segments hold 134
    assert out.truncated and out.segments == 2 and out.encoding == "ucs2"
    assert out.text == "😀" * 66 + "…"


_SAMPLES = [
    {},
    {"b": 1, "a": [1, 2.5, None, True, False], "c": {"z": "y", "x": {}}},
    {"html": "<script>alert('x') & \"y\"</script>", "quote": "it's"},
    {"unicode": "héllo wörld ✓ 😀 \u2028 \x00 \t\n", "emoji": "👩\u200d💻"},
    [1, "two", {"three": 3}],
    "just a string with <b> & '",
    12345678901234567890123,
    -0.0,
    1e300,
    None,
    {"deep": {"er": {"est": [[[{"k": "v"}]]]}}},
]


@pytest.mark.parametrize("channel", ["email", "push", "inapp", "sms"])
@pytest.mark.parametrize("unsubscribe_url", [None, "https://h.example/unsubscribe/t<&>'"])
def test_the_built_in_templates_render_natively_as_jinja_would(
    channel: str, unsubscribe_url: str | None
) -> None:
    """The built-in defaults skip Jinja2 (a plain function per part): the same content as
    their Jinja2 source, for data of every JSON shape, escapes included."""
    built_in = render.default_templates()[channel]
    assert built_in.native is not None
    for data in _SAMPLES:
        context = {
            "data": data,
            "event": {
                "topic": "orders/Ünïcode <x>",
                "event_id": "e1",
                "category": None,
                "priority": "normal",
            },
            "recipient": {"id": "u1"},
            "activities": [],
            "unsubscribe_url": unsubscribe_url,
        }
        native, jinja = (
            render.render(
                channel, c, context, where="b", max_output_chars=100_000, sms_max_segments=10
            )
            for c in (built_in, render.Compiled(built_in.parts))
        )
        assert native == jinja, data


def test_the_built_in_templates_keep_the_output_bound() -> None:
    built_in = render.default_templates()["inapp"]
    context = {"data": {"x": "y" * 500}, "event": {"topic": "t"}, "unsubscribe_url": None}
    for compiled in (built_in, render.Compiled(built_in.parts)):
        with pytest.raises(RenderError, match=r"built-in/inapp\.body: output longer than 100"):
            render.render(
                "inapp",
                compiled,
                context,
                where="built-in/inapp",
                max_output_chars=100,
                sms_max_segments=10,
            )

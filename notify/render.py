"""Rendering a notification's content from a tenant's template. Pure: no I/O, no clock.

Templates are Jinja2 source run in Jinja2's :class:`ImmutableSandboxedEnvironment`: a
template cannot reach Python internals (``__class__``, ``mro``...), call unsafe methods or
change the data it is given; the HTML part is auto-escaped (``{{ data.name }}`` holding
``<script>`` comes out as ``&lt;script&gt;``), the text parts are not. Undefined values are
errors (:class:`~jinja2.StrictUndefined`): ``{{ data.missing }}`` fails the render with a
:class:`RenderError` naming the part and the field, rather than sending "Hello ," to a
million people; ``{% if data.x is defined %}`` and ``{{ data.x | default("") }}`` are the ways
to make a field optional.

Bounds, so one tenant's template cannot stall the node: ``range()`` yields at most 1,000
items, loops nest at most 2 deep (checked when the template is stored), and a part's output
past ``max_output_chars`` stops the render with an error.

What a template sees: ``data`` (the event's data), ``event`` (``topic``, ``event_id``,
``category``, ``priority``), ``recipient`` (``id``, ``locale``, ``timezone``, ``email``,
``phone`` when known), ``activities`` (a digest's events' data, else an empty list) and
``unsubscribe_url`` (the one-click link when the mail carries one, else None).

Channels and their parts: email ``subject``, ``text`` (required) and ``html`` (optional);
push ``title`` and ``body``; sms ``text``; inapp ``title`` and ``body``. Webhooks take no
template: the event's data passes through as it is.

SMS length: a text in the GSM 03.38 alphabet goes as GSM-7 (160 characters in one segment,
153 per segment when split; ``^{}\\[~]|€`` count twice), anything else as UCS-2 (70, then 67
UTF-16 units). A text longer than ``max_segments`` segments is truncated: cut to fit with room
for an ellipsis (``...`` in GSM-7, ``…`` in UCS-2), at the last space when one is within the
last 20 characters (so a word is not split), never inside a surrogate pair or a GSM escape;
the content says ``truncated``. Push title and body are cut at 200 and 2,000 characters with
``…``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from channels.base import Content, EmailContent, PushContent, SmsContent

PARTS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    # channel: (required parts, optional parts)
    "email": (("subject", "text"), ("html",)),
    "push": (("title", "body"), ()),
    "inapp": (("title", "body"), ()),
    "sms": (("text",), ()),
}
MAX_RANGE: Final = 1000
MAX_LOOP_DEPTH: Final = 2
PUSH_TITLE_CHARS: Final = 200
PUSH_BODY_CHARS: Final = 2000

_GSM_BASIC: Final = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM_EXTENDED: Final = frozenset("^{}\\[~]|€\f")


class RenderError(Exception):
    """A template could not be rendered (a missing field, a sandbox refusal, an error in the
    template's own code, output too large). ``where`` names the part (``email.fr.subject``)."""

    code = "render_error"

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where


class TemplateError(ValueError):
    """A template refused when stored: a syntax error or a bound exceeded. ``field`` names
    the part (``locales.fr.subject``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class _Sandbox(ImmutableSandboxedEnvironment):
    def call(self, context: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
        if obj is range:
            return _bounded_range(*args)
        return super().call(context, obj, *args, **kwargs)


def _bounded_range(*args: int) -> range:
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise jinja2.exceptions.SecurityError(f"range() of more than {MAX_RANGE} items")
    return r


def _env(autoescape: bool) -> jinja2.Environment:
    env = _Sandbox(
        undefined=jinja2.StrictUndefined,
        autoescape=autoescape,
        keep_trailing_newline=True,
        auto_reload=False,
        cache_size=0,
    )
    env.globals["range"] = range  # intercepted by _Sandbox.call
    return env


_TEXT_ENV: Final = _env(False)
_HTML_ENV: Final = _env(True)


@dataclass(frozen=True, slots=True)
class Compiled:
    """One locale's parts of a template, compiled once. ``native``: for the built-in
    defaults only, each part as a plain function giving exactly what its Jinja2 source
    gives (see :func:`default_templates`), so the common case skips Jinja2's per-render
    machinery."""

    parts: Mapping[str, jinja2.Template]
    native: Mapping[str, Callable[[Mapping[str, Any]], str]] | None = None


def compile_part(channel: str, part: str, source: str, field: str) -> jinja2.Template:
    """Compile one part; raises :class:`TemplateError` naming ``field``."""
    env = _HTML_ENV if part == "html" else _TEXT_ENV
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(field, f"line {exc.lineno}: {exc.message}") from None
    depth = _loop_depth(tree)
    if depth > MAX_LOOP_DEPTH:
        raise TemplateError(field, f"loops nest {depth} deep; at most {MAX_LOOP_DEPTH}")
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:  # pragma: no cover - parse caught it above
        raise TemplateError(field, f"line {exc.lineno}: {exc.message}") from None


def compile_locale(channel: str, locale: str, parts: Mapping[str, str]) -> Compiled:
    """Check and compile one locale's parts of a ``channel`` template (required parts
    present, no unknown ones). Raises :class:`TemplateError` naming ``locales.<locale>.<part>``."""
    if channel not in PARTS:
        raise TemplateError("channel", f"no templates for channel {channel!r}")
    required, optional = PARTS[channel]
    for name in required:
        if name not in parts:
            raise TemplateError(f"locales.{locale}.{name}", f"required for {channel}")
    for name in parts:
        if name not in required and name not in optional:
            allowed = ", ".join(required + optional)
            raise TemplateError(f"locales.{locale}.{name}", f"not a part of {channel} ({allowed})")
    return Compiled(
        {
            name: compile_part(channel, name, source, f"locales.{locale}.{name}")
            for name, source in parts.items()
        }
    )


def _loop_depth(node: nodes.Node, depth: int = 0) -> int:
    here = depth + 1 if isinstance(node, nodes.For) else depth
    deepest = here
    for child in node.iter_child_nodes():
        deepest = max(deepest, _loop_depth(child, here))
    return deepest


def locale_chain(locale: str | None) -> tuple[str, ...]:
    """The locales to try, most specific first: ``fr-CA`` -> ``fr-ca``, ``fr``, ``default``
    (lower case; ``_`` read as ``-``)."""
    out: list[str] = []
    tag = (locale or "").replace("_", "-").lower()
    while tag:
        out.append(tag)
        tag = tag.rpartition("-")[0]
    out.append("default")
    return tuple(out)


def render_part(template: jinja2.Template, context: Mapping[str, Any], where: str, cap: int) -> str:
    """Render one part, stopping past ``cap`` characters. Raises :class:`RenderError`."""
    out: list[str] = []
    size = 0
    try:
        for chunk in template.generate(context):
            size += len(chunk)
            if size > cap:
                raise RenderError(where, f"output longer than {cap} characters")
            out.append(chunk)
    except RenderError:
        raise
    except jinja2.UndefinedError as exc:
        raise RenderError(where, f"missing field: {exc.message}") from None
    except jinja2.exceptions.SecurityError as exc:
        raise RenderError(where, f"refused by the sandbox: {exc}") from None
    except Exception as exc:  # the template's own code can raise anything (1/0, "a" + 1)
        raise RenderError(where, f"{type(exc).__name__}: {exc}") from None
    return "".join(out)


def render(
    channel: str,
    compiled: Compiled,
    context: Mapping[str, Any],
    *,
    where: str,
    max_output_chars: int,
    sms_max_segments: int,
) -> Content:
    """The channel's content from one locale's compiled parts. Raises :class:`RenderError`."""
    native = compiled.native
    if native is not None:
        done = {
            name: _native_part(f, context, f"{where}.{name}", max_output_chars)
            for name, f in native.items()
        }
    else:
        done = {
            name: render_part(t, context, f"{where}.{name}", max_output_chars)
            for name, t in compiled.parts.items()
        }
    if channel == "email":
        return EmailContent(subject=done["subject"], text=done["text"], html=done.get("html"))
    if channel in ("push", "inapp"):
        return PushContent(
            title=cut(done["title"], PUSH_TITLE_CHARS), body=cut(done["body"], PUSH_BODY_CHARS)
        )
    return sms_content(done["text"], sms_max_segments)


def cut(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters, ``…`` marking a cut."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


# ---------------------------------------------------------------------------------- SMS
def is_gsm7(text: str) -> bool:
    return all(c in _GSM_BASIC or c in _GSM_EXTENDED for c in text)


def _units(text: str, gsm: bool) -> int:
    if gsm:
        return sum(2 if c in _GSM_EXTENDED else 1 for c in text)
    return len(text.encode("utf-16-le")) // 2


def segments_of(text: str) -> tuple[int, str]:
    """How many SMS segments ``text`` takes, and its encoding (``gsm7`` or ``ucs2``)."""
    gsm = is_gsm7(text)
    single, multi = (160, 153) if gsm else (70, 67)
    n = _units(text, gsm)
    if n <= single:
        return 1, "gsm7" if gsm else "ucs2"
    return -(-n // multi), "gsm7" if gsm else "ucs2"


def sms_content(text: str, max_segments: int) -> SmsContent:
    """``text`` as an SMS of at most ``max_segments`` segments (truncated by the rule in the
    module docstring)."""
    count, encoding = segments_of(text)
    if count <= max_segments:
        return SmsContent(text=text, segments=count, encoding=encoding)
    gsm = encoding == "gsm7"
    single, multi = (160, 153) if gsm else (70, 67)
    budget = single if max_segments == 1 else multi * max_segments
    ellipsis = "..." if gsm else "…"
    room = budget - _units(ellipsis, gsm)
    kept = _prefix_within(text, room, gsm)
    space = kept.rfind(" ")
    if space >= 0 and len(kept) - space <= 20:
        kept = kept[:space]
    kept = kept.rstrip() + ellipsis
    count, encoding = segments_of(kept)
    return SmsContent(text=kept, segments=count, encoding=encoding, truncated=True)


def _prefix_within(text: str, units: int, gsm: bool) -> str:
    """The longest prefix of whole characters taking at most ``units`` (so neither a GSM
    escape pair nor a UTF-16 surrogate pair is split)."""
    used = 0
    for i, c in enumerate(text):
        cost = (2 if c in _GSM_EXTENDED else 1) if gsm else (2 if ord(c) > 0xFFFF else 1)
        if used + cost > units:
            return text[:i]
        used += cost
    return text


def _native_part(
    part: Callable[[Mapping[str, Any]], str], context: Mapping[str, Any], where: str, cap: int
) -> str:
    """One built-in part rendered natively, with :func:`render_part`'s bound and errors."""
    try:
        text = part(context)
    except Exception as exc:  # data json cannot encode (not from a decoded event)
        raise RenderError(where, f"{type(exc).__name__}: {exc}") from None
    if len(text) > cap:
        raise RenderError(where, f"output longer than {cap} characters")
    return text


def _tojson(value: Any, indent: int | None = None) -> str:
    """Jinja2's ``tojson`` filter with its default policies: :func:`json.dumps` with sorted
    keys, then ``<``, ``>``, ``&`` and ``'`` escaped as ``\\u00XX``."""
    return (
        json.dumps(value, sort_keys=True, indent=indent)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("'", "\\u0027")
    )


def _topic(c: Mapping[str, Any]) -> str:  # {{ event.topic }}
    return str(c["event"]["topic"])


def _data_json(c: Mapping[str, Any]) -> str:  # {{ data | tojson }}
    return _tojson(c["data"])


def _email_text(c: Mapping[str, Any]) -> str:
    body = _tojson(c["data"], indent=2)
    url = c["unsubscribe_url"]
    return f"{body}\n\n\nUnsubscribe: {url}\n" if url else f"{body}\n\n"


def _sms_text(c: Mapping[str, Any]) -> str:  # {{ event.topic }}: {{ data | tojson }}
    return f"{_topic(c)}: {_data_json(c)}"


@functools.lru_cache(maxsize=1)
def default_templates() -> dict[str, Compiled]:
    """Used when a tenant has no template for a (topic, channel): the topic as the subject
    or title, the event's data as indented JSON, and the unsubscribe link when there is one.
    Each is rendered by its ``native`` functions (the same text as its Jinja2 source, which
    ``tests/unit/notify/test_render.py`` checks on a range of data; Jinja2's sandbox and
    context cost more than the rest of an in-app delivery)."""
    json_block = "{{ data | tojson(indent=2) }}"
    unsub = "{% if unsubscribe_url %}\n\nUnsubscribe: {{ unsubscribe_url }}{% endif %}"
    sources = {
        "email": {"subject": "{{ event.topic }}", "text": f"{json_block}\n{unsub}\n"},
        "push": {"title": "{{ event.topic }}", "body": "{{ data | tojson }}"},
        "inapp": {"title": "{{ event.topic }}", "body": "{{ data | tojson }}"},
        "sms": {"text": "{{ event.topic }}: {{ data | tojson }}"},
    }
    natives: dict[str, dict[str, Callable[[Mapping[str, Any]], str]]] = {
        "email": {"subject": _topic, "text": _email_text},
        "push": {"title": _topic, "body": _data_json},
        "inapp": {"title": _topic, "body": _data_json},
        "sms": {"text": _sms_text},
    }
    out = {}
    for channel, parts in sources.items():
        compiled = compile_locale(channel, "default", parts)
        out[channel] = Compiled(compiled.parts, natives[channel])
    return out

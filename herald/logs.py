"""Structured logging: one line per event, ``key=value`` (logfmt) or JSON.

Modules log messages that already read ``event=name key=value ...``; this formatter adds the
time, level and logger in the same shape, so a delivery can be followed with grep.

Values are escaped: many come from clients (group names, client ids, topic names), and a
value holding a newline, a space, a quote or ``key=`` would otherwise forge a line or a
field. Every argument of a log call that is not a number is written as logfmt: bare when it
is printable and holds no space, ``=``, ``"`` or backslash, else double-quoted with ``\\"``,
``\\\\``, ``\\n``, ``\\r``, ``\\t`` and ``\\xNN``/``\\uNNNN`` for other unprintable
characters. So one call is one line, and a value never runs into the next key. The JSON
format parses those lines back into fields.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import orjson

_PLAIN = re.compile(r'[^\s="\\]+')
_SIMPLE_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


class _Escaped(str):
    """An escaped value: ``%r`` in a format string shows it as it is, like ``%s``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str.__str__(self)


def escape_value(value: str) -> str:
    """``value`` as one logfmt value (see the module docstring)."""
    if value and _PLAIN.fullmatch(value) and value.isprintable():
        return value
    out = ['"']
    for ch in value:
        if ch in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[ch])
        elif ch == " " or ch.isprintable():
            out.append(ch)
        elif ord(ch) <= 0xFF:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def _escape_arg(arg: Any) -> Any:
    if isinstance(arg, int | float) and not isinstance(arg, bool):
        return arg  # %d and %.3f need the number; a number cannot forge anything
    return _Escaped(escape_value(arg if isinstance(arg, str) else str(arg)))


def message_of(record: logging.LogRecord) -> str:
    """The record's message with every argument escaped."""
    msg = str(record.msg)
    args = record.args
    if not args:
        return msg
    if isinstance(args, tuple):
        return msg % tuple(_escape_arg(a) for a in args)
    return msg % {k: _escape_arg(v) for k, v in args.items()}


_PAIR = re.compile(r'([A-Za-z0-9_.]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?: |$)')
_UNESCAPE = re.compile(r'\\(["\\nrt]|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})')
_UNSIMPLE = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


def _unescape(value: str) -> str:
    if not value.startswith('"'):
        return value

    def one(m: re.Match[str]) -> str:
        code = m.group(1)
        return _UNSIMPLE[code] if len(code) == 1 else chr(int(code[1:], 16))

    return _UNESCAPE.sub(one, value[1:-1])


def parse_pairs(message: str) -> dict[str, str] | None:
    """The fields of a logfmt line (as :func:`message_of` writes them), or None if
    ``message`` is not a sequence of ``key=value`` pairs."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(message):
        m = _PAIR.match(message, pos)
        if m is None:
            return None
        fields[m.group(1)] = _unescape(m.group(2))
        pos = m.end()
    return fields or None


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (
            f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
            f"logger={record.name} {message_of(record)}"
        )
        if record.exc_info:
            line += f" exc={escape_value(self.formatException(record.exc_info))}"
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        msg = message_of(record)
        # "event=x a=b" messages become fields; anything else stays in "msg"
        fields = parse_pairs(msg)
        if fields is not None:
            entry.update(fields)
        else:
            entry["msg"] = msg
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(level: str = "info", fmt: str = "logfmt") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is one line per request: too much at our request rates
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

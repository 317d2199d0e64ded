"""The console channel writes one parseable key=value line per delivery; the null channel
accepts everything. Both answer delivered and refuse sends after close."""

from __future__ import annotations

import logging

import msgspec
import pytest

from channels.base import Delivered, Delivery
from channels.config import ConsoleConfig
from channels.console import ConsoleChannel, logfmt_value
from channels.errors import ChannelClosed
from channels.null import NullChannel


def make(payload: bytes = b'{"order": 42, "note": "two words"}', **kw: object) -> Delivery:
    fields: dict[str, object] = {
        "delivery_id": "d1",
        "tenant": "acme",
        "user": "u 1",
        "topic": "orders",
        "event_id": "e1",
        "created_ms": 0,
        "attempt": 2,
        "payload": msgspec.Raw(payload),
    }
    fields.update(kw)
    return Delivery(**fields)  # type: ignore[arg-type]


def parse_logfmt(line: str) -> dict[str, str]:
    """A minimal logfmt reader: bare values, or JSON strings."""
    out: dict[str, str] = {}
    i = 0
    while i < len(line):
        key_end = line.index("=", i)
        key = line[i:key_end]
        j = key_end + 1
        if line[j] == '"':
            dec = msgspec.json.Decoder(str)
            k = j + 1
            while line[k] != '"':
                k += 2 if line[k] == "\\" else 1
            out[key] = dec.decode(line[j : k + 1])
            i = k + 2
        else:
            end = line.find(" ", j)
            end = len(line) if end < 0 else end
            out[key] = line[j:end]
            i = end + 1
    return out


async def test_console_logs_one_parseable_line_per_delivery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="herald.channels.console")
    channel = ConsoleChannel()
    outcome = await channel.send(make(category="billing"))
    assert isinstance(outcome, Delivered)
    (record,) = caplog.records
    fields = parse_logfmt(record.getMessage())
    assert fields == {
        "event": "delivery",
        "channel": "console",
        "delivery_id": "d1",
        "tenant": "acme",
        "user": "u 1",
        "topic": "orders",
        "event_id": "e1",
        "attempt": "2",
        "category": "billing",
        "payload": '{"order":42,"note":"two words"}',
    }


async def test_console_cuts_a_long_payload(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="herald.channels.console")
    channel = ConsoleChannel(ConsoleConfig(max_payload_bytes=10))
    await channel.send(make(b'"' + b"x" * 100 + b'"'))
    assert parse_logfmt(caplog.records[0].getMessage())["payload"] == '"xxxxxxxxx...'
    await channel.close()
    with pytest.raises(ChannelClosed):
        await channel.send(make())


def test_logfmt_value_quotes_only_when_needed() -> None:
    assert logfmt_value("plain") == "plain"
    assert logfmt_value("") == '""'
    assert logfmt_value('a "b"') == '"a \\"b\\""'
    assert logfmt_value("k=v") == '"k=v"'


async def test_null_accepts_everything_and_counts() -> None:
    channel = NullChannel()
    for _ in range(3):
        assert isinstance(await channel.send(make()), Delivered)
    assert channel.sent == 3
    await channel.close()
    with pytest.raises(ChannelClosed):
        await channel.send(make())

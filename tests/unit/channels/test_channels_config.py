"""The channels' settings decode from TOML with defaults, kebab-case keys, and clear errors
naming a bad key or value."""

from __future__ import annotations

import tomllib

import msgspec
import pytest

from channels.config import BreakerConfig, ChannelsConfig, WebhookConfig


def decode(text: str) -> ChannelsConfig:
    return msgspec.convert(tomllib.loads(text), ChannelsConfig)


def test_an_empty_section_is_the_defaults() -> None:
    assert decode("") == ChannelsConfig()
    cfg = ChannelsConfig().webhook
    assert cfg.timeout_ms == 15_000 and cfg.allow_networks == []
    assert cfg.breaker == BreakerConfig()


def test_keys_are_kebab_case_and_nest() -> None:
    cfg = decode(
        """
        [webhook]
        timeout-ms = 8000
        allow-networks = ["127.0.0.1/32", "::1/128"]
        [webhook.breaker]
        failure-threshold = 2
        [console]
        max-payload-bytes = 10
        """
    )
    assert cfg.webhook.timeout_ms == 8000 and cfg.webhook.breaker.failure_threshold == 2
    assert cfg.webhook.allow_networks == ["127.0.0.1/32", "::1/128"]
    assert cfg.console.max_payload_bytes == 10


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ("[webhook]\ntimeout_ms = 1\n", "timeout_ms"),
        ("[webhook]\ntimeout-ms = 0\n", "timeout-ms"),
        ("[webhook.breaker]\nfailure-rate = 1.5\n", "failure-rate"),
        ("[webhook]\nallow-networks = ['10.0.0.0/33']\n", "allow-networks"),
        ("[webhook]\nconnect-timeout-ms = 20000\n", "connect-timeout-ms"),
        ("[webhok]\n", "webhok"),
        ("[sms]\nstatus-callback = '/hooks/sms/status'\n", "status-callback"),
        ("[sms]\nstatus-callback = 'herald.example.com/hooks'\n", "status-callback"),
        ("[sms]\ninbound-public-url = 'ftp://herald.example.com/x'\n", "inbound-public-url"),
    ],
)
def test_a_bad_key_or_value_is_an_error_naming_it(toml: str, named: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=named):
        decode(toml)


def test_every_field_documents_its_default_and_why() -> None:
    import inspect

    from channels import config

    source = inspect.getsource(config)
    for struct in (WebhookConfig, BreakerConfig, config.ConsoleConfig):
        for field in struct.__struct_fields__:
            after = source.split(f"    {field}:", 1)[1].split("\n", 2)[1]
            assert after.strip().startswith('"""'), f"{struct.__name__}.{field} has no docstring"


def test_the_defaults_written_in_docs_channels_are_the_code_s() -> None:
    """docs/CHANNELS.md shows every key with its default; decoding that block gives exactly
    the defaults, and it names every field, so the page cannot drift from the code."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[3] / "docs" / "CHANNELS.md").read_text()
    block = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    data = tomllib.loads(block)["channels"]
    assert decode_dict(data) == ChannelsConfig()
    assert set(data["webhook"]) == {f.replace("_", "-") for f in WebhookConfig.__struct_fields__}
    assert set(data["webhook"]["breaker"]) == {
        f.replace("_", "-") for f in BreakerConfig.__struct_fields__
    }


def decode_dict(data: dict[str, object]) -> ChannelsConfig:
    return msgspec.convert(data, ChannelsConfig)

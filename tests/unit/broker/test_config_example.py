"""``config.example.toml`` documents every key with its default, so it can never drift from
``broker/config.py``: decoding it gives exactly ``Config()``, every field of every section is
written in it, and an unknown key is refused with a message naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from broker.config import Config, ConfigError, load_config

EXAMPLE = Path(__file__).resolve().parents[3] / "config.example.toml"


def _expected_keys(struct: type[msgspec.Struct], prefix: str = "") -> set[str]:
    """Dotted TOML paths (``storage.segment-bytes``) of every leaf field of ``struct``; a
    field holding a Struct or a list of them (``[[auth.keys]]``) is a section."""
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    keys: set[str] = set()
    for f in info.fields:
        t = f.type
        if isinstance(t, msgspec.inspect.ListType):
            t = t.item_type
        if isinstance(t, msgspec.inspect.StructType):
            keys |= _expected_keys(t.cls, f"{prefix}{f.encode_name}.")
        else:
            keys.add(prefix + f.encode_name)
    return keys


def _written_keys(text: str) -> set[str]:
    """Dotted paths of the keys written in ``text``, commented-out ones too: ``# key = value``
    documents a key whose default TOML cannot spell (none) or an example list entry."""
    keys: set[str] = set()
    section = ""
    for line in text.splitlines():
        body = line.lstrip("# ").rstrip()
        if m := re.fullmatch(r"\[\[?([a-z0-9.-]+)\]\]?", body):
            section = m.group(1) + "."
        elif m := re.match(r"([a-z0-9-]+) = ", body):
            keys.add(section + m.group(1))
    return keys


def test_example_decodes_to_exactly_the_defaults() -> None:
    assert load_config(EXAMPLE) == Config()


def test_example_writes_every_key_of_every_section() -> None:
    written = _written_keys(EXAMPLE.read_text())
    assert "storage.segment-bytes" in written and "auth.keys.scopes" in written
    assert sorted(_expected_keys(Config) - written) == [], "config.example.toml lacks these"
    assert sorted(written - _expected_keys(Config)) == [], "config.example.toml has extras"


def test_every_example_key_carries_a_comment_saying_why() -> None:
    lines = EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"[a-z0-9-]+ = ", line):
            assert i > 0 and lines[i - 1].startswith("#"), f"no comment above {line!r}"


def test_commented_auth_key_example_is_valid_when_uncommented(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    block = text[text.index("# [[auth.keys]]") : text.index("[log]")]
    uncommented = "\n".join(
        line[2:] for line in block.splitlines() if line.startswith("# ") and "=" in line
    )
    path = tmp_path / "herald.toml"
    path.write_text("[[auth.keys]]\n" + uncommented + "\n")
    (key,) = load_config(path).auth.keys
    assert key.scopes == ["produce", "consume"] and key.tenant == "default"


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ("node-idd = 1\n", "node-idd"),
        ("[storage]\nsegment-byte = 1\n", "segment-byte"),
        ("[limits]\nmax_frame_bytes = 1\n", "max_frame_bytes"),  # snake_case is not a key
        ("[listn]\nhost = '0.0.0.0'\n", "listn"),
    ],
)
def test_unknown_key_is_refused_with_its_name(tmp_path: Path, toml: str, named: str) -> None:
    path = tmp_path / "herald.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(path)


def test_commented_sms_provider_example_is_valid_when_uncommented(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    block = text[text.index("# [[channels.sms.providers]]") : text.index("[channels.apns]")]
    uncommented = "\n".join(
        line[2:].split("  #")[0]
        for line in block.splitlines()
        if line.startswith("# ") and " = " in line
    )
    path = tmp_path / "herald.toml"
    path.write_text("[[channels.sms.providers]]\n" + uncommented + "\n")
    (provider,) = load_config(path).channels.sms.providers
    assert provider.name == "primary" and provider.rate_per_s == 1.0

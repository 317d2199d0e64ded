"""Config loading: defaults, kebab-case TOML, and errors that name the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import Config, ConfigError, load_config


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "herald.toml"
    path.write_text(text)
    return load_config(path)


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value)


def test_no_file_and_an_empty_file_give_the_defaults(tmp_path: Path) -> None:
    assert load_config(None) == Config()
    cfg = load(tmp_path, "")
    assert cfg == Config()
    assert cfg.listen.host == "127.0.0.1"
    assert (cfg.listen.tcp_port, cfg.listen.http_port) == (9092, 8080)
    assert cfg.groups.default_assignor == "sticky"
    assert cfg.auth.keys == []
    assert cfg.limits.max_batch_bytes <= cfg.limits.max_frame_bytes


def test_keys_are_kebab_case(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "node-id = 3\n[listen]\ntcp-port = 19092\n[limits]\nmax-wait-ms = 250\n"
        '[groups]\ndefault-assignor = "range"\n',
    )
    assert cfg.node_id == 3
    assert cfg.listen.tcp_port == 19092
    assert cfg.limits.max_wait_ms == 250
    assert cfg.groups.default_assignor == "range"
    assert cfg.storage == Config().storage  # untouched sections keep their defaults


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("colour = 1\n", "colour"),
        ("[listen]\nhttp_port = 1\n", "http_port"),  # snake case is not the TOML spelling
        ("[limits]\nmax-frame-byte = 1\n", "max-frame-byte"),
        ("[nonsense]\nx = 1\n", "nonsense"),
        ('[[auth.keys]]\nkey = "0123456789abcdef"\nrole = "admin"\n', "role"),
    ],
)
def test_an_unknown_key_is_an_error_naming_it(tmp_path: Path, text: str, name: str) -> None:
    message = error(tmp_path, text)
    assert f"`{name}`" in message
    assert str(tmp_path / "herald.toml") in message


def test_a_wrong_type_names_the_key_path(tmp_path: Path) -> None:
    message = error(tmp_path, '[listen]\ntcp-port = "9092"\n')
    assert "$.listen.tcp-port" in message
    message = error(tmp_path, '[groups]\ndefault-assignor = "roundrobin"\n')
    assert "$.groups.default-assignor" in message
    message = error(tmp_path, '[[auth.keys]]\nkey = "0123456789abcdef"\nscopes = ["root"]\n')
    assert "$.auth.keys[0].scopes[0]" in message


def test_api_keys_decode_with_tenant_and_scopes(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        '[[auth.keys]]\nkey = "acme-0123456789abc"\ntenant = "acme"\n'
        'scopes = ["produce", "consume", "admin"]\n'
        '[[auth.keys]]\nkey = "beta-0123456789abc"\n',
    )
    acme, beta = cfg.auth.keys
    assert (acme.tenant, acme.scopes) == ("acme", ["produce", "consume", "admin"])
    assert (beta.tenant, beta.scopes) == ("default", ["produce", "consume"])


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[[auth.keys]]\nkey = "short"\n', "auth.keys[0].key"),
        ('[[auth.keys]]\nkey = "0123456789abcdef"\n' * 2, "auth.keys[1].key"),
        ("[listen]\nhttp-port = 70000\n", "listen.http-port"),
        ("[listen]\ntcp-port = -1\n", "listen.tcp-port"),
        ("[topics]\npartitions = 0\n", "topics.partitions"),
        ("[limits]\nmax-frame-bytes = 1024\nmax-batch-bytes = 2048\n", "max-batch-bytes"),
    ],
)
def test_invalid_values_are_refused_naming_the_key(tmp_path: Path, text: str, needle: str) -> None:
    assert needle in error(tmp_path, text)


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    assert "invalid TOML" in error(tmp_path, "[listen\n")


def test_segment_size_beyond_what_the_index_can_address_is_refused(tmp_path: Path) -> None:
    assert "segment-bytes" in error(tmp_path, "[storage]\nsegment-bytes = 5368709120\n")


def test_notify_channels_must_be_built_in(tmp_path: Path) -> None:
    path = tmp_path / "herald.toml"
    path.write_text('[notify]\nchannels = ["pager"]\n')  # no channel by that name
    with pytest.raises(ConfigError, match=r"notify\.channels"):
        load_config(path)
    path.write_text("[notify.retry]\ndelays-ms = [0]\n")
    with pytest.raises(ConfigError, match=r"notify\.retry"):
        load_config(path)


def test_notify_linger_is_bounded(tmp_path: Path) -> None:
    assert load(tmp_path, "[notify]\nlinger-ms = 0\n").notify.linger_ms == 0
    assert load(tmp_path, "").notify.linger_ms == 1.0
    assert "notify.linger-ms" in error(tmp_path, "[notify]\nlinger-ms = -1\n")
    assert "notify.linger-ms" in error(tmp_path, "[notify]\nlinger-ms = 5000\n")


def test_a_channel_sizes_its_own_pool(tmp_path: Path) -> None:
    path = tmp_path / "herald.toml"
    path.write_text(
        "[notify]\ndeliver-concurrency = 64\nqueue-depth-bound = 1000\n"
        '[[notify.channel-limits]]\nchannel = "sms"\ndeliver-concurrency = 4\n'
    )
    n = load_config(path).notify
    assert n.limits("sms") == (4, 2000, 1000)
    assert n.limits("webhook") == (64, 2000, 1000)
    path.write_text('[[notify.channel-limits]]\nchannel = "pager"\n')
    with pytest.raises(ConfigError, match="pager"):
        load_config(path)
    path.write_text('[[notify.channel-limits]]\nchannel = "sms"\ndeliver-batch = 0\n')
    with pytest.raises(ConfigError, match="channel-limits"):
        load_config(path)


def test_quotas_with_per_tenant_overrides(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        '[quotas]\ntopics = 7\n[[quotas.tenants]]\ntenant = "acme"\ngroups = 3\n',
    )
    acme = cfg.quotas.for_tenant("acme")
    assert (acme.topics, acme.groups) == (7, 3)
    assert cfg.quotas.for_tenant("beta").groups == cfg.quotas.groups


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ('[[auth.keys]]\nkey = "0123456789abcdef"\ntenant = "a~b"\n', "tenant"),
        ('[[auth.keys]]\nkey = "0123456789abcdef"\ntenant = "a/b"\n', "auth.keys[0].tenant"),
        ('[[auth.keys]]\nkey = "0123456789abcdef"\ntenant = "' + "t" * 27 + '"\n', "tenant"),
        ("[quotas]\ntopics = -1\n", "quotas.topics"),
        ('[[quotas.tenants]]\ntenant = "a"\n[[quotas.tenants]]\ntenant = "a"\n', "twice"),
        ('[[quotas.tenants]]\ntenant = "a"\ngroups = -2\n', "quotas.tenants[0].groups"),
        ("[groups]\nmax-members = 0\n", "groups.max-members"),
        ("[topics]\ntimestamp-after-max-ms = -1\n", "timestamp-after-max-ms"),
    ],
)
def test_bad_tenants_and_quotas_are_refused_naming_them(
    tmp_path: Path, toml: str, named: str
) -> None:
    assert named in error(tmp_path, toml)

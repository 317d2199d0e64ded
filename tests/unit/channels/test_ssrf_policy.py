"""The SSRF policy refuses every non-global address unless allowed, judges IPv4 addresses
wrapped in IPv6 by what they wrap, and the guarded resolver answers only allowed addresses."""

from __future__ import annotations

import socket

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from channels.errors import ForbiddenAddress
from channels.ssrf import AddressPolicy, GuardedResolver


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("fd00::1", "private"),
        ("100.64.0.1", "not-global"),  # carrier-grade NAT
        ("192.0.2.1", "private"),  # documentation range
        ("240.0.0.1", "private"),
        ("::ffff:10.0.0.1", "private:10.0.0.1"),
        ("::ffff:127.0.0.1", "loopback:127.0.0.1"),
        ("64:ff9b::a9fe:a9fe", "link-local:169.254.169.254"),
        ("2002:a00:1::", "private:10.0.0.1"),
        ("not-an-ip", "not-an-ip-address"),
    ],
)
def test_non_global_addresses_are_refused(address: str, why: str) -> None:
    assert AddressPolicy().refusal(address) == why
    with pytest.raises(ForbiddenAddress):
        AddressPolicy().check(address)


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111"])
def test_global_addresses_pass(address: str) -> None:
    assert AddressPolicy().refusal(address) is None


def test_the_allow_list_admits_exactly_its_networks() -> None:
    policy = AddressPolicy(["127.0.0.1/32", "10.1.0.0/16"])
    assert policy.refusal("127.0.0.1") is None
    assert policy.refusal("::ffff:127.0.0.1") is None  # the same address, wrapped
    assert policy.refusal("10.1.200.3") is None
    assert policy.refusal("127.0.0.2") == "loopback"
    assert policy.refusal("::1") == "loopback"
    assert policy.refusal("10.2.0.1") == "private"


class FakeResolver(AbstractResolver):
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host, host=ip, port=port, family=socket.AF_INET, proto=0, flags=0
            )
            for ip in self.answers[host]
        ]

    async def close(self) -> None:
        pass


async def test_the_resolver_drops_refused_addresses_and_fails_when_none_is_left() -> None:
    fake = FakeResolver({"mixed.test": ["10.0.0.1", "93.184.215.14"], "evil.test": ["127.0.0.1"]})
    resolver = GuardedResolver(AddressPolicy(), fake)
    assert [r["host"] for r in await resolver.resolve("mixed.test", 80)] == ["93.184.215.14"]
    with pytest.raises(ForbiddenAddress, match=r"evil.test \(127.0.0.1\) is loopback"):
        await resolver.resolve("evil.test", 80)

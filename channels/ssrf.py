"""The SSRF guard: which addresses an outbound request may connect to, checked on the address
actually connected to.

A webhook URL is chosen by a tenant's user, so without a guard Herald would POST wherever a
user points it: the cloud metadata service (169.254.169.254), the node's own admin port on
127.0.0.1, a database on the private network. Checking the URL's host name is not enough: a
name can resolve to a private address, and resolve differently between a check and the
connect (DNS rebinding). So the check runs at connect time, on the resolved address, in two
places of the webhook channel's client (:mod:`channels.http1`):

1. :class:`GuardedResolver` drops refused addresses from every resolution, and fails the
   lookup with :class:`~channels.errors.ForbiddenAddress` when none is left; the client only
   ever connects to what its resolver returned, so a second, different answer cannot slip
   in. Resolutions are cached after the check, never before.
2. :meth:`AddressPolicy.check` on the exact address each connection is about to be made to:
   the last word, and the only check for a URL with an IP literal (which is not resolved).

Refused unless on the allow-list: every address that is not global (private, loopback,
link-local, shared, reserved, unspecified, documentation ranges) and every multicast address.
IPv4 addresses wrapped in IPv6 (``::ffff:10.0.0.1``, NAT64 ``64:ff9b::a00:1``, 6to4
``2002:a00:1::``) are judged by the IPv4 address inside.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

from aiohttp.abc import AbstractResolver, ResolveResult

from channels.errors import ForbiddenAddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address carries, if it is only a wrapper for one."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


def _why_refused(ip: IPAddress) -> str | None:
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "not-global"
    return None


class AddressPolicy:
    """Refuses non-global and multicast addresses unless an allowed network holds them."""

    def __init__(self, allow_networks: Sequence[str] = ()) -> None:
        self.allowed = tuple(ipaddress.ip_network(n, strict=False) for n in allow_networks)

    def refusal(self, address: str) -> str | None:
        """Why ``address`` (an IP literal, maybe with an IPv6 ``%scope``) is refused, as one
        word (``private``, ``loopback``, ``link-local``, ``multicast``, ``unspecified``,
        ``reserved``, ``not-global``; ``private:10.0.0.1`` for a wrapped IPv4 address), or
        ``None`` when it may be connected to."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return "not-an-ip-address"
        inner = _unwrap(ip)
        if any(inner in net or ip in net for net in self.allowed):
            return None
        why = _why_refused(inner)
        if why is None and inner is not ip:
            why = _why_refused(ip)
        if why is not None and inner is not ip:
            why = f"{why}:{inner}"  # e.g. "private:10.0.0.1" for ::ffff:10.0.0.1
        return why

    def check(self, address: str) -> None:
        """Raise :class:`ForbiddenAddress` if ``address`` is refused."""
        why = self.refusal(address)
        if why is not None:
            raise ForbiddenAddress(address, why)


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that answers only addresses the policy allows.

    ``inner`` does the lookup (aiohttp's ``ThreadedResolver``, which calls ``getaddrinfo`` in
    the loop's executor, unless given; tests pass a fake to play DNS rebinding).
    """

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:
            from aiohttp.resolver import ThreadedResolver

            self._inner = ThreadedResolver()
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if self._policy.refusal(r["host"]) is None]
        if not allowed:
            if not results:
                raise OSError(f"{host} resolved to no address")
            first = results[0]["host"]
            raise ForbiddenAddress(f"{host} ({first})", self._policy.refusal(first) or "refused")
        return allowed

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()

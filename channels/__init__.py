"""Channels: how one delivery leaves Herald (``docs/NOTIFY.md``).

A channel sees a :class:`channels.base.Delivery` and answers an :class:`channels.base.Outcome`;
it imports neither ``broker`` nor ``notify``. The delivery workers of the notifications core
own retries, dead letters and the audit; a channel owns the wire: the provider's protocol, its
failure classes, its circuit breaker and its concurrency limit.
"""

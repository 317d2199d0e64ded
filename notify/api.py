"""The notification HTTP API (``docs/API.md``): users, devices, subscriptions, preferences,
consent, workflows, cancellation, event status, feeds and engagement, dead letters.

A transport over the registry (``notify/registry.py``) and the engine (``notify/engine.py``):
it authenticates, checks the scope, decodes the body into its struct, calls one method and
encodes the answer. The routes are :class:`broker.openapi.Route` s that the node hands to the
broker's aiohttp app (``herald/node.py``); the broker never imports this package, and
``GET /openapi.json`` is generated from the same table.

Tenancy: every call acts on the API key's tenant only; another tenant's user, event,
workflow or dead letter is answered exactly as a missing one (``notify/errors.py``).

Scopes: reads take ``consume`` or ``admin``; writes take ``admin``, except two that their
natural callers must be able to make without ``admin``:

- ``POST /events/cancel`` takes ``produce`` or ``admin``: who publishes an event with a
  cancellation key is who calls it off;
- the engagement marks (``POST /users/{id}/notifications/{id}/seen|read|clicked|archived``)
  take ``engage`` or ``admin``: an in-app feed's backend records what its users saw, and
  must not be able to erase users or replay dead letters.

Durability: every write is durable before its answer (the registry's and the engine's async
methods sync the state store; appends are acknowledged once fsynced).

Handlers live by resource in ``notify/api_registry.py`` and ``notify/api_engine.py``, over
the plumbing of ``notify/api_base.py``; this module puts their routes together.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from broker.auth import Principal
from broker.openapi import Route
from notify import api_engine, api_registry
from notify.api_base import Api
from notify.engine import Engine
from notify.registry import Registry


def notify_routes(
    registry: Registry,
    engine: Engine,
    principal: Callable[[web.Request], Principal],
    clock: Callable[[], int],
) -> list[Route]:
    """Every route of the notification API, for the node to add to its HTTP app."""
    api = Api(registry, engine, principal, clock)
    return [*api_registry.routes(api), *api_engine.routes(api)]

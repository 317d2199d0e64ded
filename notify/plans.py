"""Plans that parked runs refer to, by a reference derived from their content.

A run parked for a day must resume under the workflow it started with, even if the topic's
workflow was edited meanwhile (its step indexes, and so its delivery ids, belong to that
body). A timer row therefore names its plan by ``plan_ref``: ``d:<channels>`` for the default
plan, ``w:<xxh3_64 of the body>`` for a workflow body, whose bytes are kept once in the
``notify_plans`` table however many runs park on them (a million parked runs of one workflow
cost one row). Parsed plans are cached (bounded).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final

import msgspec
import xxhash

from notify.model import PlanRow, Workflow
from notify.runs import Layout, layout
from notify.workflows import Plan, default_plan, parse_workflow
from storage.kv import KV

CACHE: Final = 1024
_json = msgspec.json.Encoder(order="sorted")


class Plans:
    def __init__(self, kv: KV) -> None:
        self._rows = kv.table("notify_plans", PlanRow)
        self._cache: OrderedDict[str, tuple[Plan, Layout]] = OrderedDict()
        self._stored: set[str] = set()

    def for_workflow(self, body: Workflow) -> tuple[str, Plan, Layout]:
        """The reference, plan and layout of a workflow body (stored on first use)."""
        raw: dict[str, Any] = msgspec.to_builtins(body)
        ref = "w:" + xxhash.xxh3_64_hexdigest(_json.encode(raw))
        hit = self._cache.get(ref)
        if hit is None:
            plan = parse_workflow(body)
            hit = self._remember(ref, plan)
        if ref not in self._stored:
            if self._rows.get(ref) is None:
                self._rows.put(ref, PlanRow(body=raw))
            self._stored.add(ref)
        return ref, hit[0], hit[1]

    def for_channels(self, channels: tuple[str, ...]) -> tuple[str, Plan, Layout]:
        """The default plan (one send per channel) for a subscriber's channels."""
        ref = "d:" + ",".join(sorted(channels))
        hit = self._cache.get(ref)
        if hit is None:
            hit = self._remember(ref, default_plan(channels))
        return ref, hit[0], hit[1]

    def get(self, ref: str) -> tuple[Plan, Layout] | None:
        """The plan a timer row names; None if it cannot be found or no longer parses."""
        hit = self._cache.get(ref)
        if hit is not None:
            self._cache.move_to_end(ref)
            return hit
        if ref.startswith("d:"):
            channels = tuple(c for c in ref[2:].split(",") if c)
            return self._remember(ref, default_plan(channels))
        row = self._rows.get(ref)
        if row is None or row.body is None:
            return None
        try:
            plan = parse_workflow(row.body)
        except Exception:  # a body stored by an older node that this one refuses
            return None
        return self._remember(ref, plan)

    def _remember(self, ref: str, plan: Plan) -> tuple[Plan, Layout]:
        hit = (plan, layout(plan))
        self._cache[ref] = hit
        if len(self._cache) > CACHE:
            self._cache.popitem(last=False)
        return hit

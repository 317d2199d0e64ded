"""``GET /openapi.json`` describes exactly what the node serves, and a schema-driven fuzzer
(schemathesis, a tester nobody here wrote) that builds requests from that document finds no
5xx on a real node on 127.0.0.1, and no answer that strays from the document (its status,
content type or body schema): a bounded number of examples per operation in the default
suite, many more under ``-m slow``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from herald.node import Node
from tests.integration.herald_process import HeraldProcess, Nodes
from tests.integration.notify.conftest import node_config

# a long poll would make each fetch example wait; the fuzzer only needs the answer's status
FUZZ_CONFIG = """
[limits]
max-wait-ms = 50

[notify]
channels = ["webhook", "console"]

[channels.webhook]
allow-networks = ["127.0.0.1/32"]
"""


async def test_every_route_the_node_serves_is_in_its_openapi_document(tmp_path: Path) -> None:
    node = Node(node_config(tmp_path), shutdown_timeout=1.0)
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(node.run(lambda n: ready.set_result(None)))
    try:
        await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
        assert node.http_app is not None
        served = set()
        for route in node.http_app.router.routes():
            if route.method == "HEAD":  # aiohttp adds one beside each GET
                continue
            info = route.resource.get_info() if route.resource is not None else {}
            served.add((route.method.lower(), info.get("path") or info.get("formatter")))
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{node.ports['http']}/openapi.json") as resp,
        ):
            assert resp.status == 200 and resp.content_type == "application/json"
            doc = msgspec.json.decode(await resp.read())
        documented = {(m, path) for path, ops in doc["paths"].items() for m in ops}
        assert served == documented
        # the notification API is there, with schemas generated from its structs
        for path in ("/users/{user}", "/dlq/{channel}/replay", "/events/{event_id}"):
            assert path in doc["paths"]
        # and the templates, their preview, the consent ledger and the email links, so the
        # fuzzer below reaches them too
        for method, path in (
            ("put", "/templates/{topic}/{channel}"),
            ("get", "/templates/{topic}/{channel}"),
            ("post", "/templates/{topic}/{channel}/preview"),
            ("get", "/users/{user}/consent"),
            ("post", "/users/{user}/webhook/enable"),
            ("post", "/unsubscribe/{token}"),
            ("post", "/hooks/email/bounce"),
        ):
            assert method in doc["paths"][path], (method, path)
        unsubscribe = doc["paths"]["/unsubscribe/{token}"]["post"]
        assert "text/html" in unsubscribe["responses"]["200"]["content"]
        assert unsubscribe["security"] == [{}]  # the signed token is the proof, not a key
        assert doc["openapi"].startswith("3.1")
        assert {"User", "UserOut", "Workflow", "ErrorBody", "DeadLetterOut"} <= set(
            doc["components"]["schemas"]
        )
        put_user = doc["paths"]["/users/{user}"]["put"]
        assert put_user["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/User"
        }
        # every operation loads in a third-party OpenAPI reader
        schema = schemathesis.openapi.from_dict(doc)
        ops = [r.ok() for r in schema.get_all_operations()]
        assert len(ops) == len(documented)
    finally:
        node.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 20)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeraldProcess]:
    nodes = Nodes(tmp_path_factory.mktemp("fuzz"))
    try:
        yield nodes(config=FUZZ_CONFIG)
    finally:
        nodes.close()


@pytest.mark.parametrize(
    "examples",
    [
        pytest.param(6, id="bounded"),
        pytest.param(150, id="long", marks=[pytest.mark.slow, pytest.mark.timeout(900)]),
    ],
)
def test_a_schema_driven_fuzzer_finds_no_server_error_and_no_drift(
    fuzz_node: HeraldProcess, examples: int
) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_node.http_url}/openapi.json")
    failures: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=examples < 100,  # the default suite is the same on every run
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy())
        def run(case: schemathesis.Case) -> None:
            resp = case.call(base_url=fuzz_node.http_url, timeout=10)
            try:
                case.validate_response(resp, checks=CHECKS)
            except FailureGroup as exc:
                failures.append(
                    f"{case.method} {case.formatted_path} -> {resp.status_code}: {exc}"[:1500]
                )

        run()
    assert fuzz_node.running, fuzz_node.log_tail()
    assert not failures, "\n".join(failures[:20]) + "\n" + fuzz_node.log_tail(30)

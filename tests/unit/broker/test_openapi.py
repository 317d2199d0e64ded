"""The OpenAPI document built from a route table (``broker/openapi.py``), without a node:
paths and methods, path and query parameters, request and answer schemas generated from the
structs, the error schema, and who needs a key."""

from __future__ import annotations

import msgspec
from aiohttp import web

from broker.openapi import Param, Route, build_openapi


class ThingIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A thing to store."""

    name: str
    size: int = 1


class ThingOut(msgspec.Struct, kw_only=True):
    id: str
    name: str


async def handler(request: web.Request) -> web.Response:
    return web.Response()


ROUTES = [
    Route("PUT", "/things/{thing}", handler, "Store a thing", "things", scopes=("admin",),
          body=ThingIn, answer=ThingOut, path_params={"thing": "its id"}, errors=(404,)),
    Route("GET", "/things", handler, "List things", "things", scopes=("consume", "admin"),
          answer=list[ThingOut], query=(Param("limit", int, "at most", minimum=1, maximum=9),)),
    Route("GET", "/health", handler, "Health", "ops", scopes=None),
    Route("GET", "/metrics", handler, "Metrics", "ops", scopes=(), answer=bytes),
]  # fmt: skip


def test_every_route_is_a_path_and_method_with_its_parameters() -> None:
    doc = build_openapi(ROUTES, title="t", version="1")
    assert doc["openapi"] == "3.1.0"
    assert {p: set(ops) for p, ops in doc["paths"].items()} == {
        "/things/{thing}": {"put"},
        "/things": {"get"},
        "/health": {"get"},
        "/metrics": {"get"},
    }
    put = doc["paths"]["/things/{thing}"]["put"]
    assert put["operationId"] == "putThingsThing"
    (param,) = put["parameters"]
    assert (param["name"], param["in"], param["required"]) == ("thing", "path", True)
    (limit,) = doc["paths"]["/things"]["get"]["parameters"]
    assert limit["in"] == "query" and limit["schema"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 9,
    }


def test_bodies_and_answers_are_the_structs_schemas() -> None:
    doc = build_openapi(ROUTES, title="t", version="1")
    schemas = doc["components"]["schemas"]
    assert schemas["ThingIn"]["required"] == ["name"]
    assert schemas["ThingIn"]["additionalProperties"] is False  # unknown fields are errors
    assert schemas["ThingIn"]["description"] == "A thing to store."
    put = doc["paths"]["/things/{thing}"]["put"]
    assert put["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ThingIn"
    }
    ok = put["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/ThingOut"}
    listed = doc["paths"]["/things"]["get"]["responses"]["200"]["content"]
    assert listed["application/json"]["schema"]["items"] == {
        "$ref": "#/components/schemas/ThingOut"
    }
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    error = put["responses"]["404"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorBody"}
    assert set(schemas["ErrorDetail"]["required"]) == {"code", "message", "field"}


def test_scopes_say_who_needs_a_key() -> None:
    doc = build_openapi(ROUTES, title="t", version="1")
    paths = doc["paths"]
    assert doc["security"] == [{"bearer": []}]
    assert paths["/health"]["get"]["security"] == [{}]  # no key needed
    assert "401" not in paths["/health"]["get"]["responses"]
    assert "security" not in paths["/things"]["get"]
    assert paths["/things"]["get"]["description"].endswith("Scope: consume or admin.")
    assert paths["/metrics"]["get"]["description"] == "Any API key."
    assert {"400", "401", "403", "404", "415", "default"} <= set(
        paths["/things/{thing}"]["put"]["responses"]
    )
    assert "415" not in paths["/things"]["get"]["responses"]  # no body, no content type

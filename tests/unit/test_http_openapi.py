"""The OpenAPI document and the application's router describe the same routes."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from httpapi.app import build_app
from httpapi.openapi import document
from tests.conftest import make_settings

METHODS = {"GET", "POST", "PATCH", "PUT", "DELETE"}


class _Unused:
    """A storage stand-in: routing never touches storage (the login gate
    only keys a weak reference on it)."""


def _routed(app: web.Application) -> set[tuple[str, str]]:
    pairs: set[tuple[str, str]] = set()
    for route in app.router.routes():
        if route.method not in METHODS or route.resource is None:
            continue  # HEAD is implied by GET
        path = route.resource.canonical
        if isinstance(route.resource, web.StaticResource):
            path = path.rstrip("/") + "/{path}"
        pairs.add((route.method, path))
    return pairs


def test_every_route_is_documented_and_every_documented_route_exists(tmp_path: Path) -> None:
    app = build_app(make_settings(tmp_path), storage=_Unused(), secret=b"k" * 32)  # type: ignore[arg-type]
    doc = document()
    documented = {
        (method.upper(), path) for path, ops in doc["paths"].items() for method in ops
    }
    routed = _routed(app)
    assert routed - documented == set(), "routes missing from the OpenAPI document"
    assert documented - routed == set(), "documented paths that are not routed"
    assert len(routed) >= 20


def test_document_references_resolve() -> None:
    doc = document()
    schemas = doc["components"]["schemas"]

    def walk(node: object) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    for path, ops in doc["paths"].items():
        params = {p["name"] for op in ops.values() for p in op.get("parameters", [])
                  if p["in"] == "path"}
        expected = {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}
        assert params == expected, path
        for op in ops.values():
            assert op["responses"], path


def test_the_read_state_has_one_name() -> None:
    doc = document()
    patch = doc["paths"]["/v1/messages/{message_id}"]["patch"]
    fields = patch["requestBody"]["content"]["application/json"]["schema"]["properties"]
    current = {name for name, schema in fields.items() if not schema.get("deprecated")}
    assert current == {"unread", "flagged", "folder_id"}
    summary = doc["components"]["schemas"]["MessageSummary"]["properties"]
    assert "unread" in summary and "read" not in summary
    list_params = doc["paths"]["/v1/folders/{folder_id}/messages"]["get"]["parameters"]
    assert "unread" in {p["name"] for p in list_params}

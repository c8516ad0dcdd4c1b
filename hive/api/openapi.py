"""``GET /openapi.json``: an OpenAPI 3.1 description of the API, generated from the models.

Each operation names its query model, body model and responses; the schemas come from pydantic
(``models_json_schema``), so the description cannot drift from what the handlers validate and
return. Error responses all share the ``ErrorBody`` schema. The operations themselves are
declared with the routes (:data:`hive.api.routes.ROUTES`), one per route.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from hive import __version__
from hive.models import (
    WORKER_KEY_PATTERN,
    Devices,
    ErrorBody,
    Health,
    Heartbeat,
    Node,
    SpawnRequest,
    Worker,
    WorkerList,
)

_ERRORS = {
    "400": "Malformed request (`invalid`)",
    "401": "Missing or wrong bearer token (`unauthorized`)",
    "403": "A worker's token used beyond its own heartbeat (`forbidden`)",
    "404": "No such worker (`not_found`)",
    "409": "Conflicts with the current state (`conflict`)",
    "413": "Body over 1 MiB (`too_large`)",
    "422": "A field fails validation; the message names it (`invalid`)",
    "429": "Too many failed log-ins or unknown tokens from this address lately; `Retry-After` "
    "says when to try again (`unauthorized`)",
    "503": "No device, core or port can take the worker (`no_capacity`)",
}


@dataclass(frozen=True)
class Operation:
    """How ``/openapi.json`` describes one route."""

    method: str
    path: str
    summary: str
    responses: dict[str, tuple[str, type[BaseModel] | str | None]]
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    errors: tuple[str, ...] = ()
    auth: bool = True
    headers: dict[str, str] = field(default_factory=dict)


def _parameters(op: Operation, schemas: dict[str, Any]) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = []
    if "{id}" in op.path:
        params.append(
            {
                "name": "id",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": WORKER_KEY_PATTERN},
            }
        )
    if op.query is not None:
        schema = op.query.model_json_schema(ref_template="#/components/schemas/{model}")
        required = set(schema.get("required", []))
        for name, prop in schema.get("properties", {}).items():
            prop = _without_null(prop)
            param: dict[str, Any] = {
                "name": name,
                "in": "query",
                "required": name in required,
                "schema": prop,
            }
            if prop.get("type") == "array":
                param["style"], param["explode"] = "form", True
            params.append(param)
    for name, description in op.headers.items():
        params.append(
            {
                "name": name,
                "in": "header",
                "required": False,
                "description": description,
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            }
        )
    return params


def _without_null(prop: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent or a value, never null: drop the ``null`` alternative."""
    options = [o for o in prop.get("anyOf", []) if o.get("type") != "null"]
    if len(options) != 1:
        return prop
    rest = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
    return {**options[0], **rest}


def _content(kind: type[BaseModel] | str | None) -> dict[str, Any]:
    if kind is None:
        return {}
    if isinstance(kind, str):
        schema: dict[str, Any] = {"type": "object"} if kind.endswith("json") else {"type": "string"}
        return {"content": {kind: {"schema": schema}}}
    return {"content": {"application/json": {"schema": _ref(kind)}}}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def build_openapi(
    operations: Sequence[Operation], backends: list[str] | None = None
) -> dict[str, Any]:
    """The whole description, as a JSON-ready dict.

    ``operations`` are the routes' (:func:`hive.api.routes.operations`), in the order to list
    them; ``backends`` are the configured backend names.
    """
    models: list[type[BaseModel]] = [ErrorBody, SpawnRequest, Heartbeat, Worker, WorkerList]
    models += [Node, Devices, Health]
    bodies = {SpawnRequest, Heartbeat}
    for op in operations:  # and whatever else a route takes or answers
        if op.body is not None:
            bodies.add(op.body)
        kinds = [op.body, *(kind for _, kind in op.responses.values())]
        models += [k for k in kinds if isinstance(k, type) and k not in models]
    _, defs = models_json_schema(
        [(m, "validation" if m in bodies else "serialization") for m in models],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = defs.get("$defs", {})
    if backends:
        backend = schemas["SpawnRequest"]["properties"]["backend"]
        backend["anyOf"] = [{"type": "string", "enum": sorted(backends)}, {"type": "null"}]
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        responses: dict[str, Any] = {
            status: {"description": description, **_content(kind)}
            for status, (description, kind) in op.responses.items()
        }
        errors = list(op.errors) + (["401", "403", "429"] if op.auth else [])
        for status in sorted(set(errors)):
            responses[status] = {"description": _ERRORS[status], **_content(ErrorBody)}
        operation: dict[str, Any] = {
            "summary": op.summary,
            "operationId": f"{op.method}_{op.path.strip('/').replace('/', '_') or 'root'}".replace(
                "{", ""
            )
            .replace("}", "")
            .replace(".", "_"),
            "parameters": _parameters(op, schemas),
            "responses": responses,
        }
        if op.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _ref(op.body)}},
            }
        if not op.auth:
            operation["security"] = []
        paths.setdefault(op.path, {})[op.method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hive",
            "version": __version__,
            "description": "The node agent's API: spawn, list, stop and follow model workers.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }

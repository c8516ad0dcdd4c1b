"""``GET /openapi.json``: an OpenAPI 3.1 description of the API, generated from the models.

Each operation names its query model, body model and responses; the schemas come from pydantic
(``models_json_schema``), so the description cannot drift from what the handlers validate and
return. Error responses all share the ``ErrorBody`` schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from hive import __version__
from hive.models import (
    Devices,
    ErrorBody,
    EventsQuery,
    Health,
    Heartbeat,
    ListQuery,
    LogsQuery,
    Node,
    SpawnQuery,
    SpawnRequest,
    StopQuery,
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
    "503": "No device, core or port can take the worker (`no_capacity`)",
}


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    responses: dict[str, tuple[str, type[BaseModel] | str | None]]
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    errors: tuple[str, ...] = ()
    auth: bool = True
    headers: dict[str, str] = field(default_factory=dict)


_WORKER_ERRORS = ("401", "403", "404")

OPERATIONS: list[Operation] = [
    Operation("get", "/health", "Liveness of hive itself", {"200": ("ok", Health)}, auth=False),
    Operation("get", "/v1/node", "The host: devices and worker counts", {"200": ("node", Node)}),
    Operation(
        "get", "/v1/devices", "CPU nodes and GPUs with live figures", {"200": ("ok", Devices)}
    ),
    Operation(
        "get",
        "/v1/workers",
        "List workers, filtered",
        {"200": ("the matching records", WorkerList)},
        query=ListQuery,
        errors=("422",),
    ),
    Operation(
        "post",
        "/v1/workers",
        "Spawn a worker",
        {
            "201": ("created; `Location` names it", Worker),
            "200": ("ready (with `wait=ready`)", Worker),
            "202": ("still starting when `timeout` ran out (with `wait=ready`)", Worker),
        },
        query=SpawnQuery,
        body=SpawnRequest,
        errors=("400", "409", "413", "422", "503"),
    ),
    Operation(
        "get",
        "/v1/workers/{id}",
        "One worker",
        {"200": ("the record", Worker)},
        errors=("404",),
    ),
    Operation(
        "post",
        "/v1/workers/{id}/stop",
        "Stop gracefully; the record stays, stopped",
        {"200": ("the record", Worker)},
        query=StopQuery,
        errors=("404", "422"),
    ),
    Operation(
        "post",
        "/v1/workers/{id}/restart",
        "Stop if running, then start again",
        {"200": ("the record, starting", Worker)},
        errors=("404", "409", "503"),
    ),
    Operation(
        "delete",
        "/v1/workers/{id}",
        "Stop if running, then forget the worker",
        {"200": ("the last record", Worker)},
        errors=("404",),
    ),
    Operation(
        "post",
        "/v1/workers/{id}/heartbeat",
        "A worker reports ready or busy (its own token suffices)",
        {"200": ("the record", Worker)},
        body=Heartbeat,
        errors=("400", "404", "409", "413", "422"),
    ),
    Operation(
        "get",
        "/v1/workers/{id}/logs",
        "The worker's output: the last lines, or followed",
        {"200": ("text", "text/plain")},
        query=LogsQuery,
        errors=("404", "422"),
    ),
    Operation(
        "get",
        "/v1/events",
        "Every worker change as Server-Sent Events (`Last-Event-ID` resumes)",
        {"200": ("`event: worker` messages with `id:` the sequence number", "text/event-stream")},
        query=EventsQuery,
        errors=("422",),
        headers={"Last-Event-ID": "Resume after this sequence number"},
    ),
    Operation(
        "get",
        "/metrics",
        "Prometheus metrics (no token when `metrics_public`)",
        {"200": ("text format 0.0.4", "text/plain")},
    ),
    Operation(
        "get",
        "/openapi.json",
        "This description",
        {"200": ("OpenAPI 3.1", "application/json")},
        auth=False,
    ),
]


def _parameters(op: Operation, schemas: dict[str, Any]) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = []
    if "{id}" in op.path:
        params.append(
            {
                "name": "id",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9._-]{0,62}$"},
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


def build_openapi(backends: list[str] | None = None) -> dict[str, Any]:
    """The whole description, as a JSON-ready dict; ``backends`` are the configured names."""
    models: list[type[BaseModel]] = [ErrorBody, SpawnRequest, Heartbeat, Worker, WorkerList]
    models += [Node, Devices, Health]
    _, defs = models_json_schema(
        [(m, "validation" if m in (SpawnRequest, Heartbeat) else "serialization") for m in models],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = defs.get("$defs", {})
    if backends:
        backend = schemas["SpawnRequest"]["properties"]["backend"]
        backend["anyOf"] = [{"type": "string", "enum": sorted(backends)}, {"type": "null"}]
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        responses: dict[str, Any] = {
            status: {"description": description, **_content(kind)}
            for status, (description, kind) in op.responses.items()
        }
        errors = list(op.errors) + (["401", "403"] if op.auth else [])
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

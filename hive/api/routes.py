"""The API's routes: each handler parses its input, calls the registry or supervisor, serializes.

Every route is declared once, with :func:`~hive.api.table.route`, together with the OpenAPI
operation that describes it; :data:`ROUTES` lists this module's routes for the app's table
(:func:`hive.api.app.route_table`), which is also what ``/openapi.json`` documents.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from hive.api import views
from hive.api.keys import CONTEXT, RECORD_JSON, ROUTE_TABLE
from hive.api.openapi import Operation, build_openapi
from hive.api.queries import (
    EventsQuery,
    ListQuery,
    LogsQuery,
    ReplaceQuery,
    SpawnQuery,
    StopQuery,
)
from hive.api.table import route
from hive.context import Context
from hive.desired.declared import APPLY_SOURCE, parse_workers
from hive.errors import Conflict, InvalidRequest, MalformedBody
from hive.models import (
    ApplyRequest,
    ApplyResult,
    Devices,
    Health,
    Heartbeat,
    Node,
    ReplaceRequest,
    SpawnRequest,
    State,
    Worker,
    WorkerList,
)
from hive.state.events import SSE_HEADERS, drop, limit_send_buffer
from hive.state.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

M = TypeVar("M", bound=BaseModel)


def _context(request: web.Request) -> Context:
    return request.app[CONTEXT]


def _reply(model: BaseModel, status: int = 200, **headers: str) -> web.Response:
    return web.json_response(text=model.model_dump_json(), status=status, headers=headers)


def _query(request: web.Request, model: type[M]) -> M:
    data: dict[str, Any] = {}
    for key in request.query:
        values = request.query.getall(key)
        data[key] = values if key in ("label",) else values[-1]
    return model.model_validate(data)


async def _json(request: web.Request, empty: dict[str, Any] | None = None) -> dict[str, Any]:
    """The body as a JSON object; ``empty`` stands for no body at all, where one may be left out."""
    raw = await request.read()
    if not raw and empty is not None:
        return empty
    try:
        data = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        raise MalformedBody("body: not valid JSON") from None
    except RecursionError:
        raise MalformedBody("body: nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequest("body: must be a JSON object")
    return data


async def _body(request: web.Request, model: type[M]) -> M:
    raw = await request.read()
    if raw[:1] == b"{":
        # The usual body, parsed and validated in one pass (pydantic-core); anything it refuses
        # goes the long way below, so that every error says what it said before.
        with contextlib.suppress(ValidationError):
            return model.model_validate_json(raw)
    return model.model_validate(await _json(request))


def _want_figures(request: web.Request) -> None:
    """This answer shows per-worker figures: keep them fresh while someone reads them."""
    usage = _context(request).usage
    if usage is not None:
        usage.wanted()


def _worker_id(request: web.Request) -> str:
    return request.match_info["id"]


@route(Operation("get", "/health", "Liveness of hive itself", {"200": ("ok", Health)}, auth=False))
async def health(request: web.Request) -> web.Response:
    return _reply(Health(version=_context(request).version))


@route(Operation("get", "/v1/node", "The host: devices and worker counts", {"200": ("node", Node)}))
async def node(request: web.Request) -> web.Response:
    return _reply(views.node_view(_context(request)))


@route(
    Operation(
        "get", "/v1/devices", "CPU nodes and GPUs with live figures", {"200": ("ok", Devices)}
    )
)
async def devices(request: web.Request) -> web.Response:
    return _reply(views.devices_view(_context(request)))


@route(
    Operation(
        "get",
        "/v1/workers",
        "List workers, filtered",
        {"200": ("the matching records", WorkerList)},
        query=ListQuery,
        errors=("422",),
    )
)
async def list_workers(request: web.Request) -> web.Response:
    query = _query(request, ListQuery)
    _want_figures(request)
    registry, record_json = _context(request).registry, request.app[RECORD_JSON]
    labels = query.labels()
    if query.state is None and query.model is None and query.device is None and not labels:
        body = record_json.everything(*registry.versioned())
    else:
        workers = registry.list(
            state=query.state, model=query.model, device=query.device, labels=labels
        )
        body = record_json.listing(workers, registry.ids())
    return web.Response(body=body, content_type="application/json")


@route(
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
    )
)
async def spawn(request: web.Request) -> web.Response:
    query = _query(request, SpawnQuery)
    spec = await _body(request, SpawnRequest)
    supervisor = _context(request).supervisor
    record = await supervisor.spawn(spec)
    location = f"/v1/workers/{record.id}"
    if query.wait is None:
        return _reply(record, 201, Location=location)
    record = await _context(request).registry.wait_until(
        record.id, lambda w: w.state != State.STARTING, query.timeout
    )
    if record.state in (State.READY, State.BUSY):
        return _reply(record, 200, Location=location)
    if record.state == State.STARTING:
        return _reply(record, 202, Location=location)
    raise Conflict(f"worker {record.id!r} {record.state}: {record.error}", worker=record)


@route(
    Operation(
        "get",
        "/v1/workers/{id}",
        "One worker",
        {"200": ("the record", Worker)},
        errors=("404",),
    )
)
async def get_worker(request: web.Request) -> web.Response:
    _want_figures(request)
    record = _context(request).registry.get(_worker_id(request))
    return web.Response(body=request.app[RECORD_JSON].one(record), content_type="application/json")


@route(
    Operation(
        "post",
        "/v1/workers/{id}/stop",
        "Stop gracefully; the record stays, stopped",
        {"200": ("the record", Worker)},
        query=StopQuery,
        errors=("404", "422"),
    )
)
async def stop_worker(request: web.Request) -> web.Response:
    query = _query(request, StopQuery)
    supervisor = _context(request).supervisor
    record = await supervisor.stop(_worker_id(request), timeout=query.timeout, wait=query.wait)
    return _reply(record)


@route(
    Operation(
        "post",
        "/v1/workers/{id}/restart",
        "Stop if running, then start again",
        {"200": ("the record, starting", Worker)},
        errors=("404", "409", "503"),
    )
)
async def restart_worker(request: web.Request) -> web.Response:
    return _reply(await _context(request).supervisor.restart(_worker_id(request)))


@route(
    Operation(
        "delete",
        "/v1/workers/{id}",
        "Stop if running, then forget the worker",
        {"200": ("the last record", Worker)},
        errors=("404",),
    )
)
async def delete_worker(request: web.Request) -> web.Response:
    return _reply(await _context(request).supervisor.delete(_worker_id(request)))


@route(
    Operation(
        "post",
        "/v1/workers/{id}/replace",
        "Replace the worker by a successor with these fields changed, without a gap: the "
        "successor starts beside it, and takes its id once ready and registered",
        {"200": ("the worker, now its successor", Worker)},
        query=ReplaceQuery,
        body=ReplaceRequest,
        errors=("400", "404", "409", "413", "422", "503"),
    )
)
async def replace_worker(request: web.Request) -> web.Response:
    query = _query(request, ReplaceQuery)
    changes = ReplaceRequest.model_validate(await _json(request, empty={}))
    context = _context(request)
    worker_id = _worker_id(request)
    spec = changes.applied_to(context.registry.entry(worker_id).spec)
    record = await context.reconciler.replace(worker_id, spec, query.in_place, query.timeout)
    return _reply(record)


@route(
    Operation(
        "post",
        "/v1/apply",
        "Make the workers match a declared set: create, replace, leave alone, prune",
        {"200": ("the plan, each item with its result (none for a dry run)", ApplyResult)},
        body=ApplyRequest,
        errors=("400", "413", "422"),
    )
)
async def apply(request: web.Request) -> web.Response:
    data = await _json(request)
    flags = ApplyRequest.model_validate({**data, "workers": []})
    declared = parse_workers(data.get("workers"), "workers", APPLY_SOURCE + flags.source)
    reconciler = _context(request).reconciler
    prune = (lambda _: True) if flags.prune else None
    # A prune that would empty the host or take other sources' workers needs force (422).
    guard = None if flags.force else APPLY_SOURCE + flags.source
    items = await reconciler.apply(declared, prune=prune, dry_run=flags.dry_run, guard=guard)
    return _reply(ApplyResult(items=items, dry_run=flags.dry_run))


@route(
    Operation(
        "post",
        "/v1/workers/{id}/heartbeat",
        "A worker reports ready or busy (its own token suffices)",
        {"200": ("the record", Worker)},
        body=Heartbeat,
        errors=("400", "404", "409", "413", "422"),
    )
)
async def heartbeat(request: web.Request) -> web.Response:
    beat = await _body(request, Heartbeat)
    return _reply(_context(request).supervisor.heartbeat(_worker_id(request), beat))


@route(
    Operation(
        "get",
        "/v1/workers/{id}/logs",
        "The worker's output: the last lines, or followed",
        {"200": ("text", "text/plain")},
        query=LogsQuery,
        errors=("404", "422"),
    )
)
async def logs(request: web.Request) -> web.StreamResponse:
    query = _query(request, LogsQuery)
    context = _context(request)
    worker_id = _worker_id(request)
    context.registry.get(worker_id)  # 404 for an unknown worker
    if not query.follow:
        return web.Response(text=await context.logs.read_tail(worker_id, query.tail))
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    response.enable_chunked_encoding()
    await response.prepare(request)

    def finished() -> bool:
        return context.supervisor.log_ended(worker_id)

    try:
        async for chunk in context.logs.follow(worker_id, query.tail, finished):
            await response.write(chunk)
        await response.write_eof()
    except ConnectionResetError:  # the follower went away (Ctrl-C on `hive logs -f`): done
        pass
    return response


@route(
    Operation(
        "get",
        "/v1/events",
        "Every worker change as Server-Sent Events (`Last-Event-ID` resumes)",
        {
            "200": (
                "`event: worker` messages with `id:` `<instance>-<seq>`; `event: reset`, then "
                "the current state, for an id of another hive instance or one no longer held",
                "text/event-stream",
            )
        },
        query=EventsQuery,
        errors=("422",),
        headers={"Last-Event-ID": "Resume after this event id (`<instance>-<seq>`)"},
    )
)
async def events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: each worker change as ``event: worker`` with its event id."""
    query = _query(request, EventsQuery)
    context = _context(request)
    last = request.headers.get("Last-Event-ID", query.last_event_id)
    last = EventsQuery.model_validate({"last_event_id": last}).last_event_id
    response = web.StreamResponse(headers=SSE_HEADERS)
    with context.events.subscribe() as subscription:
        await response.prepare(request)
        limit_send_buffer(request.transport)
        await subscription.stream(response.write, last, context.config.events_keepalive)
        # Cut off (too far behind) or shutting down: drop the connection at once rather than
        # wait on a socket the client does not drain. It may resume with Last-Event-ID.
        drop(request.transport)
    return response


@route(
    Operation(
        "get",
        "/metrics",
        "Prometheus metrics (no token when `metrics_public`)",
        {"200": ("text format 0.0.4", "text/plain")},
    )
)
async def metrics(request: web.Request) -> web.Response:
    _want_figures(request)
    body = _context(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


@route(
    Operation(
        "get",
        "/openapi.json",
        "This description",
        {"200": ("OpenAPI 3.1", "application/json")},
        auth=False,
    )
)
async def openapi(request: web.Request) -> web.Response:
    operations = [r.operation for r in request.app[ROUTE_TABLE]]
    return web.json_response(build_openapi(operations, list(_context(request).config.backends)))


#: This module's routes, in the order ``/openapi.json`` lists them.
ROUTES = (
    health,
    node,
    devices,
    list_workers,
    spawn,
    get_worker,
    stop_worker,
    restart_worker,
    delete_worker,
    replace_worker,
    apply,
    heartbeat,
    logs,
    events,
    metrics,
    openapi,
)

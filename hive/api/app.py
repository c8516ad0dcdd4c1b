"""Build the aiohttp application that serves hive's API over TCP and the unix socket."""

from __future__ import annotations

from aiohttp import web

from hive.api import page, routes
from hive.api.keys import CONTEXT, LIMITER, RECORD_JSON, ROUTE_TABLE, SESSIONS
from hive.api.middleware import (
    auth_middleware,
    error_middleware,
    guard_middleware,
    metrics_middleware,
)
from hive.api.openapi import Operation
from hive.api.record_json import RecordJson
from hive.api.session import Sessions
from hive.api.table import Route
from hive.api.throttle import PeerLimiter
from hive.context import Context

#: Request bodies larger than this are refused with 413 ``too_large``.
MAX_BODY = 1024 * 1024


def route_table() -> tuple[Route, ...]:
    """Every route hive serves, in the order ``/openapi.json`` lists them."""
    return (*routes.ROUTES, *page.ROUTES)


def operations() -> list[Operation]:
    """The operation of every route, for the OpenAPI document."""
    return [r.operation for r in route_table()]


def create_app(context: Context) -> web.Application:
    app = web.Application(
        middlewares=[guard_middleware, metrics_middleware, error_middleware, auth_middleware],
        client_max_size=MAX_BODY,
    )
    app[CONTEXT] = context
    app[RECORD_JSON] = RecordJson()
    app[SESSIONS] = Sessions()
    app[LIMITER] = PeerLimiter(
        on_failure=lambda kind: context.metrics.auth_failures.labels(kind).inc(),
        on_refused=lambda: context.metrics.auth_refused.inc(),
    )
    table = route_table()
    app[ROUTE_TABLE] = table
    # aiohttp tries the routes under one prefix in the order they were added: the heartbeat,
    # by far the most frequent request, goes first.
    hot_first = sorted(table, key=lambda r: not r.operation.path.endswith("/heartbeat"))
    app.add_routes([r.definition() for r in hot_first])
    return app

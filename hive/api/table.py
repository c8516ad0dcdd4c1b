"""A route of the API: the OpenAPI operation that describes it and the handler that serves it.

``@route(Operation(...))`` makes a handler a :class:`Route`; nothing is registered by importing
a module. The app's table is built explicitly from each module's ``ROUTES``
(:func:`hive.api.app.route_table`), and ``/openapi.json`` documents that same table, so neither
can have a route the other lacks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from hive.api.openapi import Operation

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    """One route of the API: the operation that describes it and the handler that serves it."""

    operation: Operation
    handler: Handler

    def definition(self) -> web.RouteDef:
        """For ``app.add_routes``; a GET also answers HEAD, as aiohttp's ``add_get`` does."""
        return web.route(self.operation.method.upper(), self.operation.path, self.handler)


def route(operation: Operation) -> Callable[[Handler], Route]:
    """The decorated handler, served at ``operation``'s method and path and documented by it."""

    def make(handler: Handler) -> Route:
        return Route(operation, handler)

    return make

"""Every error in one JSON shape, and bearer-token authentication for TCP clients.

Over the unix socket a client is trusted by the socket's file mode (0600), except a process that
belongs to a worker (found by its peer credentials: the worker processes hive started and their
descendants, then the worker's cgroup or tag): it may send only its own worker's heartbeat. Over
TCP every ``/v1`` route needs ``Authorization: Bearer <token>``: the API token, a status page
session (reading only), or a worker's own token (its own heartbeat only). Cookies grant nothing:
a browser sends them to every port of the host, workers' included. Tokens are compared in
constant time; failures are limited per peer (:mod:`hive.api.throttle`), and a limited peer's
API token is not looked at, unless its connection already carried it.
"""

from __future__ import annotations

import hmac
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from hive.api.errors import HTTP_CODES, wire
from hive.api.keys import CONTEXT, LIMITER, SESSIONS
from hive.errors import HiveError, InvalidRequest, NoMemory, NotAuthenticated, NotPermitted
from hive.models import ErrorBody, ErrorCode, ErrorDetail, Worker
from hive.validation import field_errors
from hive.workers.peers import ORPHAN, worker_of_socket

log = logging.getLogger("hive.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HEARTBEAT = re.compile(r"^/v1/workers/([^/]+)/heartbeat$")


def error_response(
    status: int,
    code: ErrorCode,
    message: str,
    worker: Worker | None = None,
    fields: list[dict[str, str]] | None = None,
    memory: dict[str, Any] | None = None,
) -> web.Response:
    detail = ErrorDetail(code=code, message=message, worker=worker, fields=fields, memory=memory)
    body = ErrorBody(error=detail)
    # Leave out ``worker``, ``fields`` and ``memory`` when absent, but keep a record's null
    # fields: a worker in an error has every field of §4, as everywhere else.
    absent = ("worker", "fields", "memory")
    unset = {name for name in absent if getattr(body.error, name) is None}
    text = body.model_dump_json(exclude={"error": unset})
    return web.json_response(text=text, status=status)


def answer(error: HiveError, fields: list[dict[str, str]] | None = None) -> web.Response:
    """The error as the API answers it: the status and code its cause has (see
    :mod:`hive.api.errors`), its message, and its worker when it has one."""
    status, code = wire(type(error))
    memory = error.figures if isinstance(error, NoMemory) else None
    return error_response(status, code, error.message, error.worker, fields, memory)


def validation_message(exc: ValidationError) -> tuple[str, list[dict[str, str]]]:
    """One line naming each bad field, and the same as a list (one entry per field)."""
    fields: dict[str, str] = {}
    for name, message in field_errors(exc, top="body"):
        fields.setdefault(name, message)
    listed = [{"field": name, "message": message} for name, message in fields.items()]
    return "; ".join(f"{name}: {message}" for name, message in fields.items()), listed


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except HiveError as exc:
        response = answer(exc)
        if response.status == 500:  # hive's own failure, not the request's: the log says why
            log.error("%s %s: %s", request.method, request.path, exc.message)
        return response
    except ValidationError as exc:
        message, fields = validation_message(exc)
        return answer(InvalidRequest(message), fields)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.reason if exc.status != 413 else "request body is over 1 MiB"
        code = HTTP_CODES.get(exc.status, "invalid")
        response = error_response(exc.status, code, message)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return answer(HiveError("internal error; see hive's log"))


def _unix_socket(request: web.Request) -> socket.socket | None:
    """The connection's socket when it came over the unix socket; None over TCP."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock if sock is not None and sock.family == socket.AF_UNIX else None


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _open(request: web.Request) -> bool:
    """Routes anyone may read: /health, /openapi.json, and /metrics if ``metrics_public``."""
    if request.path == "/metrics":
        return request.app[CONTEXT].config.metrics_public
    return not request.path.startswith("/v1")  # and the page: it reads the API like anyone


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """While a request is served, its connection has no deadline; after it, the next must
    come in time (see :mod:`hive.api.guard`)."""
    guard = request.app[CONTEXT].guard
    if guard is None:
        return await handler(request)
    guard.begin(request.transport)
    try:
        return await handler(request)
    finally:
        guard.end(request.transport)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Time every request by its route's pattern (not its path: worker ids stay out of labels)."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        route = request.match_info.route.resource
        pattern = route.canonical if route is not None else "unmatched"
        request.app[CONTEXT].metrics.http_requests.labels(
            request.method, pattern, str(status)
        ).observe(time.perf_counter() - started)


def too_many(seconds: int) -> web.Response:
    """429 for a peer that failed too often: its credentials are not even looked at."""
    response = error_response(
        429,
        "unauthorized",
        f"too many failed log-ins or unknown tokens from this address; try again in {seconds} s",
    )
    response.headers["Retry-After"] = str(seconds)
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if _open(request):
        return await handler(request)
    context = request.app[CONTEXT]
    sock = _unix_socket(request)
    if sock is not None:
        # The socket's mode admits hive's own user, and workers may run as that user (or as
        # root): a process of a worker (one hive started, or its descendant; its cgroup; its
        # tag) gets its own heartbeat only, and one hive cannot tell (see hive.workers.peers)
        # gets nothing.
        owner = worker_of_socket(sock, context.registry, context.supervisor.containment)
        if owner is None:
            return await handler(request)
        match = _HEARTBEAT.match(request.path)
        if match is not None and match.group(1) == owner and request.method == "POST":
            return await handler(request)
        if owner == ORPHAN:
            raise NotPermitted(
                "a process whose worker hive cannot tell (an orphan of a worker, or one whose "
                "connection was made by a process since gone) may not use the unix socket"
            )
        raise NotPermitted(
            f"a process of worker {owner!r} may only send that worker's own heartbeat"
        )
    token = _bearer(request)
    if token is None:  # cookies alone grant nothing
        raise NotAuthenticated("missing bearer token (Authorization: Bearer <token>)")
    registry = context.registry
    heartbeat = _HEARTBEAT.match(request.path)
    own = registry.token(heartbeat.group(1)) if heartbeat is not None else None
    if own is not None and hmac.compare_digest(token.encode(), own.encode()):
        return await _trusted(request, handler)  # a worker's heartbeat is never held back
    # A page's session is 256 random bits, looked up by its hash: no one guesses it, so the
    # throttle, which is there to slow guesses of the API token, does not hold it back.
    if request.app[SESSIONS].valid(token):
        if request.method in ("GET", "HEAD"):
            return await _trusted(request, handler)
        raise NotPermitted("a status page session can read but not change anything")
    api = context.token.encode()
    guard = context.guard
    if guard is not None and guard.proven(request.transport):
        # This connection carried the API token before: its client knows it, and this is no
        # guess. A wrong credential on it (a proxy that shares connections between clients)
        # ends that, and is throttled and counted as anywhere else.
        if hmac.compare_digest(token.encode(), api):
            return await handler(request)
        guard.prove(request.transport, False)
    limiter = request.app[LIMITER]
    if wait := limiter.retry_after(request.remote):
        # Not even looked at: answering a right token here would answer a guess.
        return too_many(wait)
    if hmac.compare_digest(token.encode(), api):
        if guard is not None:
            guard.prove(request.transport)
        return await _trusted(request, handler)
    for record in registry.list():
        other = registry.token(record.id)
        if other is not None and hmac.compare_digest(token.encode(), other.encode()):
            raise NotPermitted("a worker token is good only for that worker's own heartbeat")
    limiter.failed(request.remote, "token")
    raise NotAuthenticated("invalid token")


async def _trusted(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Serve an authenticated request; its connection is no longer one the guard sheds first."""
    guard = request.app[CONTEXT].guard
    if guard is not None:
        guard.trust(request.transport)
    return await handler(request)

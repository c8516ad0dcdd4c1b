"""Every error in one JSON shape, and bearer-token authentication for TCP clients.

Over the unix socket a client is trusted by the socket's file mode (0600), except a process that
belongs to a worker (found by its peer credentials, then its cgroup or tag): it may send only
its own worker's heartbeat. Over TCP every
``/v1`` route needs ``Authorization: Bearer <token>``; a worker's own token is good only for its
own heartbeat. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import logging
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from pydantic import ValidationError

from hive.api.errors import HTTP_CODES, wire
from hive.api.keys import CONTEXT
from hive.api.session import SESSION_COOKIE, session_value
from hive.errors import HiveError, InvalidRequest, NotAuthenticated, NotPermitted
from hive.models import ErrorBody, ErrorCode, ErrorDetail, Worker
from hive.validation import field_errors

log = logging.getLogger("hive.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_HEARTBEAT = re.compile(r"^/v1/workers/([^/]+)/heartbeat$")


def error_response(
    status: int,
    code: ErrorCode,
    message: str,
    worker: Worker | None = None,
    fields: list[dict[str, str]] | None = None,
) -> web.Response:
    body = ErrorBody(error=ErrorDetail(code=code, message=message, worker=worker, fields=fields))
    # Leave out ``worker`` and ``fields`` when absent, but keep a record's null fields: a worker
    # in an error has every field of §4, as everywhere else.
    unset = {name for name in ("worker", "fields") if getattr(body.error, name) is None}
    text = body.model_dump_json(exclude={"error": unset})
    return web.json_response(text=text, status=status)


def answer(error: HiveError, fields: list[dict[str, str]] | None = None) -> web.Response:
    """The error as the API answers it: the status and code its cause has (see
    :mod:`hive.api.errors`), its message, and its worker when it has one."""
    status, code = wire(type(error))
    return error_response(status, code, error.message, error.worker, fields)


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


def _unix_peer(request: web.Request) -> int | None:
    """The pid of the process at the other end of a unix-socket connection (``SO_PEERCRED``);
    None over TCP. 0 when the kernel does not say."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return 0
    return int(_PEERCRED.unpack(creds)[0])


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _session(request: web.Request, token: str) -> bool:
    """The request carries the status page's session cookie for this token."""
    cookie = request.cookies.get(SESSION_COOKIE)
    return cookie is not None and hmac.compare_digest(
        cookie.encode(), session_value(token).encode()
    )


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


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if _open(request):
        return await handler(request)
    context = request.app[CONTEXT]
    peer = _unix_peer(request)
    if peer is not None:
        # The socket's mode admits hive's own user, and workers run as that user too: a
        # process that belongs to a worker (its cgroup, or its tag) gets its own heartbeat only.
        owner = context.supervisor.containment.owner_of(peer) if peer else None
        if owner is None:
            return await handler(request)
        match = _HEARTBEAT.match(request.path)
        if match is not None and match.group(1) == owner and request.method == "POST":
            return await handler(request)
        raise NotPermitted(
            f"a process of worker {owner!r} may only send that worker's own heartbeat"
        )
    token = _bearer(request)
    if token is None:
        if request.method in ("GET", "HEAD") and _session(request, context.token):
            return await handler(request)  # the status page's cookie: reading only
        raise NotAuthenticated("missing bearer token (Authorization: Bearer <token>)")
    if hmac.compare_digest(token.encode(), context.token.encode()):
        return await handler(request)
    registry = context.registry
    if (match := _HEARTBEAT.match(request.path)) is not None:
        own = registry.token(match.group(1))
        if own is not None and hmac.compare_digest(token.encode(), own.encode()):
            return await handler(request)
    for record in registry.list():
        other = registry.token(record.id)
        if other is not None and hmac.compare_digest(token.encode(), other.encode()):
            raise NotPermitted("a worker token is good only for that worker's own heartbeat")
    raise NotAuthenticated("invalid token")

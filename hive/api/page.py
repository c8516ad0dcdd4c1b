"""The status page (``GET /``) and its log-in: the API token, sent once, becomes a session.

The page itself holds no data: it reads the API, and the API's rules apply. ``POST /login``
takes the token from a form (never the URL) and answers a new session's value in JSON; the page
keeps it in ``sessionStorage`` and sends it as ``Authorization: Bearer <session>`` on each of its
requests, the event stream included (read with ``fetch``). No cookie carries it: a browser sends
a host's cookies to every port of the host, so a worker's server would get them. A session can
read but never change anything, ends at ``POST /logout``, and expires (:mod:`hive.api.session`).
Failed log-ins are limited per peer like unknown tokens (:mod:`hive.api.throttle`).
"""

from __future__ import annotations

import hmac
import socket
from importlib import resources

from aiohttp import web

from hive.api.keys import CONTEXT, LIMITER, SESSIONS
from hive.api.middleware import error_response, too_many
from hive.api.openapi import Operation
from hive.api.session import SESSION_COOKIE
from hive.api.table import route


def _page() -> bytes:
    return resources.files("hive.api").joinpath("page/index.html").read_bytes()


_PAGE = _page()
_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Cache-Control": "no-store",
    # Only this host's own script, style and API: nothing from outside.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
        "base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}


@route(
    Operation(
        "get",
        "/",
        "The status page: devices and workers, live (log in with the API token)",
        {"200": ("HTML", "text/html")},
        auth=False,
    )
)
async def page(request: web.Request) -> web.Response:
    return web.Response(body=_PAGE, headers=_HEADERS)


@route(
    Operation(
        "post",
        "/login",
        "The page's log-in: a form field `token` (the API token) becomes a session, "
        "sent back as `Authorization: Bearer <session>` (reading only)",
        {"200": ('`{"session": str, "expires_in": seconds}`', "application/json")},
        errors=("401", "429"),
        auth=False,
    )
)
async def login(request: web.Request) -> web.Response:
    limiter = request.app[LIMITER]
    if wait := limiter.retry_after(request.remote if _over_tcp(request) else None):
        return too_many(wait)
    try:
        form = await request.post()
    except (ValueError, AssertionError):  # a malformed form (multipart, encoding): no log-in
        form = None
    token = form.get("token") if form is not None else None
    expected = request.app[CONTEXT].token
    if not isinstance(token, str) or not hmac.compare_digest(
        token.strip().encode("utf-8", "surrogateescape"), expected.encode()
    ):
        limiter.failed(request.remote if _over_tcp(request) else None, "login")
        return _no_store(error_response(401, "unauthorized", "that is not this hive's API token"))
    sessions = request.app[SESSIONS]
    response = _no_store(
        web.json_response({"session": sessions.create(), "expires_in": int(sessions.lifetime)})
    )
    # The cookie an earlier hive set grants nothing now; the browser may drop it.
    response.del_cookie(
        SESSION_COOKIE, path="/", secure=request.secure, httponly=True, samesite="Strict"
    )
    return response


@route(
    Operation(
        "post",
        "/logout",
        "End the page's session (`Authorization: Bearer <session>`): its value is dead at once",
        {"204": ("the session, if any, ended", None)},
        auth=False,
    )
)
async def logout(request: web.Request) -> web.Response:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        request.app[SESSIONS].revoke(value.strip())
    return web.Response(status=204, headers={"Cache-Control": "no-store"})


def _over_tcp(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock is None or sock.family != socket.AF_UNIX


def _no_store(response: web.Response) -> web.Response:
    response.headers["Cache-Control"] = "no-store"
    return response


#: The page's routes, after the API's in ``/openapi.json``.
ROUTES = (page, login, logout)

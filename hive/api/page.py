"""The status page (``GET /``) and its log-in: the API token, sent once in a form, becomes a
session cookie.

The page itself holds no data: it reads the API, and the API's rules apply. A browser cannot set
an ``Authorization`` header on a page load or on an event stream, so ``POST /login`` takes the
token from a form (never the URL) and answers with an ``HttpOnly``, ``SameSite=Strict`` cookie
whose value is derived from the token (:func:`session_value`); the auth middleware takes that
cookie for ``GET`` and ``HEAD`` only, so a cookie can read but never change anything.
"""

from __future__ import annotations

import hmac
from importlib import resources

from aiohttp import web

from hive.api.keys import CONTEXT
from hive.api.openapi import Operation
from hive.api.session import SESSION_COOKIE, session_value
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
        "The page's log-in: a form field `token` (the API token) becomes a session cookie",
        {"303": ("to `/` with the cookie set, or to `/#login-failed`", None)},
        auth=False,
    )
)
async def login(request: web.Request) -> web.Response:
    try:
        form = await request.post()
    except (ValueError, AssertionError):  # a malformed form (multipart, encoding): no log-in
        return _see_other("/#login-failed")
    token = form.get("token")
    expected = request.app[CONTEXT].token
    if isinstance(token, str) and hmac.compare_digest(token.strip().encode(), expected.encode()):
        response = _see_other("/")
        response.set_cookie(
            SESSION_COOKIE, session_value(expected), httponly=True, samesite="Strict", path="/"
        )
        return response
    return _see_other("/#login-failed")


@route(
    Operation(
        "post",
        "/logout",
        "End the page's session",
        {"303": ("to `/`, the cookie cleared", None)},
        auth=False,
    )
)
async def logout(request: web.Request) -> web.Response:
    response = _see_other("/")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


#: The page's routes, after the API's in ``/openapi.json``.
ROUTES = (page, login, logout)

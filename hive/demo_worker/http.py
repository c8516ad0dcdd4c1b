"""The HTTP plumbing both route families share: bodies in, errors and event streams out.

A route raises ``BadRequest`` for anything wrong with what the client sent; the ``errors_as_json``
middleware turns it, and every other error, into ``{"error": {"message", "type", "code"}}`` so that
a client never sees a traceback. ``sse`` answers a stream as Server-Sent Events, the way SGLang
and OpenAI servers both do.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from hive.demo_worker.model import DEFAULT_MAX_TOKENS, MAX_TOTAL_TOKENS
from hive.demo_worker.output import warn

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    """A request the worker cannot answer: a 400 with this message."""


# -- requests -------------------------------------------------------------------------------------


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("body: not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("body: must be a JSON object")
    return body


def token_limit(value: Any, name: str) -> int:
    if value is None:
        return DEFAULT_MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"{name}: must be a non-negative integer")
    return min(value, MAX_TOTAL_TOKENS)


def prompt_list(value: Any, name: str) -> tuple[list[str], bool]:
    """A prompt field that holds one text or a list of them: the texts, and whether a list."""
    if isinstance(value, str):
        return [value], False
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value, True
    raise BadRequest(f"{name}: must be a string or a non-empty list of strings")


def streaming(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream: must be true or false")
    return stream


# -- responses ------------------------------------------------------------------------------------


def error_response(status: int, message: str) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response(
        {"error": {"message": message, "type": kind, "code": status}}, status=status
    )


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as ``{"error": {"message", "type", "code"}}``: never a traceback."""
    try:
        return await handler(request)
    except BadRequest as exc:
        return error_response(400, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        warn(f"demo worker: {request.method} {request.path} failed: {exc!r}")
        return error_response(500, "internal error")


async def sse(request: web.Request, events: AsyncIterator[dict[str, Any]]) -> web.StreamResponse:
    """Answer with Server-Sent Events: one ``data:`` line per event, then ``data: [DONE]``."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    try:
        async for event in events:
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away: nothing left to tell it
    return response

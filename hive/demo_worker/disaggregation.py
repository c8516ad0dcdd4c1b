"""Prefill/decode disaggregation, as far as a router can see it.

In PD mode sglang-router sends the same generation request to one prefill and one decode
worker at once, with ``bootstrap_host``, ``bootstrap_port`` and ``bootstrap_room`` added to the
body, and answers the client with the decode worker's response. A real prefill server also
listens on its bootstrap port, where decode servers fetch the KV cache. The demo worker does
what a router can observe: a prefill worker listens on its bootstrap port, and each role says
in its output which bootstrap room it served (``demo worker: prefill served bootstrap_room N``),
so a test can see that one request went through both.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from hive.demo_worker.output import say

GENERATION_PATHS = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def middleware(role: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Say which bootstrap room each generation request of a PD pair belongs to."""

    @web.middleware
    async def note_room(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST" and request.path in GENERATION_PATHS:
            try:
                body = json.loads(await request.read() or b"null")
            except ValueError:
                body = None
            if isinstance(body, dict) and "bootstrap_room" in body:
                say(
                    f"demo worker: {role} served bootstrap_room {body['bootstrap_room']} "
                    f"(bootstrap {body.get('bootstrap_host')}:{body.get('bootstrap_port')})"
                )
        return await handler(request)

    return note_room


async def listen_for_bootstrap(host: str, port: int) -> asyncio.Server:
    """A prefill worker's bootstrap port: accepted and closed (the demo has no KV cache)."""

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    return await asyncio.start_server(accept, host, port)

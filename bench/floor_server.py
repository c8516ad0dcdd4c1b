"""The floor for the API figure: a bare aiohttp app answering the same bytes hive answers.

``python bench/floor_server.py --port P --bodies FILE`` where FILE is JSON
``{"list": "...", "one": "...", "heartbeat": "..."}`` (hive's real response bodies). The
heartbeat route reads and parses its JSON body, as any handler must; nothing else is done.
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bodies", required=True)
    args = parser.parse_args()
    with open(args.bodies) as file:
        bodies = {k: v.encode() for k, v in json.load(file).items()}

    async def list_workers(request: web.Request) -> web.Response:
        return web.Response(body=bodies["list"], content_type="application/json")

    async def one(request: web.Request) -> web.Response:
        return web.Response(body=bodies["one"], content_type="application/json")

    async def heartbeat(request: web.Request) -> web.Response:
        json.loads(await request.read())
        return web.Response(body=bodies["heartbeat"], content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/workers", list_workers)
    app.router.add_get("/v1/workers/{id}", one)
    app.router.add_post("/v1/workers/{id}/heartbeat", heartbeat)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()

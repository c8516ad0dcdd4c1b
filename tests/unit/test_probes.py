"""The prober against a small aiohttp app in this process: what each probe result says, and when a
busy worker's failing probes count. The worker lifecycle with real processes is in
tests/daemon/test_lifecycle.py.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from harness.net import free_port
from hive.config import BackendConfig
from hive.workers.probes import Prober


async def test_probe_results_say_what_came_back() -> None:
    async def health(request: web.Request) -> web.Response:
        return web.Response(status=int(request.query.get("status", "200")))

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    prober = Prober()
    await prober.start()
    try:
        base = f"http://127.0.0.1:{port}/health"
        assert (await prober.check(base)).ok
        bad = await prober.check(base + "?status=503")
        assert (bad.ok, bad.detail) == (False, "HTTP 503")
        refused = await prober.check(f"http://127.0.0.1:{free_port()}/health")
        assert not refused.ok and "onnect" in refused.detail
        backend = BackendConfig(
            command=["x"], health_path="/health", liveness_period=0.05, liveness_failures=3
        )
        # Busy forgives a probe that timed out, not one that answered 500.
        why = await asyncio.wait_for(
            prober.until_unhealthy(base + "?status=500", backend, lambda _: False, lambda: True), 10
        )
        assert why == "unhealthy: /health failed 3 times in a row (last: HTTP 500)"
    finally:
        await prober.close()
        await runner.cleanup()

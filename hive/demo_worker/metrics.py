"""``GET /metrics``: the demo worker's figures in Prometheus' text format, named as vLLM names
its own (``demo:`` for ``vllm:``), so hive can read its load and progress from a Prometheus
page: requests running and waiting, tokens generated, and engine steps (one per piece it
streams, one per answer it gives whole). With ``--stall-after`` the last two stop moving while
requests stay in flight and ``/health`` answers, as a stuck engine's do."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from hive.demo_worker.server import DemoWorker

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def metrics_route(worker: DemoWorker) -> web.RouteDef:
    async def metrics(request: web.Request) -> web.Response:
        lines = [
            "# TYPE demo:num_requests_running gauge",
            f"demo:num_requests_running {worker.in_flight}",
            "# TYPE demo:num_requests_waiting gauge",
            "demo:num_requests_waiting 0",
            "# TYPE demo:generation_tokens_total counter",
            f"demo:generation_tokens_total {worker.tokens_generated}",
            "# TYPE demo:steps_total counter",
            f"demo:steps_total {worker.steps}",
        ]
        body = "\n".join(lines) + "\n"
        return web.Response(body=body.encode(), headers={"Content-Type": CONTENT_TYPE})

    return web.get("/metrics", metrics)

"""An engine whose ``/metrics`` does not answer while it is busy, for a while, as vLLM's API
server may not under load: ``busy_metrics_worker.py --port P --model M [--latency S]
[--failing-reads N] [--fail-by hang|error]``.

- ``/health``: 200 at once; ``/v1/models``: the model.
- ``POST /v1/completions``: answers 200 after ``--latency`` seconds (a request in flight).
- ``/metrics``: vLLM's ``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` in
  Prometheus' text format. While a request is in flight, the first ``--failing-reads`` reads
  fail: ``hang`` answers only after 30 s (past hive's 2 s timeout), ``error`` answers 503.
  Once a request is done, the next one that starts fails as many reads again.
- ``/state``: what it has seen, for the test to ask directly (never through hive):
  ``{"in_flight", "metrics_reads", "failed_reads", "completed"}``.

It never heartbeats, and it has no SIGTERM handler: SIGTERM ends it at once, cutting off any
request in flight, as an engine that aborts its requests when stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiohttp import web


class Engine:
    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.in_flight = 0
        self.metrics_reads = 0
        self.failed_reads = 0
        self.completed = 0
        #: Reads still to fail while the current requests run.
        self.to_fail = 0

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.options.model}]})

    async def complete(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.in_flight == 0:
            self.to_fail = self.options.failing_reads
        self.in_flight += 1
        try:
            await asyncio.sleep(self.options.latency)
        finally:
            self.in_flight -= 1
        self.completed += 1
        return web.json_response(
            {
                "id": f"cmpl-{self.completed}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.options.model,
                "choices": [
                    {"index": 0, "text": f"{body.get('prompt', '')} done", "finish_reason": "stop"}
                ],
            }
        )

    async def metrics(self, request: web.Request) -> web.Response:
        self.metrics_reads += 1
        if self.in_flight and self.to_fail > 0:
            self.to_fail -= 1
            self.failed_reads += 1
            if self.options.fail_by == "hang":
                await asyncio.sleep(30)
            else:
                return web.Response(status=503, text="busy\n")
        text = (
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="{self.options.model}"}} {self.in_flight}\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="{self.options.model}"}} 0\n'
        )
        return web.Response(text=text, content_type="text/plain")

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "in_flight": self.in_flight,
                "metrics_reads": self.metrics_reads,
                "failed_reads": self.failed_reads,
                "completed": self.completed,
            }
        )


async def serve(options: argparse.Namespace) -> None:
    engine = Engine(options)
    app = web.Application()
    app.add_routes(
        [
            web.get("/health", engine.health),
            web.get("/v1/models", engine.models),
            web.post("/v1/completions", engine.complete),
            web.get("/metrics", engine.metrics),
            web.get("/state", engine.state),
        ]
    )
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", options.port).start()
    print(f"listening on {options.port}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--latency", type=float, default=10.0)
    parser.add_argument("--failing-reads", type=int, default=2)
    parser.add_argument("--fail-by", choices=["hang", "error"], default="hang")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()

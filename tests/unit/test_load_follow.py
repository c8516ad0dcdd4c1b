"""How often hive reads an engine's load (:meth:`WorkerProbes.follow_load`), against a small
Prometheus page served by an aiohttp app in this process.

The waits between reads are what is checked, not the time they take: the sleep that
follow_load takes between reads (``sleep_to_tick``) is replaced by a clock that records each
wait and returns at once, as tests/unit/test_router_sync.py replaces router sync's clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

import hive.workers.probes as probes_module
from harness.net import free_port
from hive.config import BackendConfig, LoadConfig
from hive.workers.engine_load import Load
from hive.workers.probes import Prober, WorkerProbes

PERIOD, LIVENESS = 1.0, 8.0
#: The slowest wait, an idle engine's: a liveness period less the half-second tick that the
#: sleep may add, so that a request on an idle engine is seen within a liveness period.
IDLE = LIVENESS - 0.5
BACKEND = BackendConfig(
    command=["x"],
    liveness_period=LIVENESS,
    load=LoadConfig(
        path="/metrics",
        format="prometheus",
        running=["vllm:num_requests_running"],
        waiting=["vllm:num_requests_waiting"],
        period=PERIOD,
    ),
)


def page(running: int) -> str:
    return (
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{engine="0",model_name="m"}} {running}.0\n'
        f'vllm:num_requests_waiting{{engine="0",model_name="m"}} 0.0\n'
    )


class Engine:
    """Answers each read from a script: a number of running requests, or ``None`` for a 500."""

    def __init__(self, script: list[int | None]) -> None:
        self.script = script
        self.reads = 0

    async def metrics(self, request: web.Request) -> web.Response:
        answer = self.script[min(self.reads, len(self.script) - 1)]
        self.reads += 1
        if answer is None:
            return web.Response(status=500, text="Internal Server Error")
        return web.Response(text=page(answer))


@pytest.fixture
async def served() -> AsyncIterator[tuple[Engine, int]]:
    engine = Engine([])
    app = web.Application()
    app.router.add_get("/metrics", engine.metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield engine, port
    finally:
        await runner.cleanup()


async def follow(
    engine: Engine, port: int, script: list[int | None], monkeypatch: pytest.MonkeyPatch
) -> tuple[list[float], list[Load]]:
    """Follow the engine through ``script``, one read each: the wait after each read, and the
    loads reported."""
    engine.script = script
    waits: list[float] = []
    reports: list[Load] = []

    done = asyncio.Event()

    async def recorded(delay: float, tick: float = 0.5) -> None:
        waits.append(delay)
        if len(waits) == len(script):
            done.set()
            await asyncio.Event().wait()  # the script is over: no more reads
        await asyncio.sleep(0)

    monkeypatch.setattr(probes_module, "sleep_to_tick", recorded)
    prober = Prober()
    await prober.start()
    probes = WorkerProbes(prober, lambda: port, lambda: None)
    task = asyncio.create_task(probes.follow_load(BACKEND, lambda: False, reports.append))
    try:
        await asyncio.wait_for(done.wait(), 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await prober.close()
    assert engine.reads == len(script)
    return waits, reports


async def test_an_idle_engine_is_read_less_and_less_often_a_busy_one_often(
    served: tuple[Engine, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, port = served
    waits, reports = await follow(engine, port, [0, 0, 0, 0, 0, 2, 2, 0], monkeypatch)
    assert waits == [PERIOD, 2 * PERIOD, 4 * PERIOD, IDLE, IDLE, PERIOD, PERIOD, PERIOD]
    assert [load.running for load in reports] == [0, 0, 0, 0, 0, 2, 2, 0]


async def test_a_read_that_failed_is_tried_again_soon(
    served: tuple[Engine, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine too busy to answer in time was left at the idle wait (issue 27: vLLM busy
    for 4 to 31 s before hive said so): the next read comes after the fastest period."""
    engine, port = served
    waits, reports = await follow(engine, port, [0, 0, 0, 0, None, None, 4, 4], monkeypatch)
    assert waits == [PERIOD, 2 * PERIOD, 4 * PERIOD, IDLE, PERIOD, PERIOD, PERIOD, PERIOD]
    assert [load.running for load in reports] == [0, 0, 0, 0, 4, 4]

"""A drained stop keeps reading the engine's load until a read answers: a read that fails (no
answer within 2 s, or an error) says nothing about the requests in flight, so it is neither
"idle" nor the end of the drain.

A vLLM worker once failed its drained stop under load: its /metrics did not answer in time
while the engine was busy, and the drain took the last figure it had read (0, from before the
request began) as the engine's, and stopped it with a request in flight. The worker here
(tests/workers/busy_metrics_worker.py) serves vLLM's metrics, fails the first reads of its
/metrics while a request runs, and dies at once on SIGTERM, so a request cut short by the stop
never answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hivetest import Hive, running_hive, spawn_ready

from harness.waits import async_wait_for

pytestmark = pytest.mark.timeout(120)

WORKER = Path(__file__).parent.parent / "workers" / "busy_metrics_worker.py"


def backend(name: str, fail_by: str, reads: int) -> str:
    return f"""
[backends.{name}]
command = ["{{python}}", "{WORKER}", "--port", "{{port}}", "--model", "{{model}}",
           "--latency", "8", "--failing-reads", "{reads}", "--fail-by", "{fail_by}"]
liveness_period = 5

[backends.{name}.load]
path = "/metrics"
format = "prometheus"
running = ["vllm:num_requests_running"]
waiting = ["vllm:num_requests_waiting"]
period = 0.1
"""


CONFIG = "drain_timeout = 60\n" + backend("hangs", "hang", 2) + backend("errs", "error", 5)


@pytest.fixture(scope="module")
def hive() -> Iterator[Hive]:
    with running_hive(CONFIG) as daemon:
        yield daemon


async def engine_state(url: str) -> dict[str, Any]:
    """What the engine itself has seen (its /state, asked directly, not through hive)."""
    async with aiohttp.ClientSession() as c, c.get(f"{url}/state") as r:
        return dict(await r.json())


async def complete(url: str) -> tuple[int, str]:
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as c:
        body = {"model": "m", "prompt": "hello", "max_tokens": 4}
        async with c.post(f"{url}/v1/completions", json=body) as r:
            return r.status, await r.text()


@pytest.mark.parametrize("backend", ["hangs", "errs"])
async def test_a_stop_waits_for_a_request_while_the_engine_does_not_answer_its_load(
    hive: Hive, backend: str
) -> None:
    """``hangs``: its first two reads while busy get no answer within 2 s; ``errs``: its first
    five answer 503. Either way the stop waits for the request, which ends with 200."""
    async with hive.session() as s:
        worker = await spawn_ready(s, id=backend, backend=backend, restart="no")
        url = worker["url"]
        request = asyncio.create_task(complete(url))

        async def in_flight() -> bool:
            return (await engine_state(url))["in_flight"] == 1

        await async_wait_for(in_flight, timeout=10, what="the request in flight at the engine")
        async with s.post(f"/v1/workers/{backend}/stop", params={"wait": "true"}) as r:
            assert r.status == 200, await r.text()
            stopped = await r.json()
        status, text = await request
        assert status == 200, text  # it ended in full, not cut off by the stop
        assert "done" in text
        assert (stopped["state"], stopped["error"]) == ("stopped", None)
        async with s.delete(f"/v1/workers/{backend}") as r:
            assert r.status == 200

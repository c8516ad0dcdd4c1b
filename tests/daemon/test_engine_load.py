"""Busy from the engine: a worker that never heartbeats is ``busy`` while its engine says it runs
requests, is drained by that count, and is not killed because its health check is slow while
it works.

The worker is the demo worker without heartbeats, whose ``/get_load`` answers in SGLang's shape
and whose ``/health`` (``--health-waits-for-idle``) answers only once no generation runs, as an
engine whose health check takes the model's lock. The real llama-server's ``/slots`` is read in
tests/external/test_llama.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from hivetest import Hive, record, running_hive, spawn_ready

from harness.waits import async_wait_for

pytestmark = pytest.mark.timeout(120)

WORKER = (
    '["{python}", "-m", "hive.demo_worker", "--port", "{port}", "--model", "{model}", '
    '"--no-heartbeat", "--health-waits-for-idle", "--latency-ms", "3000"]'
)

CONFIG = f"""
drain_timeout = 20
restart_delay = 0.2

[backends.engine]
command = {WORKER}
liveness_period = 0.2
liveness_failures = 1

[backends.engine.load]
path = "/get_load"
format = "sglang"
period = 0.1

[backends.blind]
command = {WORKER}
liveness_period = 0.2
liveness_failures = 1
"""


@pytest.fixture(scope="module")
def hive() -> Iterator[Hive]:
    with running_hive(CONFIG) as daemon:
        yield daemon


async def complete(url: str) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as c:
        body = {"model": "m", "prompt": "hello", "max_tokens": 4}
        async with c.post(f"{url}/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            return dict(await r.json())


async def test_busy_and_in_flight_come_from_the_engine_and_busy_is_not_dead(hive: Hive) -> None:
    async with hive.session() as s:
        worker = await spawn_ready(s, id="eng", backend="engine")
        assert worker["state"] == "ready"
        requests = [asyncio.create_task(complete(worker["url"])) for _ in range(2)]

        async def busy_with_two() -> dict[str, Any] | None:
            r = await record(s, "eng")
            return r if (r["state"], r["in_flight"]) == ("busy", 2) else None

        await async_wait_for(busy_with_two, timeout=10, what="busy with 2 in flight")
        # Its /health does not answer while the two run (3 s, past the probe's 2 s timeout),
        # every 0.2 s, one failure allowed: only the engine's word that it is busy saves it.
        answers = await asyncio.gather(*requests)
        assert all(a["choices"][0]["text"] for a in answers)

        async def ready_again() -> dict[str, Any] | None:
            r = await record(s, "eng")
            return r if (r["state"], r["in_flight"]) == ("ready", 0) else None

        after = await async_wait_for(ready_again, timeout=10, what="ready with none in flight")
        assert (after["restarts"], after["pid"], after["error"]) == (0, worker["pid"], None)
        async with s.delete("/v1/workers/eng") as r:
            assert r.status == 200


async def test_without_a_load_endpoint_a_health_check_that_hangs_is_a_failure(hive: Hive) -> None:
    """The same worker, its load unread: its hanging health check is all hive knows."""
    async with hive.session() as s:
        worker = await spawn_ready(s, id="blind", backend="blind", restart="no")
        request = asyncio.create_task(complete(worker["url"]))

        async def failed() -> dict[str, Any] | None:
            r = await record(s, "blind")
            return r if r["state"] == "failed" else None

        r = await async_wait_for(failed, timeout=15, what="failed")
        assert r["error"].startswith("unhealthy: /health failed 1 times in a row (last: no answer")
        await asyncio.gather(request, return_exceptions=True)  # hive's stop may let it finish
        async with s.delete("/v1/workers/blind") as r:
            assert r.status == 200


async def test_a_stop_drains_what_the_engine_says_it_runs(hive: Hive) -> None:
    async with hive.session() as s:
        worker = await spawn_ready(s, id="drain", backend="engine")
        request = asyncio.create_task(complete(worker["url"]))

        async def busy() -> bool:
            return (await record(s, "drain"))["state"] == "busy"

        await async_wait_for(busy, timeout=10, what="busy")
        async with s.post("/v1/workers/drain/stop", params={"wait": "true"}) as r:
            assert r.status == 200, await r.text()
        answer = await request  # finished, not cut short by the stop
        assert answer["choices"][0]["text"]
        final = await record(s, "drain")
        assert (final["state"], final["exit_code"]) == ("stopped", 0)
        async with s.delete("/v1/workers/drain") as r:
            assert r.status == 200

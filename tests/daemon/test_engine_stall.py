"""Half-alive workers through a real daemon: a demo worker whose generation freezes while its
``/health`` answers (``--stall-after``) is failed ``stalled:`` within ``stall_timeout`` and a
load period, and restarted; one that progresses is never failed, however slow its health
check, nor while hive itself was paused; an idle one that froze is caught by the deep probe.

The demo worker's ``/metrics`` counts its tokens and steps as vLLM's does; the backends read
them as the built-in ``vllm`` backend reads vLLM's. The real vLLM and llama-server are in
tests/external/test_vllm_stall.py and tests/external/test_llama_phases.py.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from hivetest import Hive, record, running_hive, spawn_ready

from harness.waits import async_wait_for

pytestmark = pytest.mark.timeout(180)

STALL = 2.0  # stall_timeout
PERIOD = 0.5  # the load read's period

WORKER = '["{python}", "-m", "hive.demo_worker", "--port", "{port}", "--model", "{model}"]'
LOAD = f"""path = "/metrics"
format = "prometheus"
running = ["demo:num_requests_running"]
waiting = ["demo:num_requests_waiting"]
progress = ["demo:generation_tokens_total", "demo:steps_total"]
period = {PERIOD}
"""
CONFIG = f"""
restart_delay = 0.2

[backends.engine]
command = {WORKER}
stall_timeout = {STALL}
liveness_period = 0.5
liveness_failures = 1
[backends.engine.load]
{LOAD}

[backends.deep]
command = {WORKER}
stall_timeout = {STALL}
deep_probe_period = 0.5
[backends.deep.load]
{LOAD}
"""


@pytest.fixture(scope="module")
def hive() -> Iterator[Hive]:
    with running_hive(CONFIG) as daemon:
        yield daemon


def _at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


async def stream(url: str, seconds: float, tokens: int = 64) -> str:
    """One streamed completion of ``tokens`` pieces spread over ``seconds``; its text."""
    timeout = aiohttp.ClientTimeout(total=seconds * 4 + 30)
    body = {"model": "m", "prompt": "hello", "max_tokens": tokens, "stream": True}
    text = []
    async with (
        aiohttp.ClientSession(timeout=timeout) as c,
        c.post(f"{url}/v1/completions", json=body) as r,
    ):
        assert r.status == 200, await r.text()
        async for line in r.content:
            text.append(line.decode())
    return "".join(text)


async def failed(s: aiohttp.ClientSession, worker_id: str) -> dict[str, Any]:
    async def down() -> dict[str, Any] | None:
        r = await record(s, worker_id)
        return r if r["error"] is not None and r["stopped_at"] is not None else None

    return dict(await async_wait_for(down, timeout=60, interval=0.05, what=f"{worker_id} failed"))


async def idle(s: aiohttp.ClientSession, worker_id: str) -> dict[str, Any]:
    """The record once the engine's load says it is idle again (ready), or failed."""

    async def settled() -> dict[str, Any] | None:
        r = await record(s, worker_id)
        return r if r["state"] in ("ready", "failed", "starting") else None

    return dict(await async_wait_for(settled, timeout=30, what=f"{worker_id} idle"))


@pytest.mark.parametrize("heartbeats", [False, True], ids=["engine-load", "heartbeating"])
async def test_a_frozen_engine_is_failed_stalled_and_restarted(
    hive: Hive, heartbeats: bool
) -> None:
    wid = f"frozen-{'hb' if heartbeats else 'load'}"
    freeze = 3.0
    args = ["--latency-ms", "30000", "--stall-after", str(freeze)]
    args += [] if heartbeats else ["--no-heartbeat"]
    async with hive.session() as s:
        worker = await spawn_ready(s, id=wid, backend="engine", args=args)
        request = asyncio.create_task(stream(worker["url"], 30))
        try:
            gone = await failed(s, wid)
        finally:
            request.cancel()
        assert gone["error"].startswith("stalled: 1 request in flight and no progress for 2s")
        said = re.search(r"generation frozen at ([0-9.]+)", hive.worker_log(wid).read_text())
        assert said is not None
        detected = _at(gone["stopped_at"]) - float(said.group(1))
        print(f"\nstall detected {detected:.2f} s after the freeze (stall_timeout {STALL:g} s)")
        # Its counters last moved up to a period before the freeze (a token every 0.47 s).
        assert detected >= STALL - PERIOD - 0.5
        assert detected <= STALL + PERIOD + 2.0  # within the timeout and a period (+ slack)

        async def restarted() -> dict[str, Any] | None:
            r = await record(s, wid)
            return r if r["state"] == "ready" and r["restarts"] == 1 else None

        await async_wait_for(restarted, timeout=60, what="restarted per policy (on-failure)")
        async with s.delete(f"/v1/workers/{wid}") as r:
            assert r.status == 200


async def test_a_busy_engine_that_progresses_is_never_stalled(hive: Hive) -> None:
    # Its /health answers only once idle: every liveness probe times out while it works (2 s,
    # its period is 0.5 s), and it works for 5 times stall_timeout.
    args = ["--latency-ms", str(STALL * 5 * 1000), "--no-heartbeat", "--health-waits-for-idle"]
    async with hive.session() as s:
        worker = await spawn_ready(s, id="slow", backend="engine", args=args)
        requests = [asyncio.create_task(stream(worker["url"], STALL * 5)) for _ in range(4)]
        texts = await asyncio.gather(*requests)
        assert all("[DONE]" in text for text in texts)
        after = await idle(s, "slow")
        assert (after["restarts"], after["error"]) == (0, None)
        async with s.delete("/v1/workers/slow") as r:
            assert r.status == 200


async def test_hive_paused_longer_than_stall_timeout_blames_no_engine(hive: Hive) -> None:
    args = ["--latency-ms", str(STALL * 6 * 1000), "--no-heartbeat"]
    async with hive.session() as s:
        worker = await spawn_ready(s, id="paused", backend="engine", args=args)
        request = asyncio.create_task(stream(worker["url"], STALL * 6))

        async def busy() -> bool:
            return (await record(s, "paused"))["state"] == "busy"

        await async_wait_for(busy, timeout=30, what="busy")
        hive.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(STALL * 2)  # the pause itself, not a wait for a result
        finally:
            hive.signal(signal.SIGCONT)
        assert "[DONE]" in await request
        after = await idle(s, "paused")
        assert (after["restarts"], after["error"]) == (0, None)
        async with s.delete("/v1/workers/paused") as r:
            assert r.status == 200


async def test_the_deep_probe_finds_an_idle_engine_frozen(hive: Hive) -> None:
    async with hive.session() as s:
        healthy = await spawn_ready(s, id="deep-ok", backend="deep", args=["--no-heartbeat"])
        stuck = await spawn_ready(
            s,
            id="deep-stuck",
            backend="deep",
            restart="no",
            args=["--no-heartbeat", "--stall-after", "0"],
        )
        started = time.monotonic()
        gone = await failed(s, "deep-stuck")
        assert gone["error"] == (
            "stalled: a one-token generation (deep probe) got no answer within 2s (stall_timeout)"
        )
        assert time.monotonic() - started < 60
        ok = await record(s, healthy["id"])  # probed every 0.5 s all along, and answered
        assert (ok["state"], ok["restarts"], ok["error"]) == ("ready", 0, None)
        for wid in ("deep-ok", stuck["id"]):
            async with s.delete(f"/v1/workers/{wid}") as r:
                assert r.status == 200

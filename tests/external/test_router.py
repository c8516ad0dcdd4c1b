"""Router sync against the real sglang-router, started by the tests on free loopback ports."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from typing import Any

import aiohttp
import psutil
import pytest
from hivetest import Hive, running_hive
from routers import Router, in_router, router_config, spawn

from harness.waits import async_wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def hive(router: Router) -> Iterator[Hive]:
    with running_hive(router_config(router)) as daemon:
        yield daemon


async def test_ready_workers_are_registered_and_get_requests(hive: Hive, router: Router) -> None:
    async with hive.session() as s:
        a = await spawn(s, id="r-a")
        b = await spawn(s, id="r-b")
        for w in (a, b):
            await async_wait_for(lambda u=w["url"]: in_router(router, u), what="registered")

        async def status() -> bool:
            async with s.get("/v1/workers/r-a") as r:
                return bool((await r.json())["routers"].get(router.url) == "registered")

        await async_wait_for(status, what="sync status in the record")

        # Requests through the router reach every worker.
        seen = set()
        async with aiohttp.ClientSession() as client:
            for _ in range(6):
                async with client.post(
                    f"{router.url}/generate", json={"text": "hi", "sampling_params": {}}
                ) as r:
                    assert r.status == 200, await r.text()
                    seen.add((await r.json())["text"].split("]")[0])
        assert seen == {f"[r-a@{a['port']}", f"[r-b@{b['port']}"}

        # A worker that dies leaves the router at once.
        os.kill(b["pid"], signal.SIGKILL)
        await async_wait_for(lambda: in_router(router, b["url"], False), what="b removed")
        assert await in_router(router, a["url"])
        for wid in ("r-a", "r-b"):
            async with s.delete(f"/v1/workers/{wid}") as r:
                assert r.status == 200
        await async_wait_for(lambda: in_router(router, a["url"], False), what="a removed")


async def test_graceful_stop_leaves_the_router_then_drains(hive: Hive, router: Router) -> None:
    async with hive.session() as s:
        w = await spawn(s, id="drain", args=["--latency-ms", "3000"])
        await async_wait_for(lambda: in_router(router, w["url"]), what="registered")
        async with aiohttp.ClientSession() as client:
            # One slow request in flight; the worker heartbeats busy with in_flight 1.
            slow = asyncio.create_task(client.post(f"{w['url']}/generate", json={"text": "slow"}))

            async def busy() -> bool:
                async with s.get("/v1/workers/drain") as r:
                    return bool((await r.json())["in_flight"])

            await async_wait_for(busy, what="busy heartbeat")
            stop = asyncio.create_task(s.post("/v1/workers/drain/stop", params={"wait": "true"}))

            async def draining() -> dict[str, Any] | None:
                async with s.get("/v1/workers/drain") as r:
                    record = await r.json()
                return record if record["draining"] else None

            await async_wait_for(draining, what="draining")
            # Out of the router while the process still serves its last request.
            assert not await in_router(router, w["url"])
            assert psutil.pid_exists(w["pid"])
            response = await slow
            assert response.status == 200  # the in-flight request was not dropped
            response.release()
            stopped = await stop
            assert (await stopped.json())["state"] == "stopped"
            stopped.release()
        async with s.delete("/v1/workers/drain") as r:
            assert r.status == 200


async def test_reconcile_heals_a_restarted_router() -> None:
    router = Router().start()
    try:
        with running_hive(router_config(router)) as daemon:
            async with daemon.session() as s:
                w = await spawn(s, id="heal")
                await async_wait_for(lambda: in_router(router, w["url"]), what="registered")
                router.stop()
                router.start()  # empty again, same address
                assert not await in_router(router, w["url"])
                await async_wait_for(
                    lambda: in_router(router, w["url"]), timeout=30, what="re-registered"
                )
    finally:
        router.stop()


async def test_a_router_down_at_first_gets_the_workers_when_it_comes_up() -> None:
    router = Router()
    try:
        with running_hive(router_config(router)) as daemon:
            async with daemon.session() as s:
                w = await spawn(s, id="early")
                async with s.get("/v1/workers/early") as r:
                    status = (await r.json())["routers"].get(router.url, "")
                assert status != "registered"
                router.start()
                await async_wait_for(
                    lambda: in_router(router, w["url"]), timeout=30, what="registered late"
                )
    finally:
        router.stop()


async def test_two_hives_share_one_router_and_leave_each_other_alone() -> None:
    router = Router().start()
    try:
        config = router_config(router, reconcile=0.3)
        with running_hive(config) as one, running_hive(config) as two:
            async with one.session() as s1, two.session() as s2:
                a = await spawn(s1, id="one-a")
                b = await spawn(s2, id="two-b")
                for w in (a, b):
                    await async_wait_for(lambda u=w["url"]: in_router(router, u), what="both in")
                # Several reconcile rounds of each hive: nobody removes the other's worker.
                start = (await reconciles(one, s1), await reconciles(two, s2))

                async def rounds_passed() -> bool:
                    assert await router.urls() >= {a["url"], b["url"]}
                    now = (await reconciles(one, s1), await reconciles(two, s2))
                    return now[0] >= start[0] + 4 and now[1] >= start[1] + 4

                await async_wait_for(rounds_passed, interval=0.05, what="4 rounds each")
                os.kill(a["pid"], signal.SIGKILL)
                await async_wait_for(lambda: in_router(router, a["url"], False), what="a gone")
                assert await in_router(router, b["url"])
    finally:
        router.stop()


async def reconciles(hive: Hive, s: aiohttp.ClientSession) -> float:
    async with s.get("/metrics") as r:
        text = await r.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("hive_router_reconciles_total{")
    )

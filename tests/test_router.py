"""Router sync against the real sglang-router, started by the tests on free loopback ports."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import psutil
import pytest
from hivetest import TAG, Hive, running_hive

from harness.net import free_port
from harness.waits import async_wait_for, wait_for

pytestmark = pytest.mark.timeout(180)


class Router:
    """One sglang-router process; ``restart()`` brings it back empty on the same port."""

    def __init__(self, port: int | None = None, *extra: str) -> None:
        self.extra = list(extra)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Router:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sglang_router.launch_router",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                # Its metrics server defaults to 0.0.0.0:29000, which two routers cannot share.
                "--prometheus-host",
                "127.0.0.1",
                "--prometheus-port",
                str(free_port()),
                "--policy",
                "round_robin",
                "--log-level",
                "warn",
                "--disable-circuit-breaker",
                *self.extra,
            ],
            env={**os.environ, **TAG.env, "HF_HUB_OFFLINE": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._up, timeout=60, interval=0.1, what="sglang-router to answer")
        return self

    def _up(self) -> bool:
        import urllib.request

        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"sglang-router exited with {self.proc.returncode}")
        try:
            with urllib.request.urlopen(f"{self.url}/liveness", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    async def urls(self) -> set[str]:
        async with aiohttp.ClientSession() as s, s.get(f"{self.url}/workers") as r:
            body = await r.json()
        return {w["url"] for w in body["workers"]}


def router_config(*routers: Router, reconcile: float = 0.5) -> str:
    text = f"router_reconcile = {reconcile}\ndrain_timeout = 10\n"
    for router in routers:
        text += f'[[routers]]\nkind = "sglang"\nurl = "{router.url}"\n'
    return text


@pytest.fixture(scope="module")
def hive(router: Router) -> Iterator[Hive]:
    with running_hive(router_config(router)) as daemon:
        yield daemon


async def spawn(s: aiohttp.ClientSession, **body: Any) -> dict[str, Any]:
    body.setdefault("model", "demo-model")
    async with s.post("/v1/workers", params={"wait": "ready"}, json=body) as r:
        data = await r.json()
        assert r.status == 200, data
        return data


async def in_router(router: Router, url: str, present: bool = True) -> bool:
    return (url in await router.urls()) is present


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

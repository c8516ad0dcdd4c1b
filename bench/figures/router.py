"""Figure 4: how long a SIGKILLed worker stays in sglang-router, with hive's router sync and
under the router's own default health checks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

from benchlib import EventStream, bench_hive, new_home
from peers import PeerUnavailable, Router

from figures.common import Figure, Popened, Settings, demo_argv, ms, unavailable
from harness.daemon import HiveFailed
from harness.net import free_port
from harness.stats import summarize
from harness.waits import wait_http_ok


class RouterDefaults:
    """How long an sglang-router with its default health checks keeps a SIGKILLed worker.

    Set up first (its workers' start-up would disturb the other figures), then it kills its
    workers one by one, spread over ``stagger`` seconds so that the kills fall at every phase of
    the router's check interval, and polls the router in the background while the rest runs.
    """

    def __init__(self, settings: Settings, popened: Popened) -> None:
        self.settings = settings
        self.popened = popened
        self.router: Router | None = None
        self.workers: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.samples: dict[str, float] = {}
        self.killed: dict[str, float] = {}
        self.error: str | None = None
        self.finishing = asyncio.Event()

    async def setup(self) -> None:
        n = self.settings.router_peer_samples
        self.router = await Router("sgr-peer").start()
        home = new_home("sgr-workers")
        ports = [free_port() for _ in range(n)]
        for port in ports:
            proc = self.popened.start(demo_argv(port, "--no-heartbeat"), home / f"{port}.log", home)
            self.workers.append((f"http://127.0.0.1:{port}", proc))
        await asyncio.gather(*(wait_http_ok(f"{url}/health", 60) for url, _ in self.workers))
        for url, _ in self.workers:
            await self.router.add(url, "bench")
        deadline = time.monotonic() + 60
        while True:
            listed = {w["url"]: w for w in await self.router.workers()}
            if all(listed.get(url, {}).get("is_healthy") for url, _ in self.workers):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not all healthy in the router: {listed}")
            await asyncio.sleep(0.1)

    async def run(self) -> None:
        assert self.router is not None
        n = len(self.workers)
        started = time.monotonic()

        async def kill_all() -> None:
            for i, (url, proc) in enumerate(self.workers):
                due = started + self.settings.router_peer_stagger * i / max(n, 1)
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                self.killed[url] = time.time()
                proc.kill()
                await asyncio.to_thread(proc.wait)

        killer = asyncio.create_task(kill_all())
        try:
            while len(self.samples) < n:
                now = time.time()
                listed = {w["url"]: w for w in await self.router.workers()}
                for url, at in self.killed.items():
                    if url not in self.samples and not listed.get(url, {}).get("is_healthy"):
                        self.samples[url] = now - at
                if killer.done() and self.killed:
                    waited = time.time() - max(self.killed.values())
                    if self.finishing.is_set() and waited >= self.settings.router_peer_cap:
                        return
                await asyncio.sleep(0.25)
        finally:
            killer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await killer

    def result(self) -> dict[str, Any]:
        if self.error:
            return unavailable(self.error)
        now = time.time()
        censored = [now - at for url, at in self.killed.items() if url not in self.samples]
        out = summarize(list(self.samples.values()) + censored)
        out["unit"] = "s"
        if censored:
            out["censored"] = len(censored)
            out["note"] = (
                f"{len(censored)} still listed as healthy when the bench ended: their values "
                "are lower bounds"
            )
        return out

    async def close(self) -> None:
        if self.router is not None:
            await self.router.close()


async def figure_router(
    settings: Settings, peer: RouterDefaults | None, peer_error: str | None
) -> Figure:
    router = Router("sgr-hive")
    hive = bench_hive("router", f'\n[[routers]]\nkind = "sglang"\nurl = "{router.url}"\n')
    figure = Figure(
        "4",
        "crash: SIGKILL -> gone from sglang-router",
        "ms",
        {},
        target="(none)",
    )
    events: EventStream | None = None
    try:
        await router.start()
        try:
            await hive.start_async()
        except HiveFailed as exc:
            figure.hive = unavailable(f"hive does not start with [[routers]]: {exc}"[:300])
            return figure
        events = await EventStream(hive).start()

        async def listed(port: int) -> bool:
            return any(w["url"].endswith(f":{port}") for w in await router.workers())

        async def until(condition: Callable[[], Awaitable[bool]], timeout: float) -> float | None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if await condition():
                    return time.time()
                await asyncio.sleep(0.005)
            return None

        gone: list[float] = []
        joined: list[float] = []
        misses = 0
        for i in range(settings.samples + 1):
            worker_id = f"routed-{i}"
            record = await hive.spawn({"model": "bench", "id": worker_id}, wait=True)
            ready = await events.state(worker_id, "ready", 10)
            port = int(record["port"])
            seen = await until(lambda port=port: listed(port), 10)
            if seen is None:
                fields = sorted(k for k in record if "router" in k.lower())
                if i == 0:
                    why = "hive does not sync [[routers]] yet: the worker never appeared in the "
                    why += "router's /workers within 10 s of ready"
                    if fields:
                        why += f" (its record has {fields})"
                    figure.hive = unavailable(why)
                    await hive.stop_worker(worker_id)
                    return figure
                misses += 1
                continue
            killed = time.time()
            os.kill(int(record["pid"]), signal.SIGKILL)
            out = await until(lambda port=port: _not(listed(port)), 15)
            if i == 0:
                continue
            joined.append(seen - ready.recv)
            if out is None:
                misses += 1
            else:
                gone.append(out - killed)
        figure.hive = summarize(ms(gone))
        figure.notes.append(
            "hive with [[routers]] -> a real sglang-router; polled GET /workers every 5 ms"
        )
        figure.notes.append(
            f"ready event -> listed in the router: {json.dumps(summarize(ms(joined), keep=False))}"
        )
        if misses:
            figure.notes.append(f"{misses} samples never joined or never left the router")
        return figure
    except PeerUnavailable as exc:
        figure.hive = unavailable(f"sglang-router: {exc}"[:300])
        return figure
    finally:
        if events is not None:
            await events.close()
        await hive.close()
        await router.close()
        if peer is not None:
            figure.peers["sglang-router defaults"] = peer.result()
        elif peer_error:
            figure.peers["sglang-router defaults"] = unavailable(peer_error)


async def _not(value: Awaitable[bool]) -> bool:
    return not await value

"""Figure 8: requests lost while hive replaces a worker, and while it stops one gracefully, with
clients sending requests through a real sglang-router the whole time.

The router runs with its retries off, so a request it sends to a worker that is gone (or not yet
serving) fails where the client sees it. No peer replaces a model server; the figure counts
hive's requests only.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp
from benchlib import bench_hive, log
from peers import PeerUnavailable, Router

from figures.common import Figure, Settings, unavailable

CLIENTS = 16
ROUNDS = 5


class _Load:
    def __init__(self, url: str) -> None:
        self.url = url
        self.counts: Counter[str] = Counter()
        self.stop = asyncio.Event()

    async def run(self, session: aiohttp.ClientSession) -> None:
        body = {"text": "hi", "sampling_params": {"max_new_tokens": 4}}
        while not self.stop.is_set():
            try:
                async with session.post(f"{self.url}/generate", json=body) as r:
                    await r.read()
                    self.counts["2xx" if 200 <= r.status < 300 else str(r.status)] += 1
            except aiohttp.ClientError as exc:
                self.counts[type(exc).__name__] += 1

    async def more(self, n: int, timeout: float = 60.0) -> None:
        target, deadline = sum(self.counts.values()) + n, time.monotonic() + timeout
        while sum(self.counts.values()) < target and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


def _row(counts: Counter[str]) -> dict[str, int]:
    return {"sent": sum(counts.values()), "2xx": counts["2xx"], "other": sum(
        n for k, n in counts.items() if k != "2xx"
    )}  # fmt: skip


async def figure_replace(settings: Settings) -> Figure:
    figure = Figure(
        "8", "requests lost: replace and graceful stop under load", "requests", {}, target="0",
        stat="value",
    )  # fmt: skip
    router = Router("sgr-replace", "--disable-retries", "--policy", "round_robin")
    hive = bench_hive(
        "replace", f'drain_timeout = 10\n[[routers]]\nkind = "sglang"\nurl = "{router.url}"\n'
    )
    try:
        await router.start()
        await hive.start_async()
        slow = ["--latency-ms", "20", "--no-heartbeat"]
        for worker_id in ("a", "b"):
            await hive.spawn({"model": "bench", "id": worker_id, "args": slow}, wait=True)
        urls = {w["url"] for w in (await hive.call("GET", "/v1/workers"))["workers"]}
        deadline = time.monotonic() + 30
        while {w["url"] for w in await router.workers()} < urls:
            if time.monotonic() > deadline:
                raise RuntimeError("the workers never joined the router")
            await asyncio.sleep(0.05)
        load = _Load(router.url)
        replace_counts: Counter[str] = Counter()
        stop_counts: Counter[str] = Counter()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            clients = [asyncio.create_task(load.run(session)) for _ in range(CLIENTS)]
            try:
                await load.more(200)
                for i in range(ROUNDS):
                    # Replace a while b serves too, then stop b gracefully while a serves.
                    before = Counter(load.counts)
                    latency = str(20 + i + 1)
                    await hive.call(
                        "POST", "/v1/workers/a/replace",
                        json_body={"args": ["--latency-ms", latency, "--no-heartbeat"]},
                    )  # fmt: skip
                    await load.more(100)
                    replace_counts += load.counts - before
                    before = Counter(load.counts)
                    await hive.stop_worker("b")
                    await load.more(100)
                    stop_counts += load.counts - before
                    await hive.call("POST", "/v1/workers/b/restart")
                    await _registered(hive, router, "b")
            finally:
                load.stop.set()
                await asyncio.gather(*clients)
        replaced, stopped = _row(replace_counts), _row(stop_counts)
        figure.hive = {"value": replaced["other"] + stopped["other"]}
        figure.met = figure.hive["value"] == 0
        figure.notes.append(
            f"{ROUNDS} replacements: sent {replaced['sent']}, 2xx {replaced['2xx']}, "
            f"other {replaced['other']}; {ROUNDS} graceful stops: sent {stopped['sent']}, "
            f"2xx {stopped['2xx']}, other {stopped['other']}"
        )
        figure.notes.append(
            f"{CLIENTS} clients back to back through sglang-router (--disable-retries), demo "
            "workers answering in 20 ms, engine load read from /v1/loads (no heartbeats)"
        )
        other = {k: n for k, n in load.counts.items() if k != "2xx"}
        if other:
            figure.notes.append(f"failed answers by kind: {dict(other)}")
        log(f"figure 8: {figure.notes[0]}")
    except (PeerUnavailable, RuntimeError) as exc:
        figure.hive = unavailable(f"{exc}"[:300])
    finally:
        await hive.close()
        await router.close()
    return figure


async def _registered(hive: object, router: Router, worker_id: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        record = await hive.call("GET", f"/v1/workers/{worker_id}")  # type: ignore[attr-defined]
        if record["state"] == "ready" and any(
            w["url"] == record["url"] for w in await router.workers()
        ):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"worker {worker_id} did not come back into the router")

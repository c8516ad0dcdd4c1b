"""Replacement and graceful stop under continuous requests through a real sglang-router: no
request is lost. The router runs with its retries off, so a request sent to a worker that is
gone, or not yet serving, fails where the client sees it."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import pytest
from hivetest import Hive, running_hive
from routers import Router, in_router, router_config

from harness.waits import async_wait_for

pytestmark = pytest.mark.timeout(240)


class Load:
    """``clients`` loops sending ``/generate`` through the router back to back, counting each
    answer's status (``error`` for a connection that failed)."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url, self.clients = url, clients
        self.counts: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(self.clients)]
        return self

    async def __aexit__(self, *_: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()

    async def _loop(self) -> None:
        body = {"text": "hi", "sampling_params": {"max_new_tokens": 4}}
        while not self._stop.is_set():
            try:
                async with self._session.post(f"{self.url}/generate", json=body) as r:
                    await r.read()
                    self.counts["2xx" if 200 <= r.status < 300 else str(r.status)] += 1
            except aiohttp.ClientError as exc:
                self.counts[f"error: {type(exc).__name__}"] += 1

    @property
    def sent(self) -> int:
        return sum(self.counts.values())

    async def more(self, n: int) -> None:
        """Wait until ``n`` more requests have been answered."""
        target = self.sent + n
        await async_wait_for(lambda: self.sent >= target, what=f"{n} more requests")


async def test_replace_and_drain_under_load_lose_no_request(strict_router: Router) -> None:
    router = strict_router
    with running_hive(router_config(router)) as hive:
        try:
            await _replace_and_drain(hive, router)
        finally:
            await hive.close_http()


async def _replace_and_drain(hive: Hive, router: Router) -> None:
    slow = ["--latency-ms", "30"]
    a = await hive.spawn({"model": "demo-model", "id": "a", "args": slow}, wait=True)
    await async_wait_for(lambda: in_router(router, a["url"]), what="registered")
    # Idle, nothing else changing: the successor's registration alone must let it take over.
    idle = await asyncio.wait_for(
        hive.call("POST", "/v1/workers/a/replace", json_body={"args": slow}), 30
    )
    assert idle["generation"] == 2 and await in_router(router, idle["url"])
    a = idle
    async with Load(router.url) as load:
        # The only worker is replaced: every request needs the old one, or its successor.
        await load.more(40)
        replaced = await hive.call(
            "POST", "/v1/workers/a/replace", json_body={"args": ["--latency-ms", "31"]}
        )
        assert replaced["generation"] == 3 and replaced["port"] != a["port"]
        assert not await in_router(router, a["url"])
        assert await in_router(router, replaced["url"])
        await load.more(40)
        during_replace = Counter(load.counts)
        # A second worker joins; the first stops gracefully (out of the router, drained).
        b = await hive.spawn({"model": "demo-model", "id": "b", "args": slow}, wait=True)
        await async_wait_for(lambda: in_router(router, b["url"]), what="b registered")
        before_stop = Counter(load.counts)
        stopped = await hive.stop_worker("a")
        assert stopped["state"] == "stopped"
        await load.more(40)
    during_stop = load.counts - before_stop
    for what, counts in (("replace", during_replace), ("graceful stop", during_stop)):
        other = {k: v for k, v in counts.items() if k != "2xx"}
        print(f"{what} under load: sent {sum(counts.values())}, 2xx {counts['2xx']}, other {other}")
        assert other == {}, f"requests lost during the {what}: {dict(counts)}"
        assert counts["2xx"] >= 40

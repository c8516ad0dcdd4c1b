"""Registration as a job, roles and metadata, against the real sglang-router (0.3.2): what
hive sends arrives as sent, a worker the router cannot health-check never floods it, and a
prefill/decode pair that hive spawned serves a request through the router in PD mode."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from hivetest import Hive, running_hive
from routers import Router, router_config, spawn

from harness.waits import async_wait_for

pytestmark = pytest.mark.timeout(240)

BACKENDS = """
[backends.unhealthy]
command = ["{python}", "-m", "hive.demo_worker", "--port", "{port}", "--model", "{model}",
           "--health-status", "503"]
health_path = ""
router_health_check = true
"""


@pytest.fixture(scope="module")
def pd_router() -> Iterator[Router]:
    # PD mode with no worker given at start; a failing job gives up after ~22 s, not 30 min.
    router = Router(None, "--pd-disaggregation", "--worker-startup-timeout-secs", "20").start()
    try:
        yield router
    finally:
        router.stop()


@pytest.fixture(scope="module")
def hive(pd_router: Router) -> Iterator[Hive]:
    with running_hive(router_config(pd_router) + BACKENDS) as daemon:
        yield daemon


async def listed(router: Router) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(f"{router.url}/workers") as r:
        body = await r.json()
    return {w["url"]: w for w in body["workers"]}


async def sync_status(s: aiohttp.ClientSession, worker_id: str, router: Router) -> str:
    async with s.get(f"/v1/workers/{worker_id}") as r:
        return str((await r.json())["routers"].get(router.url, ""))


async def posts(s: aiohttp.ClientSession, router: Router) -> float:
    """hive's own count of registrations sent to ``router``."""
    async with s.get("/metrics") as r:
        text = await r.text()
    pattern = rf'hive_router_requests_total{{kind="add",router="{re.escape(router.url)}"}} (\S+)'
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


async def test_a_pd_pair_serves_through_the_router_with_roles_and_metadata_as_sent(
    hive: Hive, pd_router: Router
) -> None:
    async with hive.session() as s:
        prefill = await spawn(s, id="pf", role="prefill", priority=7, cost=2.5, labels={"t": "a"})
        decode = await spawn(s, id="dc", role="decode")
        assert prefill["role"] == "prefill" and prefill["bootstrap_port"] is not None
        assert prefill["bootstrap_port"] != prefill["port"]
        for w in (prefill, decode):
            await async_wait_for(
                lambda w=w: _is(s, w["id"], pd_router, "registered"), what=f"{w['id']} registered"
            )
        workers = await listed(pd_router)
        pf, dc = workers[prefill["url"]], workers[decode["url"]]
        print(f"\nsglang-router GET /workers for a PD pair spawned by hive:\n{pf}\n{dc}")
        assert pf["worker_type"] == "prefill" and dc["worker_type"] == "decode"
        assert pf["bootstrap_port"] == prefill["bootstrap_port"]
        assert (pf["priority"], pf["cost"]) == (7, 2.5)
        assert (dc["priority"], dc["cost"]) == (50, 1.0)  # the router's own defaults
        assert pf["metadata"]["t"] == "a" and pf["metadata"]["hive_worker"] == "pf"

        async with (
            aiohttp.ClientSession() as client,
            client.post(
                f"{pd_router.url}/generate",
                json={"text": "hello", "sampling_params": {"max_new_tokens": 4}},
            ) as r,
        ):
            assert r.status == 200, await r.text()
            answer = await r.json()
        assert f"@{decode['port']}]" in answer["text"]  # the decode worker answered

        rooms = {}
        for wid in ("pf", "dc"):
            async with s.get(f"/v1/workers/{wid}/logs", params={"tail": "50"}) as r:
                found = re.findall(r"served bootstrap_room (\d+)", await r.text())
            assert found, f"{wid} never saw the request"
            rooms[wid] = found[-1]
        assert rooms["pf"] == rooms["dc"]  # one request, through both

        for wid in ("pf", "dc"):
            async with s.delete(f"/v1/workers/{wid}") as r:
                assert r.status == 200
        for w in (prefill, decode):
            await async_wait_for(
                lambda w=w: _absent(pd_router, w["url"]), what=f"{w['id']} out of the router"
            )


async def test_a_worker_the_router_cannot_check_never_floods_it(
    hive: Hive, pd_router: Router
) -> None:
    async with hive.session() as s:
        sent_before = await posts(s, pd_router)
        body = {"id": "sick", "backend": "unhealthy", "role": "decode"}
        sick = await spawn(s, **body)
        assert (await sync_status(s, "sick", pd_router)) in ("pending", "")
        # While its job fails in the router, a healthy worker spawned after it is registered
        # at once, and leaves at once when stopped.
        well = await spawn(s, id="well", role="decode")
        await async_wait_for(
            lambda: _is(s, "well", pd_router, "registered"), timeout=15, what="well registered"
        )
        async with s.post("/v1/workers/well/stop") as r:
            assert r.status == 200
        await async_wait_for(
            lambda: _absent(pd_router, well["url"]), timeout=15, what="well out of the router"
        )
        # The router's job for the sick one fails (its health check); hive says why.
        status = await async_wait_for(
            lambda: _failed(s, "sick", pd_router), timeout=60, what="sick failed"
        )
        assert "health" in status.lower() or "503" in status, status
        assert sick["url"] not in await listed(pd_router)
        # Posted a bounded number of times: once, and once more after the first back-off.
        sent = await posts(s, pd_router) - sent_before
        assert 2 <= sent <= 4, sent  # sick: at most 2 (or 3); well: 1
        for wid in ("sick", "well"):
            async with s.delete(f"/v1/workers/{wid}") as r:
                assert r.status == 200


async def _is(s: aiohttp.ClientSession, worker_id: str, router: Router, status: str) -> bool:
    return await sync_status(s, worker_id, router) == status


async def _failed(s: aiohttp.ClientSession, worker_id: str, router: Router) -> str | None:
    status = await sync_status(s, worker_id, router)
    return status if status.startswith("failed: ") else None


async def _absent(router: Router, url: str) -> bool:
    return url not in await listed(router)

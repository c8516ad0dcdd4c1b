"""Issue 26 with a real sglang-router: at its default settings, a SIGTERM'd and started-again
hive (what ``systemctl restart hive`` does) leaves the workers serving and registered: the same
process is adopted, nothing is restarted, the router never loses it. Fails on the code before
issue 26, whose default (``on_exit = "stop"``) stopped every worker at SIGTERM. A host shutdown
(``shutdown_check`` answers ``stopping``, as systemd does during a reboot) is the exception:
then the worker is withdrawn from the router and stopped before hive exits."""

from __future__ import annotations

import aiohttp
import psutil
import pytest
from hivetest import running_hive
from routers import Router, in_router, router_config

from harness.waits import async_wait_for

pytestmark = pytest.mark.timeout(180)


async def _routed(router: Router) -> int:
    """One request through the router: the status it answered."""
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 2}}
    async with aiohttp.ClientSession() as s, s.post(f"{router.url}/generate", json=body) as r:
        await r.read()
        return r.status


async def test_a_restart_of_hive_keeps_the_worker_adopted_and_registered(router: Router) -> None:
    with running_hive(router_config(router), on_exit=None) as hive:
        try:
            w = await hive.spawn({"model": "demo-model", "id": "rr"}, wait=True)
            await async_wait_for(lambda: in_router(router, w["url"]), what="registered")
            assert hive.stop() == 0  # SIGTERM: hive detaches
            assert await in_router(router, w["url"])  # not withdrawn while hive is down
            assert await _routed(router) == 200  # and it serves meanwhile

            hive.start()

            async def registered() -> dict[str, object] | None:
                record = await hive.call("GET", "/v1/workers/rr")
                return record if record["routers"].get(router.url) == "registered" else None

            record = await async_wait_for(registered, what="registered by the new hive")
            assert record["pid"] == w["pid"] and record["restarts"] == 0
            assert record["state"] == "ready" and record["started_at"] == w["started_at"]
            assert await in_router(router, w["url"])
            assert await _routed(router) == 200
        finally:  # a hive that detaches leaves its workers: remove them (if it runs)
            if hive.proc is not None:
                body = await hive.call("GET", "/v1/workers")
                for worker in body["workers"]:
                    await hive.call("DELETE", f"/v1/workers/{worker['id']}")
            await hive.close_http()
        await async_wait_for(lambda: in_router(router, w["url"], False), what="removed")


async def test_a_host_shutdown_withdraws_the_worker_and_stops_it(router: Router) -> None:
    """The same SIGTERM while systemd says the host is shutting down (``echo stopping`` for
    ``systemctl is-system-running``): out of the router, then stopped, before hive exits."""
    config = 'shutdown_check = ["echo", "stopping"]\n' + router_config(router)
    with running_hive(config, on_exit=None) as hive:
        w = await hive.spawn({"model": "demo-model", "id": "hs"}, wait=True)
        await async_wait_for(lambda: in_router(router, w["url"]), what="registered")
        assert hive.stop() == 0
        assert await in_router(router, w["url"], False)  # withdrawn: no request goes there
        assert not psutil.pid_exists(w["pid"])  # stopped (and reaped) by hive itself

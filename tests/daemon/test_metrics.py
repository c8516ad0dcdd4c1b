"""``GET /metrics``: Prometheus text that agrees with the registry, and who may read it."""

from __future__ import annotations

import os
import signal
from typing import Any

import aiohttp
import pytest
from hivetest import Hive, running_hive
from prometheus_client.parser import text_string_to_metric_families

from harness.waits import async_wait_for

pytestmark = pytest.mark.timeout(120)


async def scrape(s: aiohttp.ClientSession) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with s.get("/metrics") as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_needs_the_token_unless_public(hive: Hive) -> None:
    async with hive.session(auth=False) as s, s.get("/metrics") as r:
        assert r.status == 401
    async with hive.unix_session() as s:
        await scrape(s)
    with running_hive("metrics_public = true\n") as public:
        async with public.session(auth=False) as s:
            await scrape(s)
            async with s.get("/v1/workers") as r:  # only /metrics is opened
                assert r.status == 401


async def test_figures_follow_the_workers(hive: Hive) -> None:
    async with hive.session() as s:
        before = await scrape(s)
        body = {"model": "m", "id": "met", "restart": "no"}
        async with s.post("/v1/workers", params={"wait": "ready"}, json=body) as r:
            w = await r.json()
        samples = await scrape(s)
        assert value(samples, "hive_workers", state="ready") == 1
        assert value(samples, "hive_worker_up", worker="met", model="m") == 1
        assert value(samples, "hive_worker_restarts", worker="met", model="m") == 0
        assert (
            value(samples, "hive_spawn_to_ready_seconds_count", backend="demo")
            == value(before, "hive_spawn_to_ready_seconds_count", backend="demo") + 1
        )
        requests = value(
            samples,
            "hive_http_request_duration_seconds_count",
            method="POST",
            route="/v1/workers",
            status="200",
        )
        assert requests >= 1

        os.kill(w["pid"], signal.SIGKILL)

        async def failed() -> bool:
            async with s.get("/v1/workers/met") as r:
                return (await r.json())["state"] == "failed"

        await async_wait_for(failed, what="failed")
        samples = await scrape(s)
        assert value(samples, "hive_workers", state="failed") == 1
        assert value(samples, "hive_worker_up", worker="met", model="m") == 0
        assert value(samples, "hive_crash_detection_seconds_count") == (
            value(before, "hive_crash_detection_seconds_count") + 1
        )
        assert value(samples, "hive_worker_failures_total", backend="demo") >= 1
        # Worker ids never become label values of request metrics: routes are patterns.
        assert any(
            dict(labels).get("route") == "/v1/workers/{id}"
            for (name, labels) in samples
            if name == "hive_http_request_duration_seconds_count"
        )
        async with s.delete("/v1/workers/met") as r:
            assert r.status == 200

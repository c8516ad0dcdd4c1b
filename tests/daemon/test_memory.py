"""Host memory as a resource: reserved by what a spawn declares (``memory_mib``) or what hive
learned of the same spawn before, admitted against ``host_memory_mib``, refused with the figures
before anything starts, and held until the worker's processes are gone."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from hivetest import TAG, Hive, record, running_hive, spawn_ready

from harness.procs import tagged_processes
from harness.waits import async_wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def hive() -> Iterator[Hive]:
    with running_hive("host_memory_mib = 1000\n") as daemon:
        yield daemon


async def _post(s: aiohttp.ClientSession, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    body = {"model": "m", "restart": "no", **body}
    async with s.post("/v1/workers", params={"wait": "ready"}, json=body) as r:
        return r.status, await r.json()


async def _delete(s: aiohttp.ClientSession, *ids: str) -> None:
    for worker_id in ids:
        async with s.delete(f"/v1/workers/{worker_id}") as r:
            assert r.status == 200, await r.text()


def _processes_of(worker_id: str) -> list[int]:
    return [p.pid for p in tagged_processes(TAG) if p.environ().get("HIVE_WORKER_ID") == worker_id]


async def test_a_spawn_over_host_memory_is_refused_with_figures_and_leaves_nothing(
    hive: Hive,
) -> None:
    async with hive.session() as s:
        held = await spawn_ready(s, id="big", memory_mib=600, restart="no")
        assert held["memory_mib"] == 600 and held["memory_source"] == "declared"
        assert held["memory_held"] is True

        status, body = await _post(s, {"id": "late", "memory_mib": 500})
        assert status == 503, body
        error = body["error"]
        assert error["code"] == "no_capacity"
        assert error["memory"] == {
            "needed_mib": 500,
            "source": "declared",
            "free_mib": 400,
            "host_memory_mib": 1000,
            "held": {"big": 600},
        }
        assert "'late' needs 500 MiB" in error["message"]
        assert "400 MiB of host_memory_mib 1000 MiB are free" in error["message"]
        assert "held by big 600 MiB" in error["message"]
        # Nothing of it is left: no record, no process, no log, no directory, no cgroup.
        async with s.get("/v1/workers/late") as r:
            assert r.status == 404
        assert _processes_of("late") == []
        assert not hive.worker_log("late").exists()
        assert not (hive.state_dir / "work" / "late").exists()
        assert not any(path.name == "worker.late" for path in hive.cgroups())

        # A stopped worker gives its memory back once its processes are gone.
        async with s.post("/v1/workers/big/stop", params={"wait": "true"}) as r:
            assert r.status == 200
            stopped = await r.json()
        assert stopped["state"] == "stopped" and stopped["memory_held"] is False
        late = await spawn_ready(s, id="late", memory_mib=500, restart="no")
        assert late["memory_mib"] == 500
        await _delete(s, "big", "late")


async def test_a_second_run_of_the_same_spawn_reserves_what_the_first_peaked_at(
    hive: Hive,
) -> None:
    spec = {"model": "learn-me", "restart": "no", "args": ["--load-seconds", "0.2"]}
    async with hive.session() as s:
        first = await spawn_ready(s, id="first", **spec)
        assert first["memory_source"] is None and first["memory_mib"] is None

        async def peaked() -> dict[str, Any] | None:
            r = await record(s, "first")
            return r if r["memory_peak_mib"] else None

        measured = await async_wait_for(peaked, what="the first run's peak")
        assert 5 < measured["memory_peak_mib"] < 500, measured
        assert measured["gpu_memory_peak_mib"] is None
        async with s.post("/v1/workers/first/stop", params={"wait": "true"}) as r:
            last = await r.json()
        peak = last["memory_peak_mib"]
        assert peak >= measured["memory_peak_mib"]  # the sample before the stop counts

        second = await spawn_ready(s, id="second", **spec)
        assert second["memory_source"] == "learned"
        assert second["memory_mib"] == peak
        # Another model, or other arguments, are another key: nothing learned for them.
        other = await spawn_ready(s, id="other", **{**spec, "args": ["--latency-ms", "5"]})
        assert other["memory_source"] is None
        await _delete(s, "first", "second", "other")

    book = json.loads((hive.state_dir / "memory.json").read_text())
    learned = {
        " ".join(e["about"]["argv"][-2:]): e
        for e in book["entries"].values()
        if e["about"]["model"] == "learn-me"
    }
    assert set(learned) == {"--load-seconds 0.2", "--latency-ms 5"}
    runs = learned["--load-seconds 0.2"]["host_mib"]
    assert len(runs) == 2 and runs[0] == peak  # first and second, each learned as it ended
    assert learned["--latency-ms 5"]["about"]["backend"] == "demo"


async def test_memory_fields_are_in_show_and_metrics(hive: Hive) -> None:
    async with hive.session() as s:
        await spawn_ready(s, id="shown", memory_mib=100, restart="no")

        async def peaked() -> bool:
            return bool((await record(s, "shown"))["memory_peak_mib"])

        await async_wait_for(peaked, what="a peak")
        async with s.get("/metrics") as r:
            metrics = await r.text()
        assert 'hive_worker_memory_reserved_mib{source="declared",worker="shown"} 100' in metrics
        assert 'hive_worker_memory_peak_mib{worker="shown"}' in metrics
        assert "hive_host_memory_budget_mib 1000.0" in metrics
        assert "hive_host_memory_reserved_mib 100.0" in metrics
        assert "hive_memory_samples_total" in metrics
        shown = hive.cli("show", "shown")
        assert shown.returncode == 0, shown.stderr
        assert "100 MiB reserved (declared)" in shown.stdout
        assert "peak" in shown.stdout
        await _delete(s, "shown")


async def test_memory_mib_is_validated(hive: Hive) -> None:
    async with hive.session() as s:
        for bad in (0, -5, True, "lots"):
            status, body = await _post(s, {"memory_mib": bad})
            assert status == 422, body
            assert "memory_mib" in body["error"]["message"]


async def test_the_cli_declares_memory(hive: Hive) -> None:
    spawned = hive.cli("spawn", "m", "--memory", "64", "--id", "by-cli", "--restart", "no")
    assert spawned.returncode == 0, spawned.stderr
    async with hive.session() as s:
        assert (await record(s, "by-cli"))["memory_mib"] == 64
        await _delete(s, "by-cli")
    refused = hive.cli("spawn", "m", "--memory", "5000", "--id", "too-big")
    assert refused.returncode == 1
    assert "needs 5000 MiB of host memory (declared)" in refused.stderr

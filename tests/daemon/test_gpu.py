"""GPUs end to end: the real daemon reads fake GPUs through the real pynvml binding (a stand-in
libnvidia-ml.so.1 compiled by the tests), places workers on them, pins and measures them."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from hivetest import Hive, running_hive

from harness.nvml import FakeGpu, FakeProc, build_fake_nvml, write_config
from harness.waits import async_wait_for

pytestmark = pytest.mark.timeout(120)

CORES = sorted(os.sched_getaffinity(0))
FIRST, LAST = CORES[0], CORES[-1]
UUID0 = "GPU-00000000-0000-0000-0000-000000000000"
UUID1 = "GPU-00000000-0000-0000-0000-000000000001"


def gpus(lost1: bool = False) -> list[FakeGpu]:
    return [
        FakeGpu(0, name="NVIDIA H100 80GB HBM3", total_mib=81920, used_mib=0, cpus=str(FIRST)),
        FakeGpu(1, name="NVIDIA A10", total_mib=23028, used_mib=0, cpus=str(LAST), lost=lost1),
    ]


class GpuHive:
    def __init__(self, hive: Hive, config: Path) -> None:
        self.hive, self.config = hive, config

    def set(self, gpu_list: list[FakeGpu], procs: list[FakeProc] | None = None) -> None:
        write_config(self.config, gpu_list, procs or [])


@pytest.fixture(scope="module")
def gpu_hive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpuHive]:
    lib = build_fake_nvml(tmp_path_factory.mktemp("nvml"))
    config = tmp_path_factory.mktemp("nvml-config") / "gpus.conf"
    write_config(config, gpus())
    env = {"LD_LIBRARY_PATH": str(lib), "FAKE_NVML_CONFIG": str(config)}
    settings = "device_refresh = 0.1\nusage_refresh = 0.1\nrestart_delay = 30\n"
    with running_hive(settings, env) as hive:
        yield GpuHive(hive, config)


async def spawn(s: aiohttp.ClientSession, **body: Any) -> tuple[int, dict[str, Any]]:
    body.setdefault("model", "m")
    body.setdefault("restart", "no")
    async with s.post("/v1/workers", params={"wait": "ready"}, json=body) as r:
        return r.status, await r.json()


async def delete(s: aiohttp.ClientSession, *ids: str) -> None:
    for worker_id in ids:
        async with s.delete(f"/v1/workers/{worker_id}") as r:
            assert r.status == 200


async def devices(s: aiohttp.ClientSession) -> dict[str, Any]:
    async with s.get("/v1/devices") as r:
        return await r.json()


async def test_devices_show_every_gpu(gpu_hive: GpuHive) -> None:
    async with gpu_hive.hive.session() as s:
        body = await devices(s)
    assert body["gpu_error"] is None
    g0, g1 = body["gpus"]
    assert g0["id"] == "GPU-0" and g0["uuid"] == UUID0 and g0["name"] == "NVIDIA H100 80GB HBM3"
    assert g0["memory_total_mib"] == 81920 and g0["memory_free_mib"] == 81920
    assert g0["pci_bus_id"] and g0["temperature_c"] == 30 and g0["power_w"] == 60.0
    assert g0["cpu_affinity"] == [FIRST] and g0["healthy"] is True
    assert g1["id"] == "GPU-1" and g1["memory_total_mib"] == 23028
    out = gpu_hive.hive.cli("devices")
    assert out.returncode == 0, out.stderr
    assert "GPU-0" in out.stdout and "NVIDIA A10" in out.stdout and "[" in out.stdout


async def test_whole_gpus_most_free_first_then_refused(gpu_hive: GpuHive) -> None:
    async with gpu_hive.hive.session() as s:
        status, a = await spawn(s, id="whole-a", device="gpu")
        assert status == 200, a
        assert a["device"] == "GPU-0" and a["gpus"] == [UUID0]  # the one with most free memory
        env = psutil.Process(a["pid"]).environ()
        assert env["CUDA_VISIBLE_DEVICES"] == UUID0 and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert env["HIVE_DEVICE"] == "GPU-0"
        # No cpus asked: it runs on GPU-0's local cores, every thread of it.
        assert a["cpus"] == [FIRST]
        async with (
            aiohttp.ClientSession() as direct,
            direct.get(f"{a['url']}/get_server_info") as r,
        ):
            info = await r.json()
        assert info["cpu_affinity"] == [FIRST]
        assert info["threads"] and all(c == [FIRST] for c in info["threads"].values())

        status, b = await spawn(s, id="whole-b", device="gpu")
        assert status == 200 and b["device"] == "GPU-1"
        status, c = await spawn(s, id="whole-c", device="gpu")
        assert status == 503, c
        message = c["error"]["message"]
        assert c["error"]["code"] == "no_capacity"
        assert "GPU-0 is held whole by whole-a" in message and "GPU-1" in message
        assert (await devices(s))["gpus"][0]["workers"] == ["whole-a"]

        # The demo backend takes a GPU when one fits ("optional"), else the CPU.
        status, d = await spawn(s, id="optional")
        assert status == 200 and d["device"].startswith("CPU-") and d["gpus"] == []
        await delete(s, "whole-a", "whole-b", "optional")


async def test_declared_memory_shares_a_gpu_until_full(gpu_hive: GpuHive) -> None:
    async with gpu_hive.hive.session() as s:
        status, a = await spawn(s, id="share-a", device="GPU-1", gpu_memory_mib=12000)
        assert status == 200 and a["device"] == "GPU-1", a
        status, b = await spawn(s, id="share-b", device=UUID1, gpu_memory_mib=11000)
        assert status == 200 and b["device"] == "GPU-1", b
        status, c = await spawn(s, id="share-c", device="GPU-1", gpu_memory_mib=100)
        assert status == 503
        assert "23000 declared" in c["error"]["message"] or "28/23028" in c["error"]["message"]
        status, whole = await spawn(s, id="share-whole", device="GPU-1")
        assert status == 503 and "shared by share-a, share-b" in whole["error"]["message"]
        await delete(s, "share-a", "share-b")


async def test_memory_used_by_other_processes_counts(gpu_hive: GpuHive) -> None:
    stranger = 999_999  # a pid that is not one of hive's workers
    gpu_hive.set(gpus(), [FakeProc(1, stranger, 20000)])
    try:
        async with gpu_hive.hive.session() as s:

            async def seen() -> bool:
                return (await devices(s))["gpus"][1]["processes"] != []

            await async_wait_for(seen, what="the foreign process in the snapshot")
            status, body = await spawn(s, id="crowded", device="GPU-1", gpu_memory_mib=4000)
            assert status == 503 and "20000 used by other processes" in body["error"]["message"]
    finally:
        gpu_hive.set(gpus())


async def test_tensor_parallel_takes_two(gpu_hive: GpuHive) -> None:
    async with gpu_hive.hive.session() as s:
        status, w = await spawn(s, id="tp2", device="gpu", gpus=2, cpus=1)
        assert status == 200, w
        assert w["device"] == "GPU-0,GPU-1" and w["gpus"] == [UUID0, UUID1]
        assert len(w["cpus"]) == 1
        env = psutil.Process(w["pid"]).environ()
        assert env["CUDA_VISIBLE_DEVICES"] == f"{UUID0},{UUID1}"
        assert env["OMP_NUM_THREADS"] == "1"
        status, body = await spawn(s, id="tp3", device="gpu", gpus=3)
        assert status == 503 and "needs 3 GPU(s)" in body["error"]["message"]
        await delete(s, "tp2")


async def test_worker_gpu_memory_rss_and_cpu_are_measured(gpu_hive: GpuHive) -> None:
    async with gpu_hive.hive.session() as s:
        # A model of its own: what it is seen to use is learned, and would stand in for the
        # GPU share of later spawns of model "m" (docs/behaviour.md), which take GPUs whole here.
        status, w = await spawn(s, id="measured", device="GPU-0", model="measured")
        assert status == 200
        gpu_hive.set(gpus(), [FakeProc(0, w["pid"], 1234)])
        try:

            async def measured() -> dict[str, Any] | None:
                async with s.get("/v1/workers/measured") as r:
                    record = await r.json()
                return record if record["gpu_memory_used_mib"] == 1234 else None

            record = await async_wait_for(measured, what="GPU memory of the worker")
            assert record["rss_bytes"] > 10_000_000 and record["cpu_percent"] is not None
        finally:
            gpu_hive.set(gpus())
        await delete(s, "measured")


async def test_a_lost_gpu_is_unhealthy_and_gets_nothing(gpu_hive: GpuHive) -> None:
    gpu_hive.set(gpus(lost1=True))
    try:
        async with gpu_hive.hive.session() as s:

            async def lost() -> dict[str, Any] | None:
                gpu1 = (await devices(s))["gpus"][1]
                return gpu1 if not gpu1["healthy"] else None

            gpu1 = await async_wait_for(lost, what="GPU-1 unhealthy")
            assert "lost" in gpu1["error"].lower()
            status, body = await spawn(s, id="on-lost", device="GPU-1")
            assert status == 503 and "GPU-1 is unhealthy" in body["error"]["message"]
            status, w = await spawn(s, id="not-lost", device="gpu", gpu_memory_mib=1000)
            assert status == 200 and w["device"] == "GPU-0"
            await delete(s, "not-lost")
    finally:
        gpu_hive.set(gpus())
    async with gpu_hive.hive.session() as s:

        async def healthy_again() -> bool:
            return bool((await devices(s))["gpus"][1]["healthy"])

        await async_wait_for(healthy_again, what="GPU-1 back")


async def test_concurrent_gpu_spawns_never_share_a_gpu(gpu_hive: GpuHive) -> None:
    async with gpu_hive.hive.session() as s:
        results = await asyncio.gather(*(spawn(s, id=f"race-{i}", device="gpu") for i in range(4)))
        made = [w for status, w in results if status == 200]
        assert len(made) == 2 and sorted(w["device"] for w in made) == ["GPU-0", "GPU-1"]
        assert sum(1 for status, _ in results if status == 503) == 2
        await delete(s, *(w["id"] for w in made))

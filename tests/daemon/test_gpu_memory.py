"""GPU memory truth through the stand-in NVML (a compiled libnvidia-ml.so.1 that the real pynvml
loads): a worker's GPU peak measured from NVML's process list, learned and standing in for a
missing ``gpu_memory_mib``, and a stopped worker's share held until NVML shows none of its
processes (the stand-in keeps listing a process after it exited until the test says otherwise),
or until ``stop_timeout`` runs out, with a sentence."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hivetest import Hive, record, running_hive

from harness.nvml import FakeGpu, FakeProc, build_fake_nvml, write_config
from harness.waits import async_wait_for

pytestmark = pytest.mark.timeout(120)

UUID1 = "GPU-00000000-0000-0000-0000-000000000001"


def gpus() -> list[FakeGpu]:
    return [FakeGpu(0, total_mib=81920), FakeGpu(1, name="NVIDIA A10", total_mib=23028)]


class GpuHive:
    def __init__(self, hive: Hive, config: Path) -> None:
        self.hive, self.config = hive, config

    def holds(self, *procs: FakeProc) -> None:
        """What NVML lists from now on (nothing: every process let its memory go)."""
        write_config(self.config, gpus(), list(procs))


@pytest.fixture(scope="module")
def gpu_hive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpuHive]:
    lib = build_fake_nvml(tmp_path_factory.mktemp("nvml"))
    config = tmp_path_factory.mktemp("nvml-config") / "gpus.conf"
    write_config(config, gpus())
    env = {"LD_LIBRARY_PATH": str(lib), "FAKE_NVML_CONFIG": str(config)}
    # The usage refresher (which also tells placement which pids are hive's) is slow on
    # purpose: only hive's own accounting may keep a second worker off memory still held.
    settings = "device_refresh = 0.1\nusage_refresh = 30\n"  # stop_timeout: 5 (harness)
    with running_hive(settings, env) as hive:
        yield GpuHive(hive, config)


async def _spawn(s: aiohttp.ClientSession, **body: Any) -> tuple[int, dict[str, Any]]:
    body = {"model": "m", "restart": "no", **body}
    async with s.post("/v1/workers", params={"wait": "ready"}, json=body) as r:
        return r.status, await r.json()


async def _delete(s: aiohttp.ClientSession, *ids: str) -> None:
    for worker_id in ids:
        async with s.delete(f"/v1/workers/{worker_id}") as r:
            assert r.status == 200, await r.text()


async def _gpu_peak(s: aiohttp.ClientSession, worker_id: str, mib: int) -> dict[str, Any]:
    async def measured() -> dict[str, Any] | None:
        r = await record(s, worker_id)
        return r if r["gpu_memory_peak_mib"] == mib else None

    return await async_wait_for(measured, what=f"{worker_id}'s GPU peak of {mib} MiB")


async def test_a_gpu_share_is_held_until_nvml_shows_the_memory_back(gpu_hive: GpuHive) -> None:
    async with gpu_hive.hive.session() as s:
        status, a = await _spawn(s, id="holder", device="GPU-1", gpu_memory_mib=20000)
        assert status == 200, a
        assert a["gpu_memory_mib"] == 20000 and a["memory_source"] == "declared"
        gpu_hive.holds(FakeProc(1, a["pid"], 20000))
        try:
            await _gpu_peak(s, "holder", 20000)
            async with s.post("/v1/workers/holder/stop") as r:  # no wait: it answers at once
                assert r.status == 200

            async def stopped() -> dict[str, Any] | None:
                r = await record(s, "holder")
                return r if r["state"] == "stopped" else None

            held = await async_wait_for(stopped, what="holder stopped")
            # Its process is gone, but NVML still lists it with its memory: the share holds.
            assert held["pid"] is None and held["memory_held"] is True
            status, refused = await _spawn(s, id="next", device="GPU-1", gpu_memory_mib=10000)
            assert status == 503, refused
            message = refused["error"]["message"]
            assert "20000 declared by hive's workers, holder 20000" in message
            shown = gpu_hive.hive.cli("show", "holder")
            assert "still held: its memory is not back yet" in shown.stdout
        finally:
            gpu_hive.holds()  # the memory comes back

        async def released() -> bool:
            return (await record(s, "holder"))["memory_held"] is False

        await async_wait_for(released, what="holder's share released")
        status, after = await _spawn(s, id="next", device="GPU-1", gpu_memory_mib=10000)
        assert status == 200, after
        await _delete(s, "holder", "next")


async def test_memory_never_back_is_released_after_stop_timeout_with_a_sentence(
    gpu_hive: GpuHive,
) -> None:
    async with gpu_hive.hive.session() as s:
        status, a = await _spawn(s, id="stuck", device="GPU-1", gpu_memory_mib=15000)
        assert status == 200, a
        pid = a["pid"]
        gpu_hive.holds(FakeProc(1, pid, 15000))
        try:
            await _gpu_peak(s, "stuck", 15000)
            async with s.post("/v1/workers/stuck/stop", params={"wait": "true"}) as r:
                stopped = await r.json()
            # stop_timeout (5 s) ran out: released, and the hive says why in the worker's log.
            assert stopped["state"] == "stopped" and stopped["memory_held"] is False
            log = gpu_hive.hive.worker_log("stuck").read_text()
            assert f"memory: after 5s, GPU-1 still lists pid {pid} (15000 MiB)" in log
            # What NVML still lists is memory used by another process now.
            status, body = await _spawn(s, id="crowd", device="GPU-1", gpu_memory_mib=10000)
            assert status == 503 and "15000 used by other processes" in body["error"]["message"]
        finally:
            gpu_hive.holds()
        await _delete(s, "stuck")


async def test_a_learned_gpu_figure_stands_in_for_a_missing_share(gpu_hive: GpuHive) -> None:
    spec = {"model": "gpu-learner", "device": "GPU-1"}
    async with gpu_hive.hive.session() as s:
        status, first = await _spawn(s, id="learner", **spec)
        assert status == 200, first
        assert first["gpu_memory_mib"] is None  # nothing known: it holds GPU-1 whole
        gpu_hive.holds(FakeProc(1, first["pid"], 3000))
        try:
            await _gpu_peak(s, "learner", 3000)
        finally:
            gpu_hive.holds()
        await _delete(s, "learner")

        status, second = await _spawn(s, id="learner", **spec)
        assert status == 200, second
        assert second["gpu_memory_mib"] == 3000 and second["memory_source"] == "learned"
        # It shares GPU-1 now: another worker fits beside it.
        status, beside = await _spawn(s, id="beside", device="GPU-1", gpu_memory_mib=15000)
        assert status == 200, beside
        status, over = await _spawn(s, id="over", device=UUID1, gpu_memory_mib=6000)
        assert status == 503 and "learner 3000" in over["error"]["message"], over
        await _delete(s, "learner", "beside")

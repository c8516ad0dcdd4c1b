"""``make gpu-check``: hive's GPU path against this host's GPU, or against the stand-in NVML.

With an NVIDIA GPU and its driver (``nvidia-smi`` on the PATH, ``libcuda.so.1`` loadable), it
runs a real ``hive serve`` from the project's venv, needing nothing from the network, and checks
on GPU 0:

1. ``GET /v1/devices`` agrees with ``nvidia-smi --query-gpu``: name, UUID, memory total and
   used (within a tolerance: other processes may allocate between the two reads);
2. a real GPU worker (gpu/vram_worker.py: allocates VRAM through the CUDA driver API) spawned on
   ``GPU-0`` sees exactly that GPU's UUID, and NVML attributes its memory to it in its record;
3. two such workers share the GPU by declared memory, and a third that does not fit is a 503;
4. after a stop, and after a SIGKILL, the GPU lists none of the worker's processes and its
   memory is back, timed from the stop or the kill.

It prints a table of these figures and exits 0 only when every check passed. Without a GPU (or
with ``--stand-in``) it runs the same checks against the stand-in ``libnvidia-ml.so.1`` that
the tests compile, playing the driver itself, and says so: the suite runs it that way
(tests/daemon/test_gpu_check.py), so the script is ready for the first host with a GPU.

    python gpu/check.py [--stand-in] [--json FILE] [--mib 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # harness/, shared with the tests

import psutil  # noqa: E402

from harness.daemon import Hive  # noqa: E402
from harness.nvml import FakeGpu, FakeProc, build_fake_nvml, env_for, write_config  # noqa: E402
from harness.procs import Tag, sweep  # noqa: E402

TAG = Tag.new("HIVE_GPU_CHECK_TAG", "hive-gpu-check")
WORKER = ROOT / "gpu" / "vram_worker.py"
#: How far hive's and nvidia-smi's reading of used memory may differ (they are not taken at the
#: same instant), and how close to the baseline freed memory must come.
USED_TOLERANCE_MIB = 256


@dataclass
class Gpu:
    index: int
    name: str
    uuid: str
    total_mib: int
    used_mib: int


class Driver:
    """What the GPU's driver says: ``nvidia-smi`` on a real host."""

    kind = "NVIDIA driver (nvidia-smi)"

    def hive_env(self) -> dict[str, str]:
        return {}

    def worker_args(self) -> list[str]:
        return []

    def _smi(self, *query: str) -> list[list[str]]:
        out = subprocess.run(
            ["nvidia-smi", *query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line]

    def gpus(self) -> list[Gpu]:
        rows = self._smi("--query-gpu=index,name,uuid,memory.total,memory.used")
        return [
            Gpu(int(i), name, uuid, int(total), int(used)) for i, name, uuid, total, used in rows
        ]

    def pids_on(self, uuid: str) -> set[int]:
        rows = self._smi("--query-compute-apps=gpu_uuid,pid")
        return {int(pid) for gpu, pid in rows if gpu == uuid}

    def started(self, pid: int, gpu: Gpu, mib: int) -> None:
        """A worker allocated ``mib`` on ``gpu`` (the real driver knows without being told)."""

    def settle(self) -> None:
        """Let the driver's view catch up with processes that ended (the real one does)."""

    def close(self) -> None:
        pass


class StandInDriver(Driver):
    """The stand-in NVML, with this script in the driver's part: a worker's memory is listed on
    its GPU while its process lives, and freed when it ends."""

    kind = "stand-in NVML (harness/fake_nvml.c): no NVIDIA GPU was used"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hive-gpu-check-"))
        self.lib = build_fake_nvml(self.dir / "lib")
        self.config = self.dir / "nvml.conf"
        self.gpu = FakeGpu(0, name="NVIDIA H200", total_mib=143_771, used_mib=0)
        self.held: dict[int, int] = {}  # pid -> MiB
        self._write()

    def _write(self) -> None:
        used = sum(self.held.values())
        gpu = FakeGpu(**{**self.gpu.__dict__, "used_mib": used})
        write_config(self.config, [gpu], [FakeProc(0, pid, mib) for pid, mib in self.held.items()])

    def hive_env(self) -> dict[str, str]:
        env = env_for(self.lib, self.config)
        return {k: env[k] for k in ("LD_LIBRARY_PATH", "FAKE_NVML_CONFIG")}

    def worker_args(self) -> list[str]:
        return ["--stand-in"]

    def gpus(self) -> list[Gpu]:
        self.settle()
        uuid = self.gpu.uuid or f"GPU-00000000-0000-0000-0000-{0:012x}"
        return [Gpu(0, self.gpu.name, uuid, self.gpu.total_mib, sum(self.held.values()))]

    def pids_on(self, uuid: str) -> set[int]:
        self.settle()
        return set(self.held)

    def started(self, pid: int, gpu: Gpu, mib: int) -> None:
        self.held[pid] = mib
        self._write()

    def settle(self) -> None:
        gone = [pid for pid in self.held if not _alive(pid)]
        for pid in gone:
            del self.held[pid]
        if gone:
            self._write()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        import ctypes

        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@dataclass
class Report:
    driver: str
    rows: list[tuple[str, bool, str]] = field(default_factory=list)

    def add(self, check: str, ok: bool, figure: str) -> bool:
        self.rows.append((check, ok, figure))
        print(f"  {'ok  ' if ok else 'FAIL'} {check}: {figure}", flush=True)
        return ok

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(ok for _, ok, _ in self.rows)

    def table(self) -> str:
        width = max(len(check) for check, _, _ in self.rows)
        lines = [f"{'check'.ljust(width)}  result  figure", f"{'-' * width}  ------  ------"]
        lines += [
            f"{check.ljust(width)}  {'ok' if ok else 'FAIL':6}  {figure}"
            for check, ok, figure in self.rows
        ]
        return "\n".join(lines)


async def until(condition: Callable[[], Awaitable[Any] | Any], timeout: float) -> float | None:
    """Seconds until ``condition`` holds (polled every 20 ms), or None past ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.monotonic() - start
        await asyncio.sleep(0.02)
    return None


def hive_config() -> str:
    command = ["{python}", str(WORKER), "--port", "{port}"]
    return (
        "usage_refresh = 0.25\ndevice_refresh = 0.25\n"
        "[backends.vram]\n"
        f"command = {json.dumps(command)}\n"
        'gpu = true\nhealth_path = "/health"\nstartup_timeout = 60\n'
    )


async def run(driver: Driver, mib: int) -> Report:
    report = Report(driver.kind)
    hive = Hive(hive_config(), driver.hive_env(), tag=TAG)
    try:
        await hive.start_async()
        await checks(hive, driver, report, mib)
    except Exception as exc:  # a check that could not run is a failed check, said as such
        report.add("the checks ran to the end", False, f"{type(exc).__name__}: {exc}"[:400])
    finally:
        await hive.close()
        hive.cleanup()
        left = sweep(TAG)
        report.add("nothing left running", not left, ", ".join(left) or "no process")
    return report


async def checks(hive: Hive, driver: Driver, report: Report, mib: int) -> None:
    # 1. hive's devices against the driver's.
    smi = driver.gpus()[0]
    devices = await hive.call("GET", "/v1/devices")
    mine = next((g for g in devices["gpus"] if g["uuid"] == smi.uuid), None)
    if not report.add("GPU-0 in hive devices", mine is not None, smi.uuid):
        return
    report.add("name", mine["name"] == smi.name, f"hive {mine['name']!r}, driver {smi.name!r}")
    total_gap = abs((mine["memory_total_mib"] or 0) - smi.total_mib)
    report.add("memory total", total_gap <= 1, f"{mine['memory_total_mib']} MiB (Δ {total_gap})")
    used_gap = abs((mine["memory_used_mib"] or 0) - smi.used_mib)
    report.add(
        "memory used",
        used_gap <= USED_TOLERANCE_MIB,
        f"hive {mine['memory_used_mib']} MiB, driver {smi.used_mib} MiB (Δ {used_gap})",
    )
    baseline = smi.used_mib

    # 2. A worker on GPU-0 sees that GPU, and its memory is attributed to it.
    share = smi.total_mib * 2 // 5
    spec = {
        "model": "vram",
        "backend": "vram",
        "device": "GPU-0",
        "gpu_memory_mib": share,
        "restart": "no",
        "args": ["--mib", str(mib), *driver.worker_args()],
    }
    a = await hive.spawn({**spec, "id": "gpu-a"}, wait=True)
    driver.started(a["pid"], smi, mib)
    seen = await _worker_health(a["url"])
    report.add("worker sees GPU-0's UUID", seen.get("uuid") == smi.uuid, str(seen.get("uuid")))

    async def attributed() -> dict[str, Any] | None:
        record = await hive.call("GET", "/v1/workers/gpu-a")
        used = record.get("gpu_memory_used_mib") or 0
        return record if used >= mib else None

    took = await until(attributed, 30)
    record = await hive.call("GET", "/v1/workers/gpu-a")
    report.add(
        "record's GPU memory",
        took is not None,
        f"{record.get('gpu_memory_used_mib')} MiB for {mib} MiB allocated"
        + (f", {took:.2f} s after ready" if took is not None else ", never"),
    )

    # 3. Two share the GPU by declared memory; a third does not fit.
    b = await hive.spawn({**spec, "id": "gpu-b"}, wait=True)
    driver.started(b["pid"], smi, mib)
    async with hive.http().post("/v1/workers", json={**spec, "id": "gpu-c"}) as r:
        refused = await r.json(content_type=None)
        message = (refused.get("error") or {}).get("message", "")
        report.add(
            f"two of {share} MiB share, a third is refused",
            r.status == 503,
            f"HTTP {r.status}: {message[:120]}",
        )

    # 4. Stop, then SIGKILL: the worker's processes leave the GPU and the memory comes back.
    async def freed(pid: int, expected_used: int) -> bool:
        driver.settle()
        gpu = driver.gpus()[0]
        return pid not in driver.pids_on(gpu.uuid) and gpu.used_mib <= expected_used

    start = time.monotonic()
    await hive.stop_worker("gpu-a")
    after_b = baseline + mib + 1024  # b still holds its memory and its CUDA context
    took = await until(lambda: freed(a["pid"], after_b), 60)
    _freed_row(report, "after stop", took, time.monotonic() - start)

    start = time.monotonic()
    os.kill(b["pid"], signal.SIGKILL)
    took = await until(lambda: freed(b["pid"], baseline + USED_TOLERANCE_MIB), 60)
    _freed_row(report, "after SIGKILL", took, time.monotonic() - start)

    async def failed() -> bool:
        return (await hive.call("GET", "/v1/workers/gpu-b"))["state"] == "failed"

    report.add("SIGKILL makes the record failed", await until(failed, 30) is not None, "failed")
    for worker_id in ("gpu-a", "gpu-b"):
        await hive.call("DELETE", f"/v1/workers/{worker_id}")


def _freed_row(report: Report, when: str, took: float | None, total: float) -> None:
    figure = f"{total:.2f} s from the request" if took is not None else "not within 60 s"
    report.add(f"GPU memory back and no process {when}", took is not None, figure)


async def _worker_health(url: str) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as c, c.get(f"{url}/health") as r:
        return dict(await r.json())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stand-in", action="store_true", help="use the stand-in NVML")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--mib", type=int, default=1024, help="VRAM each worker holds (MiB)")
    args = parser.parse_args(argv)
    stand_in = args.stand_in or not has_gpu()
    driver: Driver = StandInDriver() if stand_in else Driver()
    print(f"gpu-check: against the {driver.kind}", flush=True)
    started = time.monotonic()
    try:
        report = asyncio.run(run(driver, args.mib))
    finally:
        driver.close()
    print(f"\ngpu-check: {driver.kind}, {time.monotonic() - started:.1f} s\n{report.table()}")
    if args.json is not None:
        rows = [{"check": c, "ok": ok, "figure": f} for c, ok, f in report.rows]
        args.json.write_text(json.dumps({"driver": driver.kind, "rows": rows}, indent=2) + "\n")
    print("gpu-check: " + ("every check passed" if report.ok else "FAILED"))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

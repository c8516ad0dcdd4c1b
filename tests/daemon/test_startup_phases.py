"""Where a start-up went, through a real daemon and the demo worker's log lines: the record's
``startup`` has hive's own work, the process starting, the worker's phases from its log (its
listener up, its model loaded), and the readiness probe's lag, in order, summing to the time
from the spawn to ready; a restart has its own; ``hive show`` prints them and ``/metrics`` has
``hive_startup_phase_seconds``. The real engines: tests/external/test_vllm_stall.py and
tests/external/test_llama_phases.py."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from hivetest import Hive, record, running_hive, spawn_ready

from harness.waits import async_wait_for

pytestmark = pytest.mark.timeout(120)

CONFIG = """
restart_delay = 0.2
"""


@pytest.fixture(scope="module")
def hive() -> Iterator[Hive]:
    with running_hive(CONFIG) as daemon:
        yield daemon


def _at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def names(worker: dict[str, Any]) -> list[str]:
    return [p["phase"] for p in worker["startup"]]


async def with_probe(s: Any, worker_id: str, restarts: int = 0) -> dict[str, Any]:
    """The record once its start-up is known up to ready (published just after ready)."""

    async def known() -> dict[str, Any] | None:
        r = await record(s, worker_id)
        return r if r["restarts"] == restarts and names(r)[-1:] == ["probe"] else None

    return dict(await async_wait_for(known, timeout=60, what=f"{worker_id}'s start-up"))


async def test_the_phases_of_a_start_sum_to_its_time_to_ready(hive: Hive) -> None:
    args = ["--load-seconds", "1.5", "--no-heartbeat"]
    async with hive.session() as s:
        await spawn_ready(s, id="phased", args=args)
        worker = await with_probe(s, "phased")
        assert names(worker) == ["hive", "process", "listening", "model", "probe"]
        seconds = {p["phase"]: p["seconds"] for p in worker["startup"]}
        assert all(value >= 0 for value in seconds.values())
        assert seconds["model"] >= 1.0  # its --load-seconds, less a poll of the log at most
        to_ready = _at(worker["ready_at"]) - _at(worker["created_at"])
        total = sum(seconds.values())
        print(f"\ndemo start-up: {worker['startup']} (spawn to ready {to_ready:.3f} s)")
        assert abs(total - to_ready) <= 0.05 * to_ready

        # A restart (SIGKILL, policy on-failure) is an attempt of its own, with its own phases.
        os.kill(worker["pid"], signal.SIGKILL)
        again = await with_probe(s, "phased", restarts=1)
        assert names(again) == ["hive", "process", "listening", "model", "probe"]

        shown = hive.cli("show", "phased")
        assert shown.returncode == 0, shown.stderr
        shown = shown.stdout
        line = next(line for line in shown.splitlines() if line.startswith("startup"))
        assert "s to ready: hive " in line and ", model 1." in line and "probe " in line

        async with s.get("/metrics") as r:
            metrics = await r.text()
        for phase in ("hive", "process", "listening", "model", "probe"):
            sample = f'hive_startup_phase_seconds_count{{backend="demo",phase="{phase}"}}'
            counts = [ln for ln in metrics.splitlines() if ln.startswith(sample)]
            assert counts and float(counts[0].split()[-1]) >= 2.0, phase
        async with s.delete("/v1/workers/phased") as r:
            assert r.status == 200


async def test_a_start_in_progress_and_phases_in_the_engines_order(hive: Hive) -> None:
    # While it loads (silent, and not listening yet), the record already says how far the
    # start-up got.
    async with hive.session() as s:
        body = {
            "model": "m",
            "id": "beating",
            "args": ["--load-seconds", "3", "--listen-after-load"],
        }
        async with s.post("/v1/workers", json=body) as r:
            assert r.status == 201, await r.text()

        async def loading() -> dict[str, Any] | None:
            r = await record(s, "beating")
            return r if r["state"] == "starting" and names(r) == ["hive"] else None

        await async_wait_for(loading, timeout=30, what="the start-up so far")
        worker = await with_probe(s, "beating")
        # Listening only once loaded, as vLLM does: the lines come in that order.
        assert names(worker) == ["hive", "process", "model", "listening", "probe"]
        async with s.delete("/v1/workers/beating") as r:
            assert r.status == 200

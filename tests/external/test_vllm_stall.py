"""What only the real vLLM can tell (its CPU build, 0.32.0, under the built-in ``vllm`` backend
with a short ``stall_timeout``): its start-up phases, read from its log as it writes it, and a
half-alive engine (EngineCore SIGSTOPped with a stream in flight, while ``/health`` and
``/metrics`` answer) failed ``stalled:`` within ``stall_timeout`` and one load period.

``make test`` installs vLLM once and names its ``vllm`` command in ``HIVE_VLLM`` (as for
tests/external/test_vllm.py, whose shared worker this module does not touch: its own hive, its
own worker, spawned once for both tests, with ``restart = "no"``, so the stall costs no second
start of minutes; the restart after a stall is checked with the demo worker in
tests/daemon/test_stall.py).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from hivetest import Hive, record, running_hive
from routers import Router, router_config
from vllms import needs_vllm

from harness.waits import async_wait_for

WORKER = "vs"
TESTS = Path(__file__).parent.parent
STALL = 10.0  # stall_timeout: the engine's counters move every few ms while it works
PERIOD = 2.0  # the built-in load.period
POLL = 0.2  # the host has few cores, and vLLM needs them

pytestmark = [
    pytest.mark.timeout(900),
    needs_vllm,
]


@pytest.fixture(scope="module")
def hive(vllm: Path, router: Router, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hive]:
    env = {
        "PATH": f"{vllm.parent}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
        "VLLM_CACHE_ROOT": str(tmp_path_factory.mktemp("vllm-cache")),
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    config = router_config(router) + f"\n[backends.vllm]\nstall_timeout = {STALL}\n"
    with running_hive(config, env=env) as daemon:
        yield daemon


def _at(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def worker(s: aiohttp.ClientSession, model: Path) -> dict[str, Any]:
    """The module's worker, ready (spawned by the first test that asks)."""
    async with s.get(f"/v1/workers/{WORKER}") as r:
        if r.status == 200 and (await r.json())["state"] in ("ready", "busy"):
            return dict(await r.json())
    body = {"model": str(model), "backend": "vllm", "id": WORKER, "restart": "no"}
    params = {"wait": "ready", "timeout": "800"}
    async with s.post("/v1/workers", params=params, json=body, timeout=None) as r:
        answer = await r.json()
        assert r.status == 200, answer
        return dict(answer)


def engine_core(pid: int) -> psutil.Process:
    for child in psutil.Process(pid).children():
        if "EngineCore" in child.name():
            return child
    raise AssertionError(f"no EngineCore under {pid}: {psutil.Process(pid).children()}")


async def test_start_up_phases_from_vllms_log(hive: Hive, model: Path) -> None:
    async with hive.session() as s:
        await worker(s, model)

        async def registered() -> dict[str, Any] | None:
            r = await record(s, WORKER)
            return r if [p["phase"] for p in r["startup"]][-1:] == ["register"] else None

        w = await async_wait_for(registered, timeout=120, interval=POLL, what="registered")
    phases = [p["phase"] for p in w["startup"]]
    print("\nvLLM start-up: " + ", ".join(f"{p['phase']} {p['seconds']:.2f}" for p in w["startup"]))
    # vLLM 0.32's CPU build: no "Model loading took" nor graph capture, compile is its warm-up.
    assert phases == [
        "hive", "process", "engine", "weights", "compile", "kv cache", "engine ready",
        "api server", "listening", "probe", "register",
    ]  # fmt: skip
    to_ready = _at(w["ready_at"]) - _at(w["created_at"])
    total = sum(p["seconds"] for p in w["startup"] if p["phase"] != "register")
    print(f"sum {total:.2f} s, spawn to ready {to_ready:.2f} s")
    assert abs(total - to_ready) <= 0.05 * to_ready


async def test_sigstopped_engine_core_with_a_stream_in_flight_is_stalled(
    hive: Hive, model: Path
) -> None:
    async with hive.session() as s:
        w = await worker(s, model)
        core = engine_core(w["pid"])
        tree = {psutil.Process(w["pid"]), *psutil.Process(w["pid"]).children(recursive=True)}
        timeout = aiohttp.ClientTimeout(total=STALL * 10)
        body = {"model": str(model), "prompt": "hello", "max_tokens": 4000, "ignore_eos": True}
        async with (
            aiohttp.ClientSession(timeout=timeout) as c,
            c.post(f"{w['url']}/v1/completions", json={**body, "stream": True}) as stream,
        ):
            assert stream.status == 200
            async for line in stream.content:  # it runs: tokens come
                if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    break

            async def busy() -> bool:
                return (await record(s, WORKER))["state"] == "busy"

            await async_wait_for(busy, timeout=60, interval=POLL, what="busy")
            core.send_signal(signal.SIGSTOP)
            stopped = time.time()
            try:
                async with (
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as c2,
                    c2.get(f"{w['url']}/health") as r,
                ):
                    assert r.status == 200  # half-alive: it says it is healthy

                async def failed() -> dict[str, Any] | None:
                    r = await record(s, WORKER)
                    return r if r["state"] == "failed" else None

                gone = await async_wait_for(
                    failed, timeout=STALL * 6, interval=0.05, what="failed as stalled"
                )
            finally:
                if core.is_running():
                    core.send_signal(signal.SIGCONT)
    detected = _at(gone["stopped_at"]) - stopped
    print(f"\nvLLM stall detected {detected:.2f} s after SIGSTOP (stall_timeout {STALL:g} s)")
    assert gone["error"].startswith("stalled: 1 request in flight and no progress for 10s")
    assert STALL - PERIOD <= detected <= STALL + PERIOD + 3.0  # the timeout, a period, slack
    # Nothing of it is left (SIGKILL ends a stopped process), and it was not restarted.
    await async_wait_for(
        lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree),
        timeout=60,
        what="the stopped tree ended",
    )
    async with hive.session() as s:
        assert (await record(s, WORKER))["restarts"] == 0
        async with s.delete(f"/v1/workers/{WORKER}") as r:
            assert r.status == 200

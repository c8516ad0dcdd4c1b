"""What only the real llama-server can tell (the built binary, under the built-in
``llama-server`` backend with a short ``stall_timeout``): its start-up phases, read from its
log as it writes it, up to its registration with a real sglang-router; and a long generation
at full load, every slot busy for many times ``stall_timeout``, never taken for a stall (its
slots' token counts are its progress). ``HIVE_STALL_SOAK`` sets how long that runs (seconds,
default 40)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tiny_gguf
from hivetest import Hive, record, running_hive, spawn_ready
from routers import Router, router_config

from harness.waits import async_wait_for

LLAMA_SERVER = os.environ.get("HIVE_LLAMA_SERVER", "")
STALL = 2.0  # stall_timeout
SOAK = float(os.environ.get("HIVE_STALL_SOAK", "40"))

pytestmark = [
    pytest.mark.timeout(SOAK + 180),
    pytest.mark.skipif(
        not LLAMA_SERVER,
        reason="HIVE_LLAMA_SERVER is unset: `make test` builds llama-server and sets it "
        "(or run `python engines/llama_server.py build` and export the path it prints)",
    ),
]


@pytest.fixture(scope="module")
def binary() -> Path:
    path = Path(LLAMA_SERVER)
    assert path.name == "llama-server", f"HIVE_LLAMA_SERVER={LLAMA_SERVER} is not a llama-server"
    assert os.access(path, os.X_OK), f"HIVE_LLAMA_SERVER={LLAMA_SERVER} is not executable"
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 32k context: a request of thousands of tokens runs for seconds."""
    return tiny_gguf.write(tmp_path_factory.mktemp("llama") / "long.gguf", context=32768)


@pytest.fixture(scope="module")
def hive(binary: Path, router: Router) -> Iterator[Hive]:
    path = f"{binary.parent}{os.pathsep}{os.environ.get('PATH', os.defpath)}"
    config = router_config(router) + f"\n[backends.llama-server]\nstall_timeout = {STALL}\n"
    with running_hive(config, env={"PATH": path}) as daemon:
        yield daemon


def _at(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def test_start_up_phases_from_llama_servers_log(hive: Hive, model: Path) -> None:
    async with hive.session() as s:
        await spawn_ready(s, model=str(model), backend="llama-server", id="lp")

        async def registered() -> dict[str, Any] | None:
            r = await record(s, "lp")
            return r if [p["phase"] for p in r["startup"]][-1:] == ["register"] else None

        w = await async_wait_for(registered, timeout=60, what="registered with the router")
        async with s.delete("/v1/workers/lp") as r:
            assert r.status == 200
    print("\nllama-server start-up: " + ", ".join(
        f"{p['phase']} {p['seconds']:.3f}" for p in w["startup"]
    ))  # fmt: skip
    phases = [p["phase"] for p in w["startup"]]
    assert phases == [
        "hive", "process", "init", "model", "listening", "probe", "register",
    ]  # fmt: skip
    to_ready = _at(w["ready_at"]) - _at(w["created_at"])
    total = sum(p["seconds"] for p in w["startup"] if p["phase"] != "register")
    print(f"sum {total:.3f} s, spawn to ready {to_ready:.3f} s")
    assert abs(total - to_ready) <= 0.05 * to_ready


async def test_every_slot_busy_for_long_is_never_stalled(hive: Hive, model: Path) -> None:
    async with hive.session() as s:
        w = await spawn_ready(
            s, model=str(model), backend="llama-server", id="soak", args=["--parallel", "2"]
        )
        timeout = aiohttp.ClientTimeout(total=SOAK + 120)
        body = {"prompt": "hello", "n_predict": 300, "ignore_eos": True}
        end = time.monotonic() + SOAK
        generated = 0

        async def keep_busy(c: aiohttp.ClientSession) -> None:
            nonlocal generated
            while time.monotonic() < end:  # one slot, busy again as soon as it is done
                async with c.post(f"{w['url']}/completion", json=body) as r:
                    assert r.status == 200, await r.text()
                    generated += (await r.json())["tokens_predicted"]

        states: set[str] = set()

        async def watch() -> None:
            while time.monotonic() < end:
                states.add((await record(s, "soak"))["state"])
                await asyncio.sleep(0.5)

        # A connection per request: llama-server closes one idle for 5 s, and a request sent
        # on it just then would fail on the client's side.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as c:
            await asyncio.gather(keep_busy(c), keep_busy(c), watch())
    async with hive.session() as s:  # anew: hive drops an API connection idle for 10 s
        after = await record(s, "soak")
        async with s.delete("/v1/workers/soak") as r:
            assert r.status == 200
    print(
        f"\nllama-server: both slots busy for {SOAK:g} s ({generated} tokens), "
        f"stall_timeout {STALL:g} s: states seen {sorted(states)}, "
        f"restarts {after['restarts']}, error {after['error']}"
    )
    assert "busy" in states and "failed" not in states
    assert (after["restarts"], after["error"], after["pid"]) == (0, None, w["pid"])

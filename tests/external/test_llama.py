"""A real llama.cpp ``llama-server`` under hive's built-in ``llama-server`` backend, unchanged.

``make test`` builds the binary once (engines/llama_server.py, cached outside the checkout) and
names it in ``HIVE_LLAMA_SERVER``; hive finds it on its ``PATH``. The model is a tiny random
llama written at test time (tests/tiny_gguf.py): it loads in well under a second and generates
garbage, which is all these tests need of it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import tiny_gguf
from hivetest import TAG, Hive, record, running_hive, spawn_ready
from routers import Router, router_config

from harness.procs import tagged_processes
from harness.waits import async_wait_for
from hive.models import MARKER

LLAMA_SERVER = os.environ.get("HIVE_LLAMA_SERVER", "")

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not LLAMA_SERVER,
        reason="HIVE_LLAMA_SERVER is unset: `make test` builds llama-server and sets it "
        "(or run `python engines/llama_server.py build` and export the path it prints)",
    ),
]


@pytest.fixture(scope="module")
def binary() -> Path:
    path = Path(LLAMA_SERVER)
    # Set but wrong is a failure, not a skip: `make test` must always provide it.
    assert path.name == "llama-server", f"HIVE_LLAMA_SERVER={LLAMA_SERVER} is not a llama-server"
    assert os.access(path, os.X_OK), f"HIVE_LLAMA_SERVER={LLAMA_SERVER} is not executable"
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf.write(tmp_path_factory.mktemp("llama") / "tiny.gguf")


@pytest.fixture(scope="module")
def hive(binary: Path, router: Router) -> Iterator[Hive]:
    # The built-in backend runs `llama-server` by name: put the built one first on hive's PATH.
    path = f"{binary.parent}{os.pathsep}{os.environ.get('PATH', os.defpath)}"
    with running_hive(router_config(router), env={"PATH": path}) as daemon:
        yield daemon


async def spawn(s: aiohttp.ClientSession, model: Path | str, **body: Any) -> dict[str, Any]:
    return await spawn_ready(s, model=str(model), backend="llama-server", **body)


async def remove(s: aiohttp.ClientSession, worker_id: str) -> None:
    async with s.delete(f"/v1/workers/{worker_id}") as r:
        assert r.status == 200, await r.text()


async def post(base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as c, c.post(base + path, json=body) as r:
        text = await r.text()
        assert r.status == 200, f"POST {base}{path}: {r.status} {text}"
        return dict(await r.json(content_type=None))


async def generates(base: str, model: Path, native: bool = True) -> None:
    """llama-server's own completion endpoint and both OpenAI ones answer with generated text."""
    if native:
        native_body = {"prompt": "hello world", "n_predict": 4, "ignore_eos": True}
        body = await post(base, "/completion", native_body)
        assert isinstance(body["content"], str)
        assert body["tokens_predicted"] == 4
    # A random model samples `</s>` early now and then: ignore_eos makes the count exact.
    common = {"model": str(model), "max_tokens": 4, "ignore_eos": True}
    body = await post(base, "/v1/completions", {**common, "prompt": "hello"})
    assert body["object"] == "text_completion"
    assert isinstance(body["choices"][0]["text"], str)
    assert body["usage"]["completion_tokens"] == 4
    chat = {**common, "messages": [{"role": "user", "content": "hello"}]}
    body = await post(base, "/v1/chat/completions", chat)
    assert body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] == 4
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(body["choices"][0]["message"]["content"], str)


async def in_router(router: Router, url: str, present: bool = True) -> bool:
    return (url in await router.urls()) is present


def worker_processes(worker_id: str) -> list[int]:
    """The live processes of one worker, by the containment tag hive gives them."""
    pids = []
    for proc in tagged_processes(TAG):
        try:
            if proc.environ().get("HIVE_WORKER_ID") == worker_id:
                pids.append(proc.pid)
        except psutil.Error:  # gone, or not ours to read
            continue
    return pids


async def test_spawn_is_ready_by_its_health_and_generates(hive: Hive, model: Path) -> None:
    async with hive.session() as s:
        w = await spawn(s, model, id="ll-ready")
        try:
            assert w["state"] == "ready"
            assert w["backend"] == "llama-server"
            assert w["pid"] in worker_processes("ll-ready")
            # Ready means the engine's own /health answers 200 (it is 503 while loading).
            async with aiohttp.ClientSession() as c, c.get(f"{w['url']}/health") as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["status"] == "ok"
            await generates(w["url"], model)
            log = hive.worker_log("ll-ready").read_text(errors="replace")
            assert f"--model {model}" in log and "--threads" in log  # the built-in argv
        finally:
            await remove(s, "ll-ready")


async def test_through_the_router(hive: Hive, router: Router, model: Path) -> None:
    async with hive.session() as s:
        w = await spawn(s, model, id="ll-routed")
        try:
            await async_wait_for(lambda: in_router(router, w["url"]), what="registered")
            await generates(router.url, model, native=False)
        finally:
            await remove(s, "ll-routed")
        await async_wait_for(lambda: in_router(router, w["url"], False), what="removed")


async def test_sigkill_leaves_the_router_and_hive_restarts_it(
    hive: Hive, router: Router, model: Path
) -> None:
    async with hive.session() as s:
        w = await spawn(s, model, id="ll-kill")
        try:
            await async_wait_for(lambda: in_router(router, w["url"]), what="registered")
            os.kill(w["pid"], signal.SIGKILL)
            await async_wait_for(lambda: in_router(router, w["url"], False), what="out of router")

            async def restarted() -> dict[str, Any] | None:
                now = await record(s, "ll-kill")
                ok = now["state"] == "ready" and now["restarts"] >= 1 and now["pid"] != w["pid"]
                return now if ok else None

            again = await async_wait_for(restarted, timeout=30, what="restarted and ready")
            assert again["url"] == w["url"]  # same port, same router entry
            await async_wait_for(lambda: in_router(router, w["url"]), what="registered again")
            await generates(w["url"], model, native=False)
        finally:
            await remove(s, "ll-kill")


async def test_a_missing_model_fails_with_the_engines_own_error(hive: Hive, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model.gguf"
    body = {"model": str(missing), "backend": "llama-server", "id": "ll-missing", "restart": "no"}
    async with hive.session() as s:
        try:
            async with s.post("/v1/workers", params={"wait": "ready"}, json=body) as r:
                answer = await r.json()
                assert r.status == 409, answer
            failed = answer["error"]["worker"]
            assert failed["state"] == "failed"
            assert failed["exit_code"] not in (None, 0)
            log = hive.worker_log("ll-missing").read_text(errors="replace")
            assert f"failed to load model '{missing}'" in log  # llama.cpp's own words
            # The record's error is the exit and the engine's last line, as llama-server put it.
            lines = [line for line in log.splitlines() if line and not line.startswith(MARKER)]
            assert failed["error"].endswith(lines[-1].strip()), (failed["error"], lines[-3:])
            assert "model loading error" in failed["error"]
        finally:
            await remove(s, "ll-missing")


async def test_stop_leaves_no_process(hive: Hive, model: Path) -> None:
    async with hive.session() as s:
        w = await spawn(s, model, id="ll-stop")
        assert worker_processes("ll-stop") == [w["pid"]]
        async with s.post("/v1/workers/ll-stop/stop", params={"wait": "true"}) as r:
            stopped = await r.json()
            assert r.status == 200, stopped
        assert stopped["state"] == "stopped"
        assert worker_processes("ll-stop") == []
        async with aiohttp.ClientSession() as c:
            with pytest.raises(aiohttp.ClientConnectionError):
                async with c.get(f"{w['url']}/health"):
                    pass
        await remove(s, "ll-stop")


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 32k context: a request of 6,000 tokens runs for seconds."""
    return tiny_gguf.write(tmp_path_factory.mktemp("llama") / "long.gguf", context=32768)


async def stream_tokens(response: aiohttp.ClientResponse) -> tuple[int, bool]:
    """Read a /completion stream to its end: the tokens its last event says were predicted, and
    whether it said stop."""
    tokens, stopped = 0, False
    async for line in response.content:
        if line.startswith(b"data: "):
            event = json.loads(line[6:])
            if event.get("stop"):
                tokens, stopped = event.get("tokens_predicted", 0), True
    return tokens, stopped


def probe_connections(hive_pid: int, port: int) -> list[tuple[int, str]]:
    """hive's own TCP connections to a worker's port: (local port, status) of each."""
    found = []
    for conn in psutil.Process(hive_pid).net_connections(kind="tcp"):
        if conn.raddr and conn.raddr.port == port:
            found.append((conn.laddr.port, conn.status))
    return found


# alone: it holds one kept-alive connection to the engine for the whole test; with the
# parallel pass's three workers on 2 cores, a load read past its 2 s ends that connection
# (as it should) and the test, which checks there is one, cannot tell the two apart.
@pytest.mark.alone
async def test_busy_and_in_flight_come_from_the_engines_slots(hive: Hive, long_model: Path) -> None:
    async with hive.session() as s:
        w = await spawn(s, long_model, id="ll-busy")
        try:
            timeout = aiohttp.ClientTimeout(total=90)
            body = {"prompt": "hello", "n_predict": 6000, "ignore_eos": True, "stream": True}
            async with aiohttp.ClientSession(timeout=timeout) as c:
                streams = [await c.post(f"{w['url']}/completion", json=body) for _ in range(2)]
                for stream in streams:
                    assert stream.status == 200
                    await stream.content.readline()  # it runs: its first token has come

                async def busy_with_two() -> dict[str, Any] | None:
                    r = await record(s, "ll-busy")
                    return r if (r["state"], r["in_flight"]) == ("busy", 2) else None

                await async_wait_for(busy_with_two, timeout=30, what="busy with 2 in flight")
                # Sampled every 50 ms while the streams run (seconds: reads every 2 s), hive
                # holds one connection to the engine, the same one: kept alive, not one a read.
                samples: list[list[tuple[int, str]]] = []
                reading = asyncio.gather(*(stream_tokens(stream) for stream in streams))
                began = time.monotonic()
                while not reading.done():
                    samples.append(probe_connections(hive.pid, w["port"]))
                    await asyncio.wait([reading], timeout=0.05)
                results = reading.result()
                sampled = time.monotonic() - began
                for stream in streams:
                    stream.release()
            assert sampled > 2.5, f"{sampled:.1f}s: not past a read period (2 s)"
            assert all(sample == samples[0] for sample in samples), set(map(tuple, samples))
            assert len(samples[0]) == 1 and samples[0][0][1] == psutil.CONN_ESTABLISHED
            assert results == [(6000, True), (6000, True)], results  # every token: never cut short

            async def ready_again() -> dict[str, Any] | None:
                r = await record(s, "ll-busy")
                return r if (r["state"], r["in_flight"]) == ("ready", 0) else None

            after = await async_wait_for(ready_again, timeout=30, what="ready, none in flight")
            assert (after["restarts"], after["pid"]) == (0, w["pid"])
        finally:
            await remove(s, "ll-busy")

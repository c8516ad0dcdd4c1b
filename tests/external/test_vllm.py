"""A real vLLM (its CPU build, 0.32.0) under hive's built-in ``vllm`` backend, unchanged.

``make test`` installs vLLM once (engines/vllm.py, a venv cached outside the checkout) and names
its ``vllm`` command in ``HIVE_VLLM``; hive finds it on its ``PATH``. The model is a tiny random
Llama written at test time by the venv's own python (tests/tiny_hf.py): nothing is downloaded.

A vLLM takes 45 s to minutes to start on a small CPU host, so the module shares one worker,
``vl``, where that is honest: every test begins with it ready (spawning it when it is not there),
the crash tests leave it restarted by hive itself, and the stop test ends it last. The spawn
adds ``--enforce-eager`` after the template (a spawn's ``args``): it skips vLLM's compilation of
the model, some 35 s of each start. vLLM's own files go to a temp ``VLLM_CACHE_ROOT``.
``HIVE_VLLM_BUSY_ROUNDS=N`` repeats the busy test's measurement of how long hive takes to see a
burst of requests on an idle worker (printed; nothing is asserted about it).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from hivetest import TAG, Hive, record, running_hive
from routers import Router, router_config
from vllms import needs_vllm

from harness.procs import tagged_processes
from harness.waits import async_wait_for
from hive.devices.cpu import cpulist

WORKER = "vl"
TESTS = Path(__file__).parent.parent
#: A vLLM's processes: its API server, its EngineCore and the core's Worker (and
#: multiprocessing's resource tracker, unnamed).
ENGINE = {"vllm", "VLLM::EngineCore", "VLLM::Worker"}
#: A record's changes are polled this often: the host has few cores, and vLLM needs them.
POLL = 0.2

pytestmark = [
    pytest.mark.timeout(600),
    needs_vllm,
]


@pytest.fixture(scope="module")
def hive(vllm: Path, router: Router, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hive]:
    cache = tmp_path_factory.mktemp("vllm-cache")
    env = {
        # The built-in backend runs `vllm` by name: the installed one first on hive's PATH.
        "PATH": f"{vllm.parent}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
        "VLLM_CACHE_ROOT": str(cache),
        # Each start leaves a vllm_dist_* file (its rendezvous) in the temp dir: not in /tmp.
        "TMPDIR": str(cache),
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    with running_hive(router_config(router), env=env) as daemon:
        yield daemon


# -- helpers -------------------------------------------------------------------------------------


async def ready_worker(s: aiohttp.ClientSession, model: Path) -> dict[str, Any]:
    """The shared worker, ready: spawned if it is not there (or was stopped), else waited for
    (it may be restarting after a test's crash)."""
    async with s.get(f"/v1/workers/{WORKER}") as r:
        current = await r.json() if r.status == 200 else None
    restarting = current is not None and current.get("next_restart_at") is not None
    if current is not None and current["state"] in ("stopped", "failed") and not restarting:
        async with s.delete(f"/v1/workers/{WORKER}") as r:
            assert r.status == 200, await r.text()
        current = None
    if current is None:
        # The template as built in; the spawn's own argument (appended after the template's)
        # skips vLLM's compilation of the model, 30 s or more of each start on a small host.
        body = {"model": str(model), "backend": "vllm", "id": WORKER, "args": ["--enforce-eager"]}
        params = {"wait": "ready", "timeout": "500"}
        async with s.post("/v1/workers", params=params, json=body, timeout=None) as r:
            answer = await r.json()
            assert r.status == 200, answer
            return dict(answer)

    async def ready() -> dict[str, Any] | None:
        now = await record(s, WORKER)
        return now if now["state"] == "ready" and not now["in_flight"] else None

    return dict(await async_wait_for(ready, timeout=500, interval=POLL, what="vl ready"))


def tree(pid: int) -> set[psutil.Process]:
    """A running worker's processes: its leader (vLLM's API server) and every descendant.

    Not by the tag in their environment alone: vLLM names its EngineCore and Worker processes
    with setproctitle, which writes the title over the memory that ``/proc/PID/environ`` reads,
    so their tag can no longer be read (hive finds them by its leader's session instead)."""
    leader = psutil.Process(pid)
    return {leader, *leader.children(recursive=True)}


def alive(procs: set[psutil.Process]) -> set[psutil.Process]:
    """Those still running: the same processes, not others that took their pids since."""
    return {p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}


def left(worker_id: str = WORKER) -> list[psutil.Process]:
    """Any process still tagged as the worker's."""
    found = []
    for proc in tagged_processes(TAG):
        try:
            if proc.environ().get("HIVE_WORKER_ID") == worker_id:
                found.append(proc)
        except psutil.Error:  # gone, or not ours to read
            continue
    return found


def engine_core(pid: int) -> psutil.Process:
    """vLLM's EngineCore process, a child of its API server (``VLLM::EngineCore``)."""
    for child in psutil.Process(pid).children():
        if "EngineCore" in child.name():
            return child
    raise AssertionError(f"no EngineCore under {pid}: {psutil.Process(pid).children()}")


def names(procs: set[psutil.Process]) -> set[str]:
    return {p.name() for p in procs}


async def post(base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as c, c.post(base + path, json=body) as r:
        text = await r.text()
        assert r.status == 200, f"POST {base}{path}: {r.status} {text}"
        return dict(json.loads(text))


async def generates(base: str, model: Path) -> None:
    """Both OpenAI endpoints answer with as many tokens as asked (the chat template is used)."""
    common = {"model": str(model), "max_tokens": 4, "ignore_eos": True}
    body = await post(base, "/v1/completions", {**common, "prompt": "hello"})
    assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str)
    assert body["usage"]["completion_tokens"] == 4
    chat = {**common, "messages": [{"role": "user", "content": "hello"}]}
    body = await post(base, "/v1/chat/completions", chat)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 4


async def sse(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """hive's /v1/events: the data of each worker event."""
    async for raw in response.content:
        if raw.startswith(b"data: "):
            yield json.loads(raw[6:])


async def event(stream: AsyncIterator[dict[str, Any]], to: str, timeout: float) -> dict[str, Any]:
    """The next event in which the shared worker's state becomes ``to``."""
    async with asyncio.timeout(timeout):
        async for data in stream:
            if data["id"] == WORKER and data["to"] == to and data["from"] != to:
                return data
    raise AssertionError(f"the event stream ended before {WORKER} became {to}")


def at(data: dict[str, Any]) -> float:
    """An event's time, as ``time.time()``."""
    return datetime.fromisoformat(data["at"].replace("Z", "+00:00")).timestamp()


async def open_stream(
    c: aiohttp.ClientSession, base: str, model: Path, tokens: int
) -> aiohttp.ClientResponse:
    body = {
        "model": str(model),
        "prompt": "hello",
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = await c.post(f"{base}/v1/completions", json=body)
    assert response.status == 200, await response.text()
    return response


async def first_chunk(response: aiohttp.ClientResponse) -> None:
    async for line in response.content:
        if line.startswith(b"data: {"):
            return


async def to_the_end(response: aiohttp.ClientResponse) -> tuple[int, list[str], bool]:
    """Read a stream to its end: the completion tokens its usage counts, the finish reasons
    it gave, and whether it ended with ``[DONE]``."""
    tokens, reasons, done = 0, [], False
    async for line in response.content:
        if line.startswith(b"data: [DONE]"):
            done = True
        elif line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            if "error" in chunk:  # the engine ended the stream early
                reasons.append(f"error: {chunk['error']}")
            for choice in chunk.get("choices", []):
                reasons += [choice["finish_reason"]] if choice.get("finish_reason") else []
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    response.release()
    return tokens, reasons, done


def seconds(record: dict[str, Any], start: str, end: str) -> float:
    begun, ended = (datetime.fromisoformat(record[k].replace("Z", "+00:00")) for k in (start, end))
    return (ended - begun).total_seconds()


# -- the tests -----------------------------------------------------------------------------------


async def test_ready_with_the_builtin_template_on_a_cpu_host(hive: Hive, model: Path) -> None:
    async with hive.session() as s:
        w = await ready_worker(s, model)
    print(f"\nvLLM ready {seconds(w, 'started_at', 'ready_at'):.1f} s after it started")
    assert (w["backend"], w["gpus"], w["device"]) == ("vllm", [], "CPU-0")
    log = hive.worker_log(WORKER).read_text(errors="replace")
    assert f"serve {model} --served-model-name {model}" in log
    assert "--tensor-parallel-size" not in log.splitlines()[0]  # 0 GPUs: vLLM refuses it
    env = psutil.Process(w["pid"]).environ()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == cpulist(w["cpus"])
    # vLLM's own words: its threads are bound to the worker's cores, its KV cache is 4 GiB.
    assert f"core ids={sorted(w['cpus'])}" in log
    assert "Explicitly set (4.0/" in log
    # The API server, its EngineCore, the core's Worker (and multiprocessing's tracker).
    assert names(tree(w["pid"])) >= ENGINE
    await generates(w["url"], model)


async def test_busy_and_back_from_the_engines_metrics(hive: Hive, model: Path) -> None:
    rounds = int(os.environ.get("HIVE_VLLM_BUSY_ROUNDS", "1"))
    lags = []
    async with hive.session() as s:
        for _ in range(rounds):
            w = await ready_worker(s, model)
            if rounds > 1:  # measuring: requests come to an idle engine at any moment of
                await asyncio.sleep(15 + random.uniform(0, 10))  # hive's slowest reads
            timeout = aiohttp.ClientTimeout(total=300)
            async with (
                s.get("/v1/events", timeout=timeout) as events,
                aiohttp.ClientSession(timeout=timeout) as c,
            ):
                changes = sse(events)
                # Long enough to outlast hive's slowest read; ended once hive has seen them.
                streams = [await open_stream(c, w["url"], model, 4000) for _ in range(4)]
                await first_chunk(streams[0])
                began = time.time()
                busy = await event(changes, "busy", timeout=120)
                lags.append(at(busy) - began)

                async def four() -> dict[str, Any] | None:
                    now = await record(s, WORKER)
                    return now if (now["state"], now["in_flight"]) == ("busy", 4) else None

                await async_wait_for(four, timeout=60, interval=POLL, what="busy with 4")
                for stream in streams:
                    stream.close()  # the client goes: vLLM aborts the request
                back = await event(changes, "ready", timeout=120)
            assert back["worker"]["in_flight"] == 0
            after = await record(s, WORKER)
            assert (after["pid"], after["restarts"]) == (w["pid"], w["restarts"])
    lags.sort()
    print(f"\nbusy seen after {', '.join(f'{lag:.1f}' for lag in lags)} s", end=" ")
    print(f"(p50 {lags[len(lags) // 2]:.1f} s, max {lags[-1]:.1f} s)")


async def test_through_a_real_router(hive: Hive, router: Router, model: Path) -> None:
    async with hive.session() as s:
        w = await ready_worker(s, model)
    await async_wait_for(lambda: in_router(router, w["url"]), interval=POLL, what="registered")
    await generates(router.url, model)


async def in_router(router: Router, url: str, present: bool = True) -> bool:
    return (url in await router.urls()) is present


async def crash(hive: Hive, model: Path, victim: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """SIGKILL one process of the ready shared worker (``api``: its API server, ``core``: its
    EngineCore); the failed event and the record ready again after one restart. Nothing of
    the crashed attempt may be left, and the restart must not be hurt by its clean-up."""
    async with hive.session() as s:
        w = await ready_worker(s, model)
        old = tree(w["pid"])
        pid = w["pid"] if victim == "api" else engine_core(w["pid"]).pid
        async with s.get("/v1/events", timeout=aiohttp.ClientTimeout(total=600)) as events:
            changes = sse(events)
            killed = time.time()
            os.kill(pid, signal.SIGKILL)
            failed = await event(changes, "failed", timeout=60)
            print(f"\n{victim}: failed {1000 * (at(failed) - killed):.0f} ms after the SIGKILL")
            # Nothing of the crashed attempt is left: no orphaned EngineCore or Worker.
            gone = lambda: not alive(old)  # noqa: E731
            await async_wait_for(gone, timeout=30, interval=POLL, what="no orphan")
            again = await event(changes, "ready", timeout=500)
        assert again["worker"]["restarts"] == w["restarts"] + 1
        assert again["worker"]["pid"] != w["pid"]
        assert names(tree(again["worker"]["pid"])) >= ENGINE
        await generates(w["url"], model)
        now = await record(s, WORKER)
        assert (now["state"], now["restarts"]) == ("ready", w["restarts"] + 1)
    return failed["worker"], now


async def test_sigkill_of_the_api_server(hive: Hive, router: Router, model: Path) -> None:
    failed, now = await crash(hive, model, "api")
    assert failed["exit_code"] == -9 and "SIGKILL" in failed["error"]
    await async_wait_for(lambda: in_router(router, now["url"]), interval=POLL, what="back")


async def test_sigkill_of_the_engine_core(hive: Hive, model: Path) -> None:
    # The API server then exits by itself with code 0: unasked, that is a failure too.
    failed, _ = await crash(hive, model, "core")
    assert failed["exit_code"] == 0, failed


async def test_sigkill_of_hive_and_adoption(hive: Hive, router: Router, model: Path) -> None:
    async with hive.session() as s:
        w = await ready_worker(s, model)
    before = tree(w["pid"])
    hive.kill()
    assert alive(before) == before  # the worker runs on without hive
    hive.start()
    async with hive.session() as s:
        adopted = await record(s, WORKER)
        assert adopted["state"] == "ready"
        assert (adopted["pid"], adopted["restarts"]) == (w["pid"], w["restarts"])
        assert tree(w["pid"]) == before  # the same process tree, none new
        await generates(w["url"], model)
        await async_wait_for(lambda: in_router(router, w["url"]), interval=POLL, what="listed")
        assert (await record(s, WORKER))["pid"] == w["pid"]


async def test_a_drained_stop_lets_streams_finish_and_leaves_nothing(
    hive: Hive, router: Router, model: Path
) -> None:
    async with hive.session() as s:
        w = await ready_worker(s, model)
        before = tree(w["pid"])
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as c:
            streams = [await open_stream(c, w["url"], model, 200) for _ in range(2)]
            for stream in streams:
                await first_chunk(stream)
            reading = asyncio.gather(*(to_the_end(stream) for stream in streams))
            async with s.post(f"/v1/workers/{WORKER}/stop", params={"wait": "true"}) as r:
                stopped = await r.json()
                assert r.status == 200, stopped
            results = await reading
        # Both answered in full: hive ended the engine only once they were done.
        said = [line for line in hive.log().splitlines() if WORKER in line][-8:]
        assert results == [(200, ["length"], True)] * 2, (results, said)
        assert stopped["state"] == "stopped"
        assert await in_router(router, w["url"], present=False)
        # Nothing is left: no process (by the tree seen before, and by hive's tag), no
        # cgroup, and the port is free.
        assert alive(before) == set() and left() == []
        assert not [c for c in hive.cgroups() if WORKER in c.name]
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", w["port"]))
        async with s.delete(f"/v1/workers/{WORKER}") as r:
            assert r.status == 200, await r.text()

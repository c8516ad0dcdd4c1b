"""The demo worker on its own: routes, loading, heartbeats, signals. No hive involved."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hivetest import TAG, async_wait_for, free_port

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def demo(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[tuple[Any, str]]:
    """A demo worker process on a free port; killed and reaped at the end whatever happens."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HIVE_")}
    full_env.update({"HIVE_TEST_TAG": TAG, **(env or {})})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hive.demo_worker",
        "--port",
        str(port),
        "--model",
        "tiny",
        *args,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def status_of(s: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with s.get(url) as r:
            return r.status
    except aiohttp.ClientConnectionError:
        return None


async def test_loading_then_ready_then_clean_exit() -> None:
    async with demo("--load-seconds", "1") as (proc, url), aiohttp.ClientSession() as s:
        await async_wait_for(lambda: status_of(s, f"{url}/health"), what="listening")
        assert await status_of(s, f"{url}/health") == 503
        await async_wait_for(
            lambda: _is(status_of(s, f"{url}/health"), 200), timeout=20, what="loaded"
        )
        line = (await asyncio.wait_for(_line_with(proc.stdout, "ready_at="), 10)).split()
        assert float(line[0].split("=")[1]) > 0 and line[1] == f"port={url.rsplit(':', 1)[1]}"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def _is(value: Any, expected: Any) -> bool:
    return (await value) == expected


async def _line_with(stream: asyncio.StreamReader | None, text: str) -> str:
    assert stream is not None
    while True:
        line = (await stream.readline()).decode()
        if not line:
            raise AssertionError(f"no line with {text!r}")
        if text in line:
            return line.strip()


async def test_info_routes_and_generation() -> None:
    env = {"HIVE_WORKER_ID": "w7", "CUDA_VISIBLE_DEVICES": ""}
    async with demo(env=env) as (proc, url), aiohttp.ClientSession(url) as s:
        await async_wait_for(lambda: _is(status_of(s, "/health"), 200), what="ready")
        async with s.get("/get_server_info") as r:
            info = await r.json()
        assert info["pid"] == proc.pid and info["worker_id"] == "w7"
        assert info["cpu_affinity"] == sorted(os.sched_getaffinity(0))
        assert info["cuda_visible_devices"] == ""
        assert all(cpus for cpus in info["threads"].values())
        async with s.get("/get_model_info") as r:
            assert (await r.json())["model_path"] == "tiny"
        async with s.get("/v1/models") as r:
            assert (await r.json())["data"][0]["id"] == "tiny"

        async with s.post("/generate", json={"text": "hello"}) as r:
            one = await r.json()
        assert one["text"].startswith("[w7@") and "tiny says:" in one["text"]
        async with s.post("/generate", json={"text": "hello"}) as r:
            assert (await r.json())["text"] == one["text"]  # deterministic
        async with s.post("/generate", json={"text": ["a", "b"]}) as r:
            assert len(await r.json()) == 2

        body = {"model": "tiny", "prompt": "x", "max_tokens": 3}
        async with s.post("/v1/completions", json=body) as r:
            data = await r.json()
        assert data["object"] == "text_completion" and "[w7@" in data["choices"][0]["text"]
        assert data["usage"]["completion_tokens"] == 3

        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with s.post("/v1/chat/completions", json=chat) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            events = [
                line.removeprefix("data: ")
                for line in (await r.text()).splitlines()
                if line.startswith("data: ")
            ]
        assert events[-1] == "[DONE]"
        text = "".join(json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1])
        assert text.startswith("[w7@")

        async with s.post("/generate", data=b"{nope") as r:
            assert r.status == 400
            assert "JSON" in (await r.json())["error"]["message"]
        async with s.post("/v1/chat/completions", json={"messages": []}) as r:
            assert r.status == 400


async def test_fail_after_exits_3_with_a_line() -> None:
    async with demo("--fail-after", "0.2") as (proc, _):
        assert await asyncio.wait_for(proc.wait(), 20) == 3
        assert proc.stderr is not None
        assert b"simulated failure" in await proc.stderr.read()


class Beats:
    """A stand-in for hive's heartbeat route that records what arrives."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, Any]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append((request.match_info["id"], request.headers["Authorization"], body))
        return web.json_response({})

    def has(self, test: Callable[[dict[str, Any]], bool]) -> bool:
        return any(test(body) for _, _, body in self.seen)


@asynccontextmanager
async def beats_server() -> AsyncIterator[tuple[Beats, str]]:
    beats = Beats()
    app = web.Application()
    app.router.add_post("/v1/workers/{id}/heartbeat", beats.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield beats, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_heartbeats_ready_then_busy_then_ready() -> None:
    async with beats_server() as (beats, hive_url):
        env = {
            "HIVE_URL": hive_url,
            "HIVE_WORKER_ID": "hb",
            "HIVE_WORKER_TOKEN": "secret",
            "HIVE_HEARTBEAT_INTERVAL": "30",  # long: only changes trigger the next ones
        }
        async with demo("--latency-ms", "1500", env=env) as (_, url), aiohttp.ClientSession() as s:
            await async_wait_for(lambda: beats.has(lambda b: b["state"] == "ready"), what="ready")
            assert beats.seen[0][:2] == ("hb", "Bearer secret")
            request = asyncio.create_task(s.post(f"{url}/generate", json={"text": "slow"}))
            await async_wait_for(
                lambda: beats.has(lambda b: b == {"state": "busy", "in_flight": 1}), what="busy"
            )
            response = await request
            response.release()
            await async_wait_for(
                lambda: beats.seen[-1][2] == {"state": "ready", "in_flight": 0},
                what="ready again",
            )


async def test_no_heartbeat_sends_none() -> None:
    async with beats_server() as (beats, hive_url):
        env = {"HIVE_URL": hive_url, "HIVE_HEARTBEAT_INTERVAL": "0.1"}
        quiet = {**env, "HIVE_WORKER_ID": "quiet"}
        loud = {**env, "HIVE_WORKER_ID": "loud"}
        async with demo("--no-heartbeat", env=quiet) as (proc, url), demo(env=loud):
            async with aiohttp.ClientSession() as s:
                await async_wait_for(lambda: _is(status_of(s, f"{url}/health"), 200), what="up")
            # While its twin beats several times, the quiet one sends nothing.
            await async_wait_for(
                lambda: sum(1 for who, _, _ in beats.seen if who == "loud") >= 5, what="beats"
            )
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert [who for who, _, _ in beats.seen if who != "loud"] == []

"""The demo worker as a real process on loopback: routes, loading, heartbeats, signals.

No hive is involved: heartbeats go to a small recording server that plays hive's heartbeat route.
Every process started here carries the suite's tag and is killed and reaped at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hivetest import TAG

from harness import ROOT
from harness.net import free_port
from harness.waits import async_wait_for, wait_for
from hive.models import Heartbeat

pytestmark = pytest.mark.timeout(60)

MODEL = "m"
WORKER_ID = "demo-7"
GPUS = "GPU-11111111-2222-3333-4444-555555555555"
TOKEN = "worker-secret"
READY_LINE = re.compile(r"^ready_at=(\d+\.\d{6}) port=(\d+)$", re.MULTILINE)


# -- worker processes -----------------------------------------------------------------------------


@dataclass
class Demo:
    """One ``python -m hive.demo_worker`` process, its output in files (as hive does it)."""

    proc: subprocess.Popen[bytes]
    port: int
    out: Path
    err: Path
    started_at: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def prefix(self) -> str:
        return f"[{WORKER_ID}@{self.port}] {MODEL} says: "

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def stop(self) -> None:
        """Kill it if it still runs, and reap it either way."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def demo_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("HIVE_") and k != "CUDA_VISIBLE_DEVICES"
    }
    env.update({**TAG.env, "PYTHONUNBUFFERED": "1", **(extra or {})})
    return env


def launch(
    directory: Path,
    *args: str,
    env: dict[str, str] | None = None,
    cpus: set[int] | None = None,
) -> Demo:
    """Start a demo worker on a free port. With ``cpus``, it starts pinned to them."""
    port = free_port()
    out, err = directory / f"demo-{port}.out", directory / f"demo-{port}.err"
    command = [sys.executable, "-m", "hive.demo_worker", "--port", str(port), "--model", MODEL]
    started: list[subprocess.Popen[bytes] | BaseException] = []

    def spawn() -> None:
        try:
            if cpus is not None:
                os.sched_setaffinity(0, cpus)  # this thread only: the child inherits it
            with open(out, "wb") as stdout, open(err, "wb") as stderr:
                started.append(
                    subprocess.Popen(
                        [*command, *args],
                        env=demo_env(env),
                        stdout=stdout,
                        stderr=stderr,
                        cwd=ROOT,
                    )
                )
        except BaseException as exc:
            started.append(exc)

    started_at = time.time()
    thread = threading.Thread(target=spawn)
    thread.start()
    thread.join()
    if isinstance(started[0], BaseException):
        raise started[0]
    return Demo(started[0], port, out, err, started_at)


def http_status(url: str) -> int | None:
    """The status of a GET, or None while nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def wait_ready(demo: Demo) -> None:
    def ready() -> bool:
        if demo.proc.poll() is not None:
            raise AssertionError(f"demo worker exited {demo.proc.returncode}:\n{demo.stderr()}")
        return http_status(f"{demo.url}/health") == 200

    wait_for(ready, timeout=20, what=f"the demo worker on {demo.url} to be ready")


async def wait_ready_async(session: aiohttp.ClientSession, demo: Demo) -> None:
    async def ready() -> bool:
        if demo.proc.poll() is not None:
            raise AssertionError(f"demo worker exited {demo.proc.returncode}:\n{demo.stderr()}")
        return await status_of(session, f"{demo.url}/health") == 200

    await async_wait_for(ready, timeout=20, what=f"the demo worker on {demo.url} to be ready")


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Callable[..., Demo]]:
    """Start demo workers; every one of them is killed and reaped at the end of the test."""
    demos: list[Demo] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Demo:
        demo = launch(tmp_path, *args, env=env)
        demos.append(demo)
        return demo

    yield start
    for demo in demos:
        demo.stop()


@pytest.fixture(scope="module")
def pinned_cpu() -> int:
    return max(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, pinned_cpu: int) -> Iterator[Demo]:
    """One ready worker for the read-only tests, pinned to one CPU, with hive's environment."""
    env = {"HIVE_WORKER_ID": WORKER_ID, "CUDA_VISIBLE_DEVICES": GPUS}
    demo = launch(tmp_path_factory.mktemp("demo"), env=env, cpus={pinned_cpu})
    try:
        wait_ready(demo)
        yield demo
    finally:
        demo.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as client:
        yield client


async def status_of(session: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with session.get(url) as response:
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def post_json(session: aiohttp.ClientSession, url: str, body: Any) -> Any:
    async with session.post(url, json=body) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "application/json"
        return await response.json()


async def post_stream(session: aiohttp.ClientSession, url: str, body: Any) -> list[Any]:
    """POST, read the Server-Sent Events; each ``data:`` parsed, ``[DONE]`` kept as a string."""
    async with session.post(url, json=body) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "text/event-stream"
        text = await response.text()
    assert text.endswith("\n\n")
    events: list[Any] = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def words_after(prefix: str, text: str) -> list[str]:
    assert text.startswith(prefix), (prefix, text)
    return text.removeprefix(prefix).split()


# -- loading and the ready line -------------------------------------------------------------------


async def test_health_is_503_while_loading_then_200_and_ready_line(
    launcher: Callable[..., Demo], session: aiohttp.ClientSession
) -> None:
    demo = launcher("--load-seconds", "1")
    first = await async_wait_for(
        lambda: status_of(session, f"{demo.url}/health"), timeout=20, what="the port to listen"
    )
    seen_loading_at = time.time()
    assert first == 503
    for path in ("/health", "/health_generate"):
        async with session.get(demo.url + path) as response:
            assert response.status == 503
            assert await response.json() == {"status": "loading"}
    async with session.post(f"{demo.url}/generate", json={"text": "hi"}) as response:
        assert response.status == 503
        assert "error" in await response.json()
    assert not READY_LINE.search(demo.stdout())

    await wait_ready_async(session, demo)
    for path in ("/health", "/health_generate"):
        assert await get_json(session, demo.url + path) == {"status": "ok"}

    lines = await async_wait_for(lambda: READY_LINE.findall(demo.stdout()), timeout=5)
    assert len(lines) == 1, demo.stdout()
    ready_at, port = float(lines[0][0]), int(lines[0][1])
    assert port == demo.port
    assert ready_at >= demo.started_at + 1.0
    assert seen_loading_at - 0.05 <= ready_at <= time.time()
    assert demo.stdout().splitlines()[0].startswith("demo worker:"), "a start line comes first"


# -- info routes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/get_model_info", "/model_info"])
async def test_model_info(worker: Demo, session: aiohttp.ClientSession, path: str) -> None:
    assert await get_json(session, worker.url + path) == {
        "model_path": MODEL,
        "tokenizer_path": MODEL,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": "default",
        "has_image_understanding": False,
        "has_audio_understanding": False,
        "model_type": "demo",
        "architectures": ["DemoForCausalLM"],
    }


@pytest.mark.parametrize("path", ["/get_server_info", "/server_info"])
async def test_server_info_tells_where_the_worker_runs(
    worker: Demo, session: aiohttp.ClientSession, path: str, pinned_cpu: int
) -> None:
    info = await get_json(session, worker.url + path)
    assert info["model_path"] == info["tokenizer_path"] == MODEL
    assert info["pid"] == worker.proc.pid
    assert info["host"] == "127.0.0.1"
    assert info["port"] == worker.port
    assert info["cpu_affinity"] == [pinned_cpu]
    assert info["cuda_visible_devices"] == GPUS
    assert info["worker_id"] == WORKER_ID
    assert isinstance(info["version"], str)
    assert info["max_total_num_tokens"] == 4096
    assert (info["tp_size"], info["dp_size"]) == (1, 1)
    assert info["disaggregation_mode"] == "null"
    assert info["internal_states"] == [{}]
    threads = info["threads"]
    assert str(worker.proc.pid) in threads
    assert all(tid.isdigit() for tid in threads)
    assert all(cpus == [pinned_cpu] for cpus in threads.values()), threads


async def test_server_info_without_hive_environment(
    launcher: Callable[..., Demo], session: aiohttp.ClientSession
) -> None:
    demo = launcher()
    await wait_ready_async(session, demo)
    info = await get_json(session, f"{demo.url}/get_server_info")
    assert info["cuda_visible_devices"] is None
    assert info["worker_id"] is None
    assert info["cpu_affinity"] == sorted(os.sched_getaffinity(0))
    text = (await post_json(session, f"{demo.url}/generate", {"text": "x"}))["text"]
    assert text.startswith(f"[demo@{demo.port}] {MODEL} says: ")


async def test_v1_models(worker: Demo, session: aiohttp.ClientSession) -> None:
    body = await get_json(session, f"{worker.url}/v1/models")
    assert body["object"] == "list"
    [model] = body["data"]
    assert model["id"] == MODEL
    assert model["object"] == "model"
    assert model["owned_by"] == "hive-demo"
    assert isinstance(model["created"], int)


async def test_load_and_flush_cache(worker: Demo, session: aiohttp.ClientSession) -> None:
    [rank] = await get_json(session, f"{worker.url}/get_load")
    assert rank == {"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}
    async with session.post(f"{worker.url}/flush_cache") as response:
        assert response.status == 200


# -- generation -----------------------------------------------------------------------------------


async def test_generate_is_deterministic_and_names_the_worker(
    worker: Demo, session: aiohttp.ClientSession
) -> None:
    url = f"{worker.url}/generate"
    body = {"text": "hello there", "sampling_params": {"max_new_tokens": 5, "temperature": 0}}
    first = await post_json(session, url, body)
    again = await post_json(session, url, body)
    other = await post_json(session, url, {**body, "text": "something else"})
    assert first["text"] == again["text"] != other["text"]
    assert len(words_after(worker.prefix, first["text"])) == 5
    meta = first["meta_info"]
    assert meta["prompt_tokens"] == 2
    assert meta["completion_tokens"] == 5
    assert meta["finish_reason"] == {"type": "length", "length": 5}
    assert isinstance(meta["id"], str) and meta["id"] != again["meta_info"]["id"]

    default = await post_json(session, url, {"text": "hello there"})
    assert len(words_after(worker.prefix, default["text"])) == 16
    assert default["text"].startswith(first["text"])


async def test_generate_batch(worker: Demo, session: aiohttp.ClientSession) -> None:
    url = f"{worker.url}/generate"
    params = {"max_new_tokens": 3}
    batch = await post_json(session, url, {"text": ["one", "two"], "sampling_params": params})
    assert isinstance(batch, list) and len(batch) == 2
    for prompt, item in zip(["one", "two"], batch, strict=True):
        single = await post_json(session, url, {"text": prompt, "sampling_params": params})
        assert item["text"] == single["text"]
        assert item["meta_info"]["completion_tokens"] == 3


async def test_generate_stream(worker: Demo, session: aiohttp.ClientSession) -> None:
    url = f"{worker.url}/generate"
    body = {"text": "stream me", "sampling_params": {"max_new_tokens": 4}}
    whole = await post_json(session, url, body)
    events = await post_stream(session, url, {**body, "stream": True})
    assert events[-1] == "[DONE]"
    assert events[-2]["text"] == whole["text"]
    assert events[-2]["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-2])


async def test_completions(worker: Demo, session: aiohttp.ClientSession) -> None:
    url = f"{worker.url}/v1/completions"
    body = {"model": MODEL, "prompt": "tell me", "max_tokens": 6}
    whole = await post_json(session, url, body)
    assert whole["object"] == "text_completion"
    assert whole["model"] == MODEL
    [choice] = whole["choices"]
    assert choice["finish_reason"] == "length"
    assert len(words_after(worker.prefix, choice["text"])) == 6
    assert whole["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}
    again = await post_json(session, url, body)
    assert again["choices"][0]["text"] == choice["text"]

    events = await post_stream(session, url, {**body, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_chat_completions(worker: Demo, session: aiohttp.ClientSession) -> None:
    url = f"{worker.url}/v1/chat/completions"
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello"}]},
    ]
    body = {"model": MODEL, "messages": messages, "max_tokens": 4}
    whole = await post_json(session, url, body)
    assert whole["object"] == "chat.completion"
    [choice] = whole["choices"]
    assert choice["message"]["role"] == "assistant"
    text = choice["message"]["content"]
    assert len(words_after(worker.prefix, text)) == 4
    assert choice["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 4

    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    events = await post_stream(session, url, stream_body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["usage"] == whole["usage"]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("content", "") for d in deltas) == text
    assert [c for c in chunks if c["choices"]][-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", b"{not json"),
        ("/v1/completions", b"{not json"),
        ("/v1/chat/completions", b"{not json"),
        ("/generate", b"[1, 2]"),
        ("/generate", b'{"text": 5}'),
        ("/generate", b'{"text": "x", "sampling_params": {"max_new_tokens": -1}}'),
        ("/v1/completions", b'{"prompt": "x", "stream": "yes"}'),
        ("/v1/chat/completions", b'{"messages": []}'),
        ("/v1/chat/completions", b"\xff\xfe"),
    ],
)
async def test_bad_requests_are_400_json(
    worker: Demo, session: aiohttp.ClientSession, path: str, body: bytes
) -> None:
    headers = {"Content-Type": "application/json"}
    async with session.post(worker.url + path, data=body, headers=headers) as response:
        assert response.status == 400
        error = (await response.json())["error"]
        assert error["code"] == 400 and error["message"]
    assert await status_of(session, f"{worker.url}/health") == 200
    assert "Traceback" not in worker.stderr()


def test_http2_probe_gets_a_400_not_a_traceback(worker: Demo) -> None:
    """A router probing for gRPC sends an HTTP/2 preface: one line in the log, no traceback."""
    with socket.create_connection(("127.0.0.1", worker.port), timeout=5) as conn:
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        status_line = conn.recv(1024).split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.") and b" 400 " in status_line
    wait_for(lambda: "demo worker:" in worker.stderr(), timeout=5, what="a log line")
    assert "Traceback" not in worker.stderr()
    assert http_status(f"{worker.url}/health") == 200


# -- stopping and failing -------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(launcher: Callable[..., Demo], signum: signal.Signals) -> None:
    demo = launcher()
    wait_ready(demo)
    demo.proc.send_signal(signum)
    assert demo.proc.wait(timeout=10) == 0
    assert "Traceback" not in demo.stderr()
    assert http_status(f"{demo.url}/health") is None


async def test_sigterm_lets_a_generation_in_flight_finish(
    launcher: Callable[..., Demo], session: aiohttp.ClientSession
) -> None:
    demo = launcher("--latency-ms", "600")
    await wait_ready_async(session, demo)
    generation = asyncio.create_task(
        post_json(session, f"{demo.url}/v1/completions", {"prompt": "last words"})
    )

    async def busy() -> bool:
        return (await get_json(session, f"{demo.url}/get_load"))[0]["num_reqs"] == 1

    await async_wait_for(busy, timeout=20, what="the generation to start")
    demo.proc.send_signal(signal.SIGTERM)
    answer = await asyncio.wait_for(generation, timeout=10)
    assert answer["choices"][0]["text"].startswith(f"[demo@{demo.port}]")
    await async_wait_for(lambda: demo.proc.poll() is not None, timeout=10, what="the exit")
    assert demo.proc.returncode == 0


def test_fail_after_exits_3_with_its_line(launcher: Callable[..., Demo]) -> None:
    demo = launcher("--fail-after", "0.5")
    assert demo.proc.wait(timeout=20) == 3
    assert demo.stderr().splitlines()[-1] == "demo worker: simulated failure after 0.5 s"


# -- heartbeats -----------------------------------------------------------------------------------


@dataclass
class Beat:
    worker_id: str
    authorization: str | None
    body: Any
    at: float


@dataclass
class FakeHive:
    """Plays hive's heartbeat route: records each beat and answers ``status``."""

    status: int = 200
    beats: list[Beat] = field(default_factory=list)

    async def heartbeat(self, request: web.Request) -> web.Response:
        beat = Beat(
            request.match_info["id"],
            request.headers.get("Authorization"),
            await request.json(),
            time.monotonic(),
        )
        self.beats.append(beat)
        if self.status != 200:
            error = {"code": "conflict", "message": "worker is stopped"}
            return web.json_response({"error": error}, status=self.status)
        return web.json_response({"id": beat.worker_id, "state": beat.body["state"]})

    def of(self, worker_id: str) -> list[Beat]:
        return [b for b in self.beats if b.worker_id == worker_id]


@asynccontextmanager
async def fake_hive(status: int = 200, unix: bool = False) -> AsyncIterator[tuple[FakeHive, str]]:
    hive = FakeHive(status)
    app = web.Application()
    app.router.add_post("/v1/workers/{id}/heartbeat", hive.heartbeat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    directory = tempfile.mkdtemp(prefix="hb-")  # short: a socket path must fit in 108 bytes
    try:
        if unix:
            path = f"{directory}/hive.sock"
            await web.UnixSite(runner, path).start()
            url = f"unix://{path}"
        else:
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            url = f"http://127.0.0.1:{port}"
        yield hive, url
    finally:
        await runner.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


def hive_env(url: str, worker_id: str, interval: str = "0.2") -> dict[str, str]:
    return {
        "HIVE_URL": url,
        "HIVE_WORKER_ID": worker_id,
        "HIVE_WORKER_TOKEN": TOKEN,
        "HIVE_HEARTBEAT_INTERVAL": interval,
    }


def first_after(beats: list[Beat], after: float, state: str, in_flight: int) -> Beat | None:
    for beat in beats:
        if beat.at > after and beat.body == {"state": state, "in_flight": in_flight}:
            return beat
    return None


async def test_heartbeats_ready_busy_ready(
    launcher: Callable[..., Demo], session: aiohttp.ClientSession
) -> None:
    async with fake_hive() as (hive, url):
        demo = launcher("--latency-ms", "1500", env=hive_env(url, "hb-1"))
        ready = await async_wait_for(
            lambda: first_after(hive.of("hb-1"), 0, "ready", 0), timeout=20, what="ready beat"
        )
        generation = asyncio.create_task(
            post_json(session, f"{demo.url}/generate", {"text": "slow", "stream": False})
        )
        busy = await async_wait_for(
            lambda: first_after(hive.of("hb-1"), ready.at, "busy", 1), timeout=20, what="busy"
        )
        assert not generation.done()
        [rank] = await get_json(session, f"{demo.url}/get_load")
        assert rank["num_reqs"] == 1 and rank["num_tokens"] == 1 + 16
        await async_wait_for(
            lambda: first_after(hive.of("hb-1"), busy.at, "ready", 0), timeout=20, what="ready"
        )
        assert (await generation)["text"].startswith(f"[hb-1@{demo.port}]")
        assert len(hive.beats) >= 3
        for beat in hive.beats:
            assert beat.worker_id == "hb-1"
            assert beat.authorization == f"Bearer {TOKEN}"
            Heartbeat.model_validate(beat.body)  # hive's own model accepts it
        assert "heartbeat" not in demo.stderr()


async def test_heartbeats_at_once_on_a_change_over_a_unix_socket(
    launcher: Callable[..., Demo], session: aiohttp.ClientSession
) -> None:
    """With a 60 s interval, only a change between ready and busy can explain a quick beat."""
    async with fake_hive(unix=True) as (hive, url):
        demo = launcher("--latency-ms", "500", env=hive_env(url, "hb-2", interval="60"))
        await async_wait_for(lambda: hive.of("hb-2"), timeout=20, what="the first beat")
        assert hive.beats[0].body == {"state": "ready", "in_flight": 0}
        sent = time.monotonic()
        await post_json(session, f"{demo.url}/v1/completions", {"prompt": "x"})
        done = time.monotonic()
        await async_wait_for(lambda: len(hive.beats) >= 3, timeout=10, what="busy and ready")
        busy, ready = hive.beats[1], hive.beats[2]
        assert busy.body == {"state": "busy", "in_flight": 1}
        assert sent <= busy.at <= done
        assert ready.body == {"state": "ready", "in_flight": 0}
        assert ready.at - done < 5
        assert all(b.authorization == f"Bearer {TOKEN}" for b in hive.beats)


async def test_heartbeat_conflict_is_ignored_quietly(
    launcher: Callable[..., Demo], session: aiohttp.ClientSession
) -> None:
    async with fake_hive(status=409) as (hive, url):
        demo = launcher(env=hive_env(url, "hb-3"))
        await async_wait_for(lambda: len(hive.of("hb-3")) >= 3, timeout=20, what="three beats")
        assert await status_of(session, f"{demo.url}/health") == 200
        assert demo.proc.poll() is None
        assert "heartbeat" not in demo.stderr()


async def test_heartbeat_failures_are_logged_not_fatal(
    launcher: Callable[..., Demo], session: aiohttp.ClientSession
) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    demo = launcher(env=hive_env(nobody, "hb-4"))
    await wait_ready_async(session, demo)
    await async_wait_for(lambda: "heartbeat" in demo.stderr(), timeout=20, what="a failure line")
    failures = [line for line in demo.stderr().splitlines() if "heartbeat" in line]
    assert len(failures) == 1, failures  # the same failure again is not logged again
    assert "Traceback" not in demo.stderr()
    assert (await post_json(session, f"{demo.url}/generate", {"text": "x"}))["text"]
    assert demo.proc.poll() is None


async def test_no_heartbeat_flag(
    launcher: Callable[..., Demo], session: aiohttp.ClientSession
) -> None:
    async with fake_hive() as (hive, url):
        quiet = launcher("--no-heartbeat", env=hive_env(url, "quiet"))
        loud = launcher(env=hive_env(url, "loud"))
        await wait_ready_async(session, quiet)
        # Once the other worker, started alongside, has beaten three times, this one would have.
        await async_wait_for(lambda: len(hive.of("loud")) >= 3, timeout=20, what="three beats")
        assert hive.of("quiet") == []
        assert loud.proc.poll() is None and quiet.proc.poll() is None

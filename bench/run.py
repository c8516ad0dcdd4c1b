"""hive's benchmark: ``make bench`` (or ``bench/.venv/bin/python bench/run.py``).

Measures the figures in bench/README.md against real processes on loopback, each beside a peer
or a floor measured in the same run, prints a table and writes ``bench/results.json``.
``BENCH_QUICK=1`` is a smoke run of about a minute (written to ``bench/results-quick.json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

# The repository's root, for harness/ (what the bench shares with the tests).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import (
    BENCH,
    PYTHON,
    ROOT,
    TAG,
    EventStream,
    OtherLoad,
    bench_env,
    bench_hive,
    log,
    new_home,
    ready_at,
    remove_homes,
    watch_usage,
)
from peers import Circus, PeerUnavailable, Router, Supervisord

from harness.daemon import Hive, HiveFailed
from harness.net import free_port, port_block
from harness.procs import sweep, tagged_processes
from harness.stats import summarize
from harness.waits import wait_http_ok

# -- settings -------------------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


@dataclass(frozen=True)
class Settings:
    """What to run and how much of it; every knob is an environment variable."""

    quick: bool
    samples: int
    idle_seconds: float
    api_seconds: float
    records: int
    scale: tuple[int, ...]
    stop_count: int
    connections: int
    list_connections: int
    router_peer_samples: int
    router_peer_stagger: float
    router_peer_cap: float
    only: frozenset[str]
    out: Path
    pyspy: Path | None

    @classmethod
    def from_env(cls) -> Settings:
        quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
        scale = os.environ.get("BENCH_SCALE", "") or ("20,50" if quick else "200,500")
        only = os.environ.get("BENCH_ONLY", "") or "1,2,3,4,5,6,7"
        out = os.environ.get("BENCH_OUT", "") or str(
            BENCH / ("results-quick.json" if quick else "results.json")
        )
        pyspy = os.environ.get("BENCH_PYSPY", "")
        return cls(
            quick=quick,
            samples=_env_int("BENCH_SAMPLES", 5 if quick else 30),
            idle_seconds=_env_float("BENCH_IDLE_SECONDS", 3 if quick else 30),
            api_seconds=_env_float("BENCH_API_SECONDS", 1.5 if quick else 5),
            records=_env_int("BENCH_RECORDS", 100 if quick else 1000),
            scale=tuple(int(x) for x in scale.split(",") if x.strip()),
            stop_count=_env_int("BENCH_STOP_COUNT", 10 if quick else 100),
            connections=_env_int("BENCH_CONNECTIONS", 16),
            list_connections=_env_int("BENCH_LIST_CONNECTIONS", 4),
            router_peer_samples=_env_int("BENCH_ROUTER_PEER_SAMPLES", 3 if quick else 30),
            router_peer_stagger=_env_float("BENCH_ROUTER_PEER_STAGGER", 0 if quick else 60),
            router_peer_cap=_env_float("BENCH_ROUTER_PEER_CAP", 0 if quick else 240),
            only=frozenset(x.strip() for x in only.split(",")),
            out=Path(out),
            pyspy=Path(pyspy).resolve() if pyspy else None,
        )


# -- figures --------------------------------------------------------------------------------------


@dataclass
class Figure:
    """One row of the table. ``hive`` and each peer hold a summary (n, p50, p95, p99, max) or a
    single ``value``; ``stat`` says which of them the target is checked on."""

    key: str
    title: str
    unit: str
    hive: dict[str, Any]
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)
    target: str = ""
    met: bool | None = None
    stat: str = "p50"
    notes: list[str] = field(default_factory=list)
    #: CPU used by processes that are not the bench's while this figure ran (see OtherLoad).
    other_load: dict[str, float] = field(default_factory=dict)

    def main(self) -> float | None:
        value = self.hive.get(self.stat)
        return float(value) if isinstance(value, int | float) else None


def unavailable(why: str) -> dict[str, Any]:
    return {"unavailable": why}


def ms(values: list[float]) -> list[float]:
    return [v * 1000 for v in values]


def check(value: float | None, op: str, limit: float | None) -> bool | None:
    if value is None or limit is None:
        return None
    return value <= limit if op == "<=" else value >= limit


# -- pieces used by several figures ---------------------------------------------------------------


def demo_argv(port: int, *extra: str) -> list[str]:
    return [PYTHON, "-m", "hive.demo_worker", "--port", str(port), "--model", "bench", *extra]


class Popened:
    """Processes the bench starts itself (floor workers, peers' workers), killed at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log_path: Path, home: Path) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=bench_env(home),
                cwd=home,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    async def reap(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
        await asyncio.to_thread(proc.wait)

    async def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await asyncio.to_thread(proc.wait)


async def profile(settings: Settings, pid: int, name: str, seconds: float) -> str | None:
    """Record a py-spy flame graph of ``pid`` (only with BENCH_PYSPY=DIR)."""
    spy = shutil.which("py-spy", path=str(Path(PYTHON).parent))
    if settings.pyspy is None or spy is None:
        return None
    settings.pyspy.mkdir(parents=True, exist_ok=True)
    kind = os.environ.get("BENCH_PYSPY_FORMAT", "") or "flamegraph"
    suffix = {"flamegraph": "svg", "raw": "txt", "speedscope": "json"}.get(kind, kind)
    out = settings.pyspy / f"{name}.{suffix}"
    proc = await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
        "--rate", "250", "--nonblocking", "--format", kind, "--output", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await proc.wait()
    return str(out) if out.exists() else None


#: circus' default ``check_delay`` (seconds between its checks for dead processes) when
#: started from an ini file, as the bench starts it.
CIRCUS_CHECK_DELAY = 5.0


def tiny_command(flags: str) -> str:
    return f"{PYTHON} {BENCH / 'tiny_worker.py'} {flags}"


# -- 1, 2a: spawn, and readiness by probe ---------------------------------------------------------

HIVE_MAIN_CONFIG = """
[backends.probe]
command = ["{python}", "-m", "hive.demo_worker", "--port", "{port}", "--model", "{model}",
           "--no-heartbeat"]
health_path = "/health"

[backends.beat]
command = ["{python}", "-m", "hive.demo_worker", "--port", "{port}", "--model", "{model}"]
health_path = ""
"""


async def figures_spawn_and_probe(
    settings: Settings, hive: Hive, events: EventStream, popened: Popened
) -> list[Figure]:
    home = new_home("popen")
    spawn_s: list[float] = []
    popen_s: list[float] = []
    lag_recv: list[float] = []
    lag_at: list[float] = []
    for i in range(settings.samples + 1):  # the first of each is a warm-up, left out
        worker_id = f"probe-{i}"
        started = time.perf_counter()
        record = await hive.spawn({"model": "bench", "backend": "probe", "id": worker_id})
        took = time.perf_counter() - started
        if not record.get("pid"):
            raise RuntimeError(f"spawn answered without a pid: {record}")
        event = await events.state(worker_id, {"ready", "failed", "stopped"})
        if event.data["to"] != "ready":
            raise RuntimeError(f"{worker_id} {event.data['to']}: {event.data['worker']['error']}")
        own = await ready_at(hive.worker_log(worker_id))
        await hive.stop_worker(worker_id)

        log_path = home / f"popen-{i}.log"
        argv = demo_argv(free_port(), "--no-heartbeat")
        started = time.perf_counter()
        proc = popened.start(argv, log_path, home)
        popen_took = time.perf_counter() - started
        await ready_at(log_path, 30)  # let it finish starting: the next sample starts quiet
        await popened.reap(proc)
        if i == 0:
            continue
        spawn_s.append(took)
        popen_s.append(popen_took)
        lag_recv.append(event.recv - own)
        lag_at.append(event.at - own)

    rtt: list[float] = []
    for _ in range(settings.samples):
        started = time.perf_counter()
        await hive.call("GET", "/health")
        rtt.append(time.perf_counter() - started)
    spawn = summarize(ms(spawn_s))
    floor = summarize(ms(popen_s))
    spawn_fig = Figure(
        "1",
        "spawn: POST /v1/workers -> record with pid",
        "ms",
        spawn,
        {"Popen": floor},
        target="p50 <= 3x Popen p50",
        met=check(spawn["p50"], "<=", 3 * floor["p50"]),
        notes=[
            "demo worker --no-heartbeat; Popen of the same argv, start_new_session, stdout to a "
            "file; each sample waits for the worker to be ready and stops it before the next",
            "HTTP alone, GET /health on the same connection: "
            + json.dumps(summarize(ms(rtt), keep=False)),
        ],
    )
    probe = summarize(ms(lag_recv))
    probe_fig = Figure(
        "2a",
        "ready lag, health probe (ready_at -> SSE)",
        "ms",
        probe,
        {},
        target="p50 <= 250 ms",
        met=check(probe["p50"], "<=", 250),
        notes=[
            "from the worker's ready_at line to this client reading the ready event",
            f"by the event's own `at` field: {json.dumps(summarize(ms(lag_at), keep=False))}",
        ],
    )
    return [spawn_fig, probe_fig]


# -- 2b, 3: readiness by heartbeat, and crash detection --------------------------------------------


async def figures_heartbeat_and_crash(
    settings: Settings, hive: Hive, events: EventStream
) -> tuple[Figure, Figure, Figure]:
    lag_recv: list[float] = []
    lag_at: list[float] = []
    crash_recv: list[float] = []
    crash_at: list[float] = []
    for i in range(settings.samples + 1):
        worker_id = f"beat-{i}"
        record = await hive.spawn({"model": "bench", "backend": "beat", "id": worker_id})
        event = await events.state(worker_id, {"ready", "failed", "stopped"})
        if event.data["to"] != "ready":
            raise RuntimeError(f"{worker_id} {event.data['to']}: {event.data['worker']['error']}")
        own = await ready_at(hive.worker_log(worker_id))
        await asyncio.sleep(0.1)  # the worker's first heartbeat answered: it is idle
        killed = time.time()
        os.kill(int(record["pid"]), signal.SIGKILL)
        failed = await events.state(worker_id, {"failed", "stopped"}, 30)
        if i == 0:
            continue
        lag_recv.append(event.recv - own)
        lag_at.append(event.at - own)
        crash_recv.append(failed.recv - killed)
        crash_at.append(failed.at - killed)
    beat = summarize(ms(lag_recv))
    beat_fig = Figure(
        "2b",
        "ready lag, heartbeat (ready_at -> SSE)",
        "ms",
        beat,
        target="p50 <= 20 ms",
        met=check(beat["p50"], "<=", 20),
        notes=[
            "backend with health_path = '' : only the worker's first heartbeat makes it ready",
            f"by the event's own `at` field: {json.dumps(summarize(ms(lag_at), keep=False))}",
        ],
    )
    crash = summarize(ms(crash_recv))
    crash_fig = Figure(
        "3",
        "crash: SIGKILL -> failed event (received)",
        "ms",
        crash,
        target="p50 <= 10 ms",
        met=check(crash["p50"], "<=", 10),
        notes=["time.time() just before os.kill to this client reading the failed event"],
    )
    crash_at_fig = Figure(
        "3'",
        "crash: SIGKILL -> failed event (its `at`)",
        "ms",
        summarize(ms(crash_at)),
        notes=["the event's own timestamp: when hive recorded the failure"],
    )
    return beat_fig, crash_fig, crash_at_fig


async def crash_supervisord(settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """supervisord holding ``samples`` tiny workers; SIGKILL them one at a time, each event
    read by an event listener (``PROCESS_STATE_EXITED``), sent to the bench as a datagram."""
    count = settings.samples + 1
    base = port_block(count + 1)
    program = (
        "[program:tiny]\n"
        f"command={tiny_command('--port %(process_num)d')}\n"
        "process_name=tiny_%(process_num)d\n"
        f"numprocs={count}\nnumprocs_start={base}\n"
        "autostart=true\nautorestart=false\nstartsecs=0\nstopwaitsecs=5\n"
    )
    sv = Supervisord(program, listener=True)
    try:
        await sv.start()
        await wait_listening(list(range(base, base + count)), 60)
        pids = [int(i["pid"]) for i in await sv.all_info() if i["group"] == "tiny"]
        recv: list[float] = []
        at: list[float] = []
        for i, pid in enumerate(pids):
            await asyncio.sleep(0.1)
            killed = time.time()
            os.kill(pid, signal.SIGKILL)
            got, message = await sv.events.wait(
                lambda m, pid=pid: int(m.get("pid", 0)) == pid and m.get("groupname") == "tiny",
                30,
            )
            if i:
                recv.append(got - killed)
                at.append(float(message["at"]) - killed)
        return summarize(ms(recv)), summarize(ms(at))
    finally:
        await sv.close()


async def crash_circus(settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """circus holding ``samples`` tiny workers; SIGKILL each at a random moment (circus finds
    dead processes on a periodic check, so the kills must fall at every phase of it), each
    ``reap`` event read from circus' pub/sub stream."""
    count = settings.samples
    base = port_block(count + 1)
    circus = Circus(
        "[watcher:tiny]\n"
        f"cmd = {tiny_command(f'--port-base {base} --index $(circus.wid)')}\n"
        f"numprocesses = {count}\ncopy_env = True\nrespawn = False\ngraceful_timeout = 5\n"
    )
    try:
        await circus.start()
        await wait_listening(list(range(base + 1, base + count + 1)), 60)
        pids = await circus.pids("tiny")
        window = 2 * CIRCUS_CHECK_DELAY
        killed: dict[int, float] = {}

        async def kill_later(pid: int) -> tuple[float, dict[str, Any]]:
            await asyncio.sleep(random.uniform(0, window))
            killed[pid] = time.time()
            os.kill(pid, signal.SIGKILL)
            return await circus.wait_reap(pid, 30)

        reaps = await asyncio.gather(*(kill_later(pid) for pid in pids))
        recv = [got - killed[int(m["process_pid"])] for got, m in reaps]
        at = [float(m["time"]) - killed[int(m["process_pid"])] for _, m in reaps]
        return summarize(ms(recv)), summarize(ms(at))
    finally:
        await circus.close()


# -- 4: out of the router -------------------------------------------------------------------------


class RouterDefaults:
    """How long an sglang-router with its default health checks keeps a SIGKILLed worker.

    Set up first (its workers' start-up would disturb the other figures), then it kills its
    workers one by one, spread over ``stagger`` seconds so that the kills fall at every phase of
    the router's check interval, and polls the router in the background while the rest runs.
    """

    def __init__(self, settings: Settings, popened: Popened) -> None:
        self.settings = settings
        self.popened = popened
        self.router: Router | None = None
        self.workers: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.samples: dict[str, float] = {}
        self.killed: dict[str, float] = {}
        self.error: str | None = None
        self.finishing = asyncio.Event()

    async def setup(self) -> None:
        n = self.settings.router_peer_samples
        self.router = await Router("sgr-peer").start()
        home = new_home("sgr-workers")
        ports = [free_port() for _ in range(n)]
        for port in ports:
            proc = self.popened.start(demo_argv(port, "--no-heartbeat"), home / f"{port}.log", home)
            self.workers.append((f"http://127.0.0.1:{port}", proc))
        await asyncio.gather(*(wait_http_ok(f"{url}/health", 60) for url, _ in self.workers))
        for url, _ in self.workers:
            await self.router.add(url, "bench")
        deadline = time.monotonic() + 60
        while True:
            listed = {w["url"]: w for w in await self.router.workers()}
            if all(listed.get(url, {}).get("is_healthy") for url, _ in self.workers):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not all healthy in the router: {listed}")
            await asyncio.sleep(0.1)

    async def run(self) -> None:
        assert self.router is not None
        n = len(self.workers)
        started = time.monotonic()

        async def kill_all() -> None:
            for i, (url, proc) in enumerate(self.workers):
                due = started + self.settings.router_peer_stagger * i / max(n, 1)
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                self.killed[url] = time.time()
                proc.kill()
                await asyncio.to_thread(proc.wait)

        killer = asyncio.create_task(kill_all())
        try:
            while len(self.samples) < n:
                now = time.time()
                listed = {w["url"]: w for w in await self.router.workers()}
                for url, at in self.killed.items():
                    if url not in self.samples and not listed.get(url, {}).get("is_healthy"):
                        self.samples[url] = now - at
                if killer.done() and self.killed:
                    waited = time.time() - max(self.killed.values())
                    if self.finishing.is_set() and waited >= self.settings.router_peer_cap:
                        return
                await asyncio.sleep(0.25)
        finally:
            killer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await killer

    def result(self) -> dict[str, Any]:
        if self.error:
            return unavailable(self.error)
        now = time.time()
        censored = [now - at for url, at in self.killed.items() if url not in self.samples]
        out = summarize(list(self.samples.values()) + censored)
        out["unit"] = "s"
        if censored:
            out["censored"] = len(censored)
            out["note"] = (
                f"{len(censored)} still listed as healthy when the bench ended: their values "
                "are lower bounds"
            )
        return out

    async def close(self) -> None:
        if self.router is not None:
            await self.router.close()


async def figure_router(
    settings: Settings, peer: RouterDefaults | None, peer_error: str | None
) -> Figure:
    router = Router("sgr-hive")
    hive = bench_hive("router", f'\n[[routers]]\nkind = "sglang"\nurl = "{router.url}"\n')
    figure = Figure(
        "4",
        "crash: SIGKILL -> gone from sglang-router",
        "ms",
        {},
        target="(none)",
    )
    events: EventStream | None = None
    try:
        await router.start()
        try:
            await hive.start_async()
        except HiveFailed as exc:
            figure.hive = unavailable(f"hive does not start with [[routers]]: {exc}"[:300])
            return figure
        events = await EventStream(hive).start()

        async def listed(port: int) -> bool:
            return any(w["url"].endswith(f":{port}") for w in await router.workers())

        async def until(condition: Callable[[], Awaitable[bool]], timeout: float) -> float | None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if await condition():
                    return time.time()
                await asyncio.sleep(0.005)
            return None

        gone: list[float] = []
        joined: list[float] = []
        misses = 0
        for i in range(settings.samples + 1):
            worker_id = f"routed-{i}"
            record = await hive.spawn({"model": "bench", "id": worker_id}, wait=True)
            ready = await events.state(worker_id, "ready", 10)
            port = int(record["port"])
            seen = await until(lambda port=port: listed(port), 10)
            if seen is None:
                fields = sorted(k for k in record if "router" in k.lower())
                if i == 0:
                    why = "hive does not sync [[routers]] yet: the worker never appeared in the "
                    why += "router's /workers within 10 s of ready"
                    if fields:
                        why += f" (its record has {fields})"
                    figure.hive = unavailable(why)
                    await hive.stop_worker(worker_id)
                    return figure
                misses += 1
                continue
            killed = time.time()
            os.kill(int(record["pid"]), signal.SIGKILL)
            out = await until(lambda port=port: _not(listed(port)), 15)
            if i == 0:
                continue
            joined.append(seen - ready.recv)
            if out is None:
                misses += 1
            else:
                gone.append(out - killed)
        figure.hive = summarize(ms(gone))
        figure.notes.append(
            "hive with [[routers]] -> a real sglang-router; polled GET /workers every 5 ms"
        )
        figure.notes.append(
            f"ready event -> listed in the router: {json.dumps(summarize(ms(joined), keep=False))}"
        )
        if misses:
            figure.notes.append(f"{misses} samples never joined or never left the router")
        return figure
    except PeerUnavailable as exc:
        figure.hive = unavailable(f"sglang-router: {exc}"[:300])
        return figure
    finally:
        if events is not None:
            await events.close()
        await hive.close()
        await router.close()
        if peer is not None:
            figure.peers["sglang-router defaults"] = peer.result()
        elif peer_error:
            figure.peers["sglang-router defaults"] = unavailable(peer_error)


async def _not(value: Awaitable[bool]) -> bool:
    return not await value


# -- 5: the API -----------------------------------------------------------------------------------

HIVE_API_CONFIG = """
# The heartbeat target must not be found hung while the other loads run first.
heartbeat_timeout = 3600

[backends.exit0]
command = ["/bin/true"]
health_path = ""

[backends.sleeper]
command = ["/bin/sleep", "3600"]
health_path = ""
startup_timeout = 3600
"""


async def loadgen(
    port: int, method: str, path: str, connections: int, seconds: float, *headers: str, body: str
) -> dict[str, Any]:
    argv = [
        PYTHON, str(BENCH / "loadgen.py"), "--port", str(port), "--method", method,
        "--path", path, "--connections", str(connections), "--seconds", str(seconds),
        "--body", body,
    ]  # fmt: skip
    for header in headers:
        argv += ["--header", header]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, env=bench_env(Path("/tmp"))
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode})")
    return dict(json.loads(out))


async def figures_api(settings: Settings, popened: Popened) -> list[Figure]:
    hive = bench_hive("api", HIVE_API_CONFIG, port_span=max(2 * settings.records, 500))
    await hive.start_async()
    floor_home = new_home("floor")
    floor: subprocess.Popen[bytes] | None = None
    try:
        started = time.monotonic()
        gate = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            async with gate:
                await hive.spawn({"model": "bench", "backend": "exit0", "id": f"rec-{i:04d}"})

        await asyncio.gather(*(one(i) for i in range(settings.records)))
        while (await hive.call("GET", "/v1/node"))["workers"].get("stopped", 0) < settings.records:
            await asyncio.sleep(0.1)
        made = time.monotonic() - started
        await hive.spawn({"model": "bench", "backend": "sleeper", "id": "hb"})
        beat = '{"state": "ready"}'
        await hive.call("POST", "/v1/workers/hb/heartbeat", json_body={"state": "ready"})

        async def raw(method: str, path: str, body: str | None = None) -> str:
            async with hive.http().request(method, path, data=body) as response:
                return await response.text()

        bodies = {
            "list": await raw("GET", "/v1/workers"),
            "one": await raw("GET", "/v1/workers/hb"),
            "heartbeat": await raw("POST", "/v1/workers/hb/heartbeat", beat),
        }
        total = json.loads(bodies["list"])["total"]
        (floor_home / "bodies.json").write_text(json.dumps(bodies))
        floor_port = free_port()
        floor = popened.start(
            [PYTHON, str(BENCH / "floor_server.py"), "--port", str(floor_port),
             "--bodies", str(floor_home / "bodies.json")],
            floor_home / "floor.log",
            floor_home,
        )  # fmt: skip
        await wait_http_ok(f"http://127.0.0.1:{floor_port}/health", 30)

        auth = f"Authorization: Bearer {hive.token}"
        cases = [
            ("5a", f"list {total} records: GET /v1/workers", "GET", "/v1/workers", "", None),
            ("5b", "get one record: GET /v1/workers/{id}", "GET", "/v1/workers/hb", "", None),
            ("5c", "heartbeat: POST .../heartbeat", "POST", "/v1/workers/hb/heartbeat", beat, 2000),
        ]
        figures = []
        for key, title, method, path, body, target in cases:
            conns = settings.list_connections if key == "5a" else settings.connections
            seconds = settings.api_seconds
            ours = await loadgen(hive.port, method, path, conns, seconds, auth, body=body)
            bare = await loadgen(floor_port, method, path, conns, seconds, auth, body=body)
            flame = None
            if settings.pyspy is not None:
                spy = asyncio.create_task(profile(settings, hive.pid, f"api-{key}", seconds))
                await loadgen(hive.port, method, path, conns, seconds, auth, body=body)
                flame = await spy
            for result in (ours, bare):
                if result["ok"] != result["requests"] or result["errors"]:
                    raise RuntimeError(f"{title}: errors under load: {result}")
            rate = Figure(
                key,
                f"{title} [rate]",
                "req/s",
                {"value": ours["rate"], "n": ours["requests"]},
                {"bare aiohttp": {"value": bare["rate"], "n": bare["requests"]}},
                target=f">= {target} req/s" if target else "(none)",
                met=check(ours["rate"], ">=", target) if target else None,
                stat="value",
                notes=[f"{conns} keep-alive connections, {seconds:g} s, load generator in its "
                       "own process"],
            )  # fmt: skip
            latency = Figure(
                f"{key}'",
                f"{title} [latency]",
                "ms",
                {k.removesuffix("_ms"): v for k, v in ours.items() if k.endswith("_ms")}
                | {"n": ours["requests"]},
                {"bare aiohttp": {k.removesuffix("_ms"): v for k, v in bare.items()
                                  if k.endswith("_ms")} | {"n": bare["requests"]}},
            )  # fmt: skip
            if flame:
                rate.notes.append(f"py-spy flame graph: {flame}")
            figures += [rate, latency]
        figures[0].notes.append(
            f"{settings.records} records made (spawned /bin/true) in {made:.1f}s"
        )
        return figures
    finally:
        if floor is not None:
            await popened.reap(floor)
        await hive.close()


# -- 6, 7: scale, idle overhead, stop all ---------------------------------------------------------


async def spawn_many(
    hive: Hive, events: EventStream, count: int, prefix: str
) -> tuple[float, list[float], int]:
    """Spawn ``count`` tiny workers (16 requests at a time); wall time until all are ready,
    each one's request-to-ready time, and how many failed."""
    starts: dict[str, float] = {}
    gate = asyncio.Semaphore(16)
    begun = time.time()

    async def one(i: int) -> None:
        worker_id = f"{prefix}-{i:04d}"
        async with gate:
            starts[worker_id] = time.time()
            await hive.spawn({"model": "bench", "backend": "tiny", "id": worker_id})

    await asyncio.gather(*(one(i) for i in range(count)))
    ends = await asyncio.gather(
        *(events.state(w, {"ready", "failed", "stopped"}, 300) for w in starts)
    )
    failed = sum(1 for e in ends if e.data["to"] != "ready")
    per = [e.recv - starts[e.data["id"]] for e in ends]
    return max(e.recv for e in ends) - begun, per, failed


async def wait_listening(ports: list[int], timeout: float) -> float:
    """Poll until every port accepts a connection; returns when (``time.time()``)."""
    pending = set(ports)
    deadline = time.monotonic() + timeout
    gate = asyncio.Semaphore(64)

    async def try_one(port: int) -> None:
        async with gate:
            with contextlib.suppress(OSError, TimeoutError):
                _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 0.5)
                writer.close()
                pending.discard(port)

    while pending:
        await asyncio.gather(*(try_one(p) for p in list(pending)))
        if not pending:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} of {len(ports)} ports never listened")
        await asyncio.sleep(0.05)
    return time.time()


async def peers_holding(
    count: int, stack: contextlib.AsyncExitStack
) -> tuple[dict[str, psutil.Process], dict[str, dict[str, Any]]]:
    """supervisord and circus each holding ``count`` tiny workers; their pids, and their
    time from start until every worker listens."""
    procs: dict[str, psutil.Process] = {}
    ready: dict[str, dict[str, Any]] = {}
    base = port_block(count + 1)
    sv_program = (
        "[program:tiny]\n"
        f"command={tiny_command('--port %(process_num)d')}\n"
        "process_name=tiny_%(process_num)d\n"
        f"numprocs={count}\nnumprocs_start={base}\n"
        "autostart=true\nautorestart=true\nstopwaitsecs=5\n"
    )
    try:
        begun = time.time()
        sv = Supervisord(sv_program)
        stack.push_async_callback(sv.close)
        await sv.start()
        done = await wait_listening(list(range(base, base + count)), 120)
        procs["supervisord"] = psutil.Process(sv.pid)
        ready["supervisord"] = {"value": round(done - begun, 3), "n": count}
    except (PeerUnavailable, TimeoutError) as exc:
        ready["supervisord"] = unavailable(str(exc)[:300])
    base = port_block(count + 1)
    try:
        begun = time.time()
        circus = Circus(
            "[watcher:tiny]\n"
            f"cmd = {tiny_command(f'--port-base {base} --index $(circus.wid)')}\n"
            f"numprocesses = {count}\ncopy_env = True\ngraceful_timeout = 5\n"
        )
        stack.push_async_callback(circus.close)
        await circus.start()
        done = await wait_listening(list(range(base + 1, base + count + 1)), 120)
        procs["circusd"] = psutil.Process(circus.pid)
        ready["circusd"] = {"value": round(done - begun, 3), "n": count}
    except (PeerUnavailable, TimeoutError) as exc:
        ready["circusd"] = unavailable(str(exc)[:300])
    return procs, ready


def memory_cap(count: int, notes: list[str]) -> int:
    """Fewer workers when this machine's free memory cannot hold ``count`` (about 20 MB each)."""
    available = psutil.virtual_memory().available
    fits = int((available - 2e9) // 20e6)
    if fits < count:
        notes.append(f"only {fits} workers fit in free memory: ran {fits}, not {count}")
        return max(fits, 1)
    return count


async def figures_scale(settings: Settings) -> list[Figure]:
    small, large = (*settings.scale, 0, 0)[:2]
    notes: list[str] = []
    hive = bench_hive(
        "scale",
        "\n[backends.tiny]\n"
        f'command = ["{{python}}", "{BENCH / "tiny_worker.py"}", "--port", "{{port}}"]\n'
        'health_path = "/health"\nstartup_timeout = 300\n',
        port_span=2 * max(small, large) + 100,
    )
    await hive.start_async()
    events = await EventStream(hive).start()
    figures: list[Figure] = []
    try:
        small = memory_cap(small, notes)
        wall, per, failed = await spawn_many(hive, events, small, "tiny")
        if failed:
            notes.append(f"{failed} of {small} failed to start")
        async with contextlib.AsyncExitStack() as stack:
            procs, peer_ready = await peers_holding(small, stack)
            summary = summarize(per, keep=False) | {"value": round(wall, 3)}
            figures.append(
                Figure(
                    "6",
                    f"start {small} tiny workers: all ready",
                    "s",
                    summary,
                    peer_ready,
                    target="(none)",
                    stat="value",
                    notes=[
                        "value: first spawn request -> last ready event; p50..max: each "
                        "worker's spawn request -> its ready event (16 requests at a time); "
                        "peers: daemon start -> every worker's port listening",
                        *notes,
                    ],
                )
            )
            await asyncio.sleep(2)  # let the start-up settle before the idle window
            usage = await watch_usage(
                {"hive": psutil.Process(hive.pid), **procs}, settings.idle_seconds
            )
        cpu_peers = {k: {"value": v["cpu_percent"]} for k, v in usage.items() if k != "hive"}
        rss_peers = {k: {"value": v["rss_mb"]} for k, v in usage.items() if k != "hive"}
        for name, why in peer_ready.items():
            if "unavailable" in why:
                cpu_peers[name] = rss_peers[name] = why
        window = f"over {usage['hive']['window_s']:g} s idle, all three daemons in one window"
        figures.append(
            Figure(
                "6",
                f"idle CPU of hive, {small} workers",
                "%",
                {"value": usage["hive"]["cpu_percent"], "n": 1},
                cpu_peers,
                target="<= 2 % (200 workers)",
                met=check(usage["hive"]["cpu_percent"], "<=", 2) if small == 200 else None,
                stat="value",
                notes=[f"% of one core {window}; the daemon's own process only"],
            )
        )
        figures.append(
            Figure(
                "6",
                f"RSS of hive, {small} workers",
                "MB",
                {"value": usage["hive"]["rss_mb"], "n": 1},
                rss_peers,
                target="(none)",
                stat="value",
                notes=[f"largest RSS sampled once a second {window}"],
            )
        )

        # 7: stop some of them at once.
        count = min(settings.stop_count, small)
        ids = [f"tiny-{i:04d}" for i in range(small)]
        begun = time.perf_counter()

        async def stop(worker_id: str) -> float:
            started = time.perf_counter()
            await hive.stop_worker(worker_id, wait=True)
            return time.perf_counter() - started

        each = await asyncio.gather(*(stop(w) for w in ids[:count]))
        wall_stop = time.perf_counter() - begun
        await asyncio.gather(*(stop(w) for w in ids[count:]))
        figures.append(
            Figure(
                "7",
                f"stop {count} workers at once: all stopped",
                "s",
                summarize(list(each), keep=False) | {"value": round(wall_stop, 3)},
                target="<= 3 s (100 workers)",
                met=check(wall_stop, "<=", 3) if count == 100 else None,
                stat="value",
                notes=[
                    "value: wall time of concurrent POST .../stop?wait=true for each; "
                    "p50..max: each request"
                ],
            )
        )

        if large:
            notes = []
            large = memory_cap(large, notes)
            wall, per, failed = await spawn_many(hive, events, large, "big")
            if failed:
                notes.append(f"{failed} of {large} failed to start")
            figures.append(
                Figure(
                    "6",
                    f"start {large} tiny workers: all ready",
                    "s",
                    summarize(per, keep=False) | {"value": round(wall, 3)},
                    target="(none)",
                    stat="value",
                    notes=notes,
                )
            )
            await asyncio.sleep(2)
            usage = await watch_usage({"hive": psutil.Process(hive.pid)}, settings.idle_seconds)
            flame = await profile(settings, hive.pid, f"idle-{large}", settings.idle_seconds)
            figures.append(
                Figure(
                    "6",
                    f"RSS of hive, {large} workers",
                    "MB",
                    {"value": usage["hive"]["rss_mb"], "n": 1},
                    target="<= 120 MB (500 workers)",
                    met=check(usage["hive"]["rss_mb"], "<=", 120) if large == 500 else None,
                    stat="value",
                )
            )
            figures.append(
                Figure(
                    "6",
                    f"idle CPU of hive, {large} workers",
                    "%",
                    {"value": usage["hive"]["cpu_percent"], "n": 1},
                    target="(none)",
                    stat="value",
                    notes=[f"py-spy flame graph (profiled apart): {flame}"] if flame else [],
                )
            )
        await events.close()
        begun = time.perf_counter()
        code = await hive.close()
        figures[-1].notes.append(
            f"hive's shutdown (SIGTERM, stops every worker) took {time.perf_counter() - begun:.2f}s"
            f", exit code {code}"
        )
        return figures
    finally:
        await events.close()
        await hive.close()


#: Cores' worth of other processes' CPU during a figure above which the table warns.
OTHER_LOAD_WARNING = 0.1
#: Other processes' load during each group of figures, by the group's key.
OTHER_LOAD: dict[str, dict[str, float]] = {}


# -- the machine ----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in ("hive", "supervisor", "circus", "sglang-router", "aiohttp", "pydantic", "psutil"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "hive_commit": commit or None,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def shown(path: Path) -> str:
    """A path as the results show it: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# -- the table ------------------------------------------------------------------------------------


def fmt(value: Any, unit: str) -> str:
    if not isinstance(value, int | float):
        return "-"
    if unit == "req/s":
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell(summary: dict[str, Any], unit: str, stat: str) -> str:
    if "unavailable" in summary:
        return "unavailable"
    unit = summary.get("unit", unit)
    value = summary.get(stat, summary.get("value", summary.get("p50")))
    text = fmt(value, unit) + ("" if value is None else f" {unit}")
    if summary.get("censored"):
        text = ">" + text
    return text


def table(figures: list[Figure]) -> str:
    head = ("figure", "hive p50", "p95", "max", "n", "peer/floor p50", "target", "met?")
    rows = []
    for f in figures:
        h = f.hive
        if "unavailable" in h:
            first, p95, high, n = "unavailable", "-", "-", "-"
        else:
            main = h.get(f.stat) if f.stat == "value" else h.get("p50")
            first = f"{fmt(main, f.unit)} {f.unit}"
            p95, high = fmt(h.get("p95"), f.unit), fmt(h.get("max"), f.unit)
            n = str(h.get("n", "-"))
        peers = ", ".join(f"{k} {cell(v, f.unit, 'p50')}" for k, v in f.peers.items()) or "-"
        met = "n/a" if f.met is None else ("yes" if f.met else "NO")
        if f.target in ("", "(none)"):
            met = "-"
        rows.append((f"{f.key} {f.title}", first, p95, high, n, peers, f.target or "-", met))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------


async def guarded(
    figures: list[Figure], key: str, title: str, run: Callable[[], Awaitable[list[Figure]]]
) -> None:
    """Run one group of figures; a failure becomes a row that says so, not a crash."""
    log(f"figure {key}: {title}")
    begun = time.monotonic()
    load = OtherLoad()
    first = len(figures)
    try:
        figures.extend(await run())
    except Exception as exc:
        traceback.print_exc()
        figures.append(Figure(key, title, "", unavailable(f"error: {exc!r}"[:300])))
    other = load.result()
    OTHER_LOAD[key] = other
    for figure in figures[first:]:
        figure.other_load = other
    busy = (
        f"; other processes kept {other['other_cores']:.2f} cores busy meanwhile"
        f" ({other['stolen_cores']:.2f} stolen by the hypervisor)"
    )
    log(f"figure {key} done in {time.monotonic() - begun:.1f}s{busy}")


async def bench(settings: Settings) -> dict[str, Any]:
    figures: list[Figure] = []
    popened = Popened()
    peer: RouterDefaults | None = None
    peer_task: asyncio.Task[None] | None = None
    peer_error: str | None = None
    begun = time.monotonic()
    try:
        if "4" in settings.only:
            log("figure 4 (peer): sglang-router with default health checks, set up first")
            try:
                peer = RouterDefaults(settings, popened)
                await peer.setup()
                peer_task = asyncio.create_task(peer.run())
            except (PeerUnavailable, RuntimeError, TimeoutError) as exc:
                peer_error = f"{exc}"[:300]
                if peer is not None:
                    await peer.close()
                peer = None

        if settings.only & {"1", "2", "3"}:
            hive = bench_hive("main", HIVE_MAIN_CONFIG)
            await hive.start_async()
            events = await EventStream(hive).start()
            try:
                if settings.only & {"1", "2"}:
                    await guarded(
                        figures,
                        "1",
                        "spawn and readiness by probe",
                        lambda: figures_spawn_and_probe(settings, hive, events, popened),
                    )

                async def beat_and_crash() -> list[Figure]:
                    return list(await figures_heartbeat_and_crash(settings, hive, events))

                await guarded(figures, "2b", "readiness by heartbeat; crash", beat_and_crash)
            finally:
                await events.close()
                await hive.close()

            async def crash_peers() -> list[Figure]:
                crash = next((f for f in figures if f.key == "3"), None)
                crash_at = next((f for f in figures if f.key == "3'"), None)
                for name, sample in (("supervisord", crash_supervisord), ("circus", crash_circus)):
                    log(f"figure 3 (peer): {name}")
                    try:
                        recv, at = await sample(settings)
                    except (PeerUnavailable, RuntimeError, TimeoutError, OSError) as exc:
                        recv = at = unavailable(f"{exc}"[:300])
                    if crash is not None:
                        crash.peers[name] = recv
                    if crash_at is not None:
                        crash_at.peers[name] = at
                return []

            await guarded(figures, "3 (peers)", "crash under supervisord and circus", crash_peers)

        if "4" in settings.only:

            async def router() -> list[Figure]:
                return [await figure_router(settings, peer, peer_error)]

            await guarded(figures, "4", "out of the router", router)
        if "5" in settings.only:
            await guarded(figures, "5", "API", lambda: figures_api(settings, popened))
        if settings.only & {"6", "7"}:
            await guarded(figures, "6", "scale and overhead", lambda: figures_scale(settings))

        if peer is not None and peer_task is not None:
            peer.finishing.set()
            log("figure 4 (peer): waiting for the router to notice its dead workers")
            with contextlib.suppress(Exception):
                await peer_task
            row = next((f for f in figures if f.key == "4"), None)
            if row is not None:
                row.peers["sglang-router defaults"] = peer.result()
    finally:
        if peer_task is not None and not peer_task.done():
            peer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await peer_task
        if peer is not None:
            await peer.close()
        await popened.close()
    return {"figures": figures, "seconds": round(time.monotonic() - begun, 1)}


def main() -> int:
    settings = Settings.from_env()
    raise_fd_limit()
    info = machine()
    log(
        f"bench: {'quick' if settings.quick else 'full'} run, {settings.samples} samples, tag {TAG}"
    )
    whole = OtherLoad()
    outcome = asyncio.run(bench(settings))
    figures: list[Figure] = outcome["figures"]
    left = sweep(TAG)
    if os.environ.get("BENCH_KEEP", "") in ("", "0"):
        remove_homes()
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    info["other_load"] = whole.result()
    results = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": settings.quick,
        "duration_s": outcome["seconds"],
        "settings": {
            k: (sorted(v) if isinstance(v, frozenset) else shown(v) if isinstance(v, Path) else v)
            for k, v in asdict(settings).items()
        },
        "machine": info,
        "figures": [asdict(f) for f in figures],
        "leftover_processes": left,
    }
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    settings.out.write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(
        f"hive bench on {info['cpu_model']} ({info['cores']} cores), kernel {info['kernel']}, "
        f"Python {info['python']}; {outcome['seconds']:.0f}s"
        + (" (BENCH_QUICK: too few samples to judge)" if settings.quick else "")
    )
    print(table(figures))
    print(
        "(rows of one value - a rate, CPU, RSS, a wall time - show it under hive p50; "
        "their p95/max are of the per-request or per-worker times)"
    )
    print()
    for f in figures:
        if "unavailable" in f.hive:
            print(f"{f.key} {f.title}: {f.hive['unavailable']}")
        for name, peer in f.peers.items():
            if "unavailable" in peer:
                print(f"{f.key} {name}: {peer['unavailable']}")
    api = [f for f in figures if f.key.startswith("5") and f.key.endswith("'")]
    for f in api:
        peer = next(iter(f.peers.values()), {})
        print(
            f"{f.key} {f.title}: hive p50 {fmt(f.hive.get('p50'), 'ms')} ms, "
            f"p99 {fmt(f.hive.get('p99'), 'ms')} ms; bare aiohttp p50 "
            f"{fmt(peer.get('p50'), 'ms')} ms, p99 {fmt(peer.get('p99'), 'ms')} ms"
        )
    busy = {k: v for k, v in OTHER_LOAD.items() if v["other_cores"] >= OTHER_LOAD_WARNING}
    if busy:
        print(
            "WARNING: other processes loaded this machine during "
            + ", ".join(f"figure {k} ({v['other_cores']:.2f} cores)" for k, v in busy.items())
            + ": those figures are skewed; run again on a quiet machine"
        )
    print(f"results: {settings.out}")
    still = tagged_processes(TAG)
    print(f"leftover processes: {len(left)} killed by the final sweep, {len(still)} still alive")
    return 0 if not left and not still else 1


if __name__ == "__main__":
    sys.exit(main())

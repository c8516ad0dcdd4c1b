"""What the benchmark's figures share: statistics, tagged processes, a hive under test, its events.

Every process the bench starts (hive, its workers, supervisord, circusd, sglang-router, the
load generator, bare ``Popen`` workers) carries ``BENCH_TAG`` in its environment, so that the
final sweep finds anything left behind wherever it was reparented.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = sys.executable
#: Marks every process started by this run of the bench.
TAG = f"hive-bench-{os.getpid()}-{random.randrange(1 << 30)}"
READY_AT = re.compile(rb"ready_at=(\d+(?:\.\d+)?)")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- statistics -----------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted values, linearly interpolated (numpy's default)."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q
    low = math.floor(pos)
    high = math.ceil(pos)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def summarize(values: Sequence[float], *, keep: bool = True) -> dict[str, Any]:
    """n, p50, p95, p99, min, max, mean of ``values`` (and the values themselves)."""
    ordered = sorted(values)
    out: dict[str, Any] = {"n": len(ordered)}
    if ordered:
        out.update(
            p50=round(percentile(ordered, 0.50), 3),
            p95=round(percentile(ordered, 0.95), 3),
            p99=round(percentile(ordered, 0.99), 3),
            min=round(ordered[0], 3),
            max=round(ordered[-1], 3),
            mean=round(sum(ordered) / len(ordered), 3),
        )
    if keep:
        out["samples"] = [round(v, 3) for v in values]
    return out


# -- ports and environment ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def port_block(size: int) -> int:
    """The first port of ``size`` consecutive ports that are all free now (below the
    ephemeral range, so that outgoing connections do not take them meanwhile)."""
    low_ephemeral = 32768
    with contextlib.suppress(OSError, ValueError):
        low_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        base = random.randrange(20000, max(20001, low_ephemeral - size - 1), 10)
        if all(port_free(p) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no block of {size} free ports")


def bench_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment whose platformdirs point under ``home``, tagged for the leak sweep."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HIVE_", "XDG_", "NOTIFY_SOCKET", "WATCHDOG_", "BENCH_"))
    }
    env.update(
        {
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / "config"),
            "XDG_STATE_HOME": str(home / "state"),
            "XDG_RUNTIME_DIR": str(home / "run"),
            "XDG_DATA_HOME": str(home / "data"),
            "XDG_CACHE_HOME": str(home / "cache"),
            "BENCH_TAG": TAG,
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    env.update(extra or {})
    return env


#: Every temp dir the bench made, removed at the end (unless BENCH_KEEP=1).
HOMES: list[Path] = []


def new_home(prefix: str) -> Path:
    """A short temp dir (a unix socket's path must fit in 108 bytes)."""
    home = Path(tempfile.mkdtemp(prefix=f"hb-{prefix}-"))
    (home / "run").mkdir(mode=0o700)
    HOMES.append(home)
    return home


def remove_homes() -> None:
    for home in HOMES:
        shutil.rmtree(home, ignore_errors=True)


# -- processes ------------------------------------------------------------------------------------


def tagged_processes(tag: str = TAG) -> list[psutil.Process]:
    """Live processes (not zombies) whose environment carries the bench's tag."""
    found = []
    marker = f"BENCH_TAG={tag}".encode()
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as file:
                environ = file.read()
            if marker in environ.split(b"\0") and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def kill_tree(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM a process we started and wait; past ``grace``, SIGKILL it and what it started."""
    if proc.poll() is not None:
        return
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()


def wait_quietly(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to ``timeout`` for a process to exit; whether it did."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def sweep(tag: str = TAG) -> list[str]:
    """Kill whatever the bench left (there should be nothing); describe what was found."""
    left = []
    for proc in tagged_processes(tag):
        with contextlib.suppress(psutil.Error):
            left.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            proc.kill()
    return left


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def machine_seconds() -> tuple[float, float]:
    """CPU-seconds all cores have run processes since boot (user, nice, system: interrupts
    are left out, loopback traffic is counted there), and seconds stolen by the hypervisor."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(x) for x in fields[:8])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system) / tick, steal / tick


def own_seconds() -> float:
    """CPU-seconds used by the bench so far: this process, what it has reaped, and every live
    process it started (each with what that one has reaped)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime
    for proc in tagged_processes():
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


@dataclass
class OtherLoad:
    """How busy the machine was with work that is not the bench's, over some span: busy time
    of all cores less the CPU time of the bench and of what it started (counted once reaped)."""

    machine0: tuple[float, float] = field(default_factory=machine_seconds)
    own0: float = field(default_factory=own_seconds)
    wall0: float = field(default_factory=time.monotonic)

    def result(self) -> dict[str, float]:
        wall = max(time.monotonic() - self.wall0, 1e-9)
        busy, steal = machine_seconds()
        other = max((busy - self.machine0[0]) - (own_seconds() - self.own0), 0.0)
        stolen = steal - self.machine0[1]
        return {
            "wall_s": round(wall, 1),
            "other_cpu_s": round(other, 1),
            "other_cores": round(other / wall, 2),
            "stolen_cores": round(stolen / wall, 2),
        }


@dataclass
class Usage:
    """CPU and memory of some daemons over one window, sampled once a second."""

    procs: dict[str, psutil.Process]
    cpu0: dict[str, float] = field(default_factory=dict)
    rss: dict[str, list[int]] = field(default_factory=dict)
    started: float = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        for name, proc in self.procs.items():
            self.cpu0[name] = cpu_seconds(proc)
            self.rss[name] = [proc.memory_info().rss]

    def sample(self) -> None:
        for name, proc in self.procs.items():
            with contextlib.suppress(psutil.Error):
                self.rss[name].append(proc.memory_info().rss)

    def result(self) -> dict[str, dict[str, float]]:
        elapsed = time.monotonic() - self.started
        out = {}
        for name, proc in self.procs.items():
            cpu = cpu_seconds(proc) - self.cpu0[name]
            out[name] = {
                "cpu_percent": round(100 * cpu / elapsed, 3),
                "rss_mb": round(max(self.rss[name]) / 1e6, 1),
                "window_s": round(elapsed, 1),
            }
        return out


async def watch_usage(procs: dict[str, psutil.Process], seconds: float) -> dict[str, Any]:
    usage = Usage(procs)
    usage.start()
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(1.0, left))
        usage.sample()
    return usage.result()


async def wait_http_ok(url: str, timeout: float, interval: float = 0.02) -> float:
    """Poll ``url`` until it answers 2xx; returns when (``time.time()``)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with http.get(url) as response:
                    if 200 <= response.status < 300:
                        return time.time()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer 2xx in {timeout:g}s")
            await asyncio.sleep(interval)


async def wait_file_match(path: Path, pattern: re.Pattern[bytes], timeout: float) -> bytes:
    """Poll a log file until ``pattern`` matches in it; returns the first group."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            match = pattern.search(path.read_bytes())
            if match:
                return match.group(1)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{pattern.pattern!r} not in {path} after {timeout:g}s")
        await asyncio.sleep(0.005)


async def ready_at(path: Path, timeout: float = 10.0) -> float:
    """The demo worker's own ``ready_at=<unix time>`` from its log."""
    return float(await wait_file_match(path, READY_AT, timeout))


def iso_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# -- a hive under test ----------------------------------------------------------------------------


class Hive:
    """One ``hive serve`` in its own temp dir, on free loopback ports, with a config."""

    def __init__(self, name: str, config: str = "", port_span: int = 500) -> None:
        self.name = name
        self.home = new_home(name)
        self.port = free_port()
        self.port_range = (low := port_block(port_span), low + port_span - 1)
        self.socket = self.home / "run" / "hive.sock"
        self.state_dir = self.home / "state" / "hive"
        self.token_file = self.home / "config" / "hive" / "token"
        self.config_path = self.home / "hive.toml"
        self.config_path.write_text(
            f'listen = "127.0.0.1:{self.port}"\n'
            f'socket = "{self.socket}"\n'
            f'state_dir = "{self.state_dir}"\n'
            f'token_file = "{self.token_file}"\n'
            f"port_range = [{self.port_range[0]}, {self.port_range[1]}]\n"
            "stop_timeout = 5\n"
            'default_restart = "no"\n' + config
        )
        self.env = bench_env(self.home)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.home / "hive.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = ""
        self._http: aiohttp.ClientSession | None = None

    async def start(self, timeout: float = 30.0) -> Hive:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "hive", "serve", "--config", str(self.config_path)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.home,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hive exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(TimeoutError):
                await wait_http_ok(f"{self.url}/health", 0.2)
                if self.token_file.exists():
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"hive did not answer in {timeout:g}s:\n{self.log()}")
        self.token = self.token_file.read_text().strip()
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def http(self) -> aiohttp.ClientSession:
        """A keep-alive session to the API with the token."""
        if self._http is None:
            self._http = aiohttp.ClientSession(
                self.url,
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=300),
                connector=aiohttp.TCPConnector(limit=0),
            )
        return self._http

    def worker_log(self, worker_id: str) -> Path:
        return self.state_dir / "logs" / f"{worker_id}.log"

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        ok: Sequence[int] = (200, 201, 202),
    ) -> Any:
        async with self.http().request(method, path, json=json_body, params=params) as response:
            body = await response.json(content_type=None)
            if response.status not in ok:
                raise RuntimeError(f"{method} {path}: HTTP {response.status} {body}")
            return body

    async def spawn(self, spec: Mapping[str, Any], wait: bool = False) -> dict[str, Any]:
        params = {"wait": "ready", "timeout": "60"} if wait else None
        return dict(await self.call("POST", "/v1/workers", json_body=dict(spec), params=params))

    async def stop_worker(self, worker_id: str, wait: bool = True) -> dict[str, Any]:
        params = {"wait": "true"} if wait else None
        return dict(await self.call("POST", f"/v1/workers/{worker_id}/stop", params=params))

    async def close(self) -> int | None:
        """SIGTERM hive (it stops its workers) and wait; returns its exit code."""
        if self._http is not None:
            await self._http.close()
            self._http = None
        code = None
        if self.proc is not None:
            proc = self.proc
            await asyncio.to_thread(kill_tree, proc, 60.0)
            code = proc.returncode
            self.proc = None
        return code


# -- hive's event stream --------------------------------------------------------------------------


@dataclass
class Received:
    """One event from ``/v1/events`` and when this process read it (``time.time()``)."""

    recv: float
    data: dict[str, Any]

    @property
    def at(self) -> float:
        return iso_time(str(self.data["at"]))


class EventStream:
    """Follows ``GET /v1/events`` in the background; lets a figure wait for a worker's state."""

    def __init__(self, hive: Hive) -> None:
        self.hive = hive
        self.history: list[Received] = []
        self._waiters: list[tuple[Callable[[Received], bool], asyncio.Future[Received]]] = []
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> EventStream:
        self._session = aiohttp.ClientSession(
            headers=self.hive.headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
        )
        self._task = asyncio.create_task(self._follow())
        await asyncio.wait_for(self._connected.wait(), 10)
        return self

    async def _follow(self) -> None:
        assert self._session is not None
        async with self._session.get(f"{self.hive.url}/v1/events") as response:
            response.raise_for_status()
            self._connected.set()
            kind, data = "", ""
            async for raw in response.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith(":"):
                    continue
                if line:
                    name, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if name == "event":
                        kind = value
                    elif name == "data":
                        data += value
                    continue
                if kind == "worker" and data:
                    self._deliver(Received(time.time(), json.loads(data)))
                kind, data = "", ""

    def _deliver(self, event: Received) -> None:
        self.history.append(event)
        for waiter in list(self._waiters):
            match, future = waiter
            if not future.done() and match(event):
                future.set_result(event)
                self._waiters.remove(waiter)

    async def wait(
        self, match: Callable[[Received], bool], timeout: float, since: int = 0
    ) -> Received:
        """The first event at or after ``history[since]`` that matches (waiting if need be)."""
        for event in self.history[since:]:
            if match(event):
                return event
        future: asyncio.Future[Received] = asyncio.get_running_loop().create_future()
        self._waiters.append((match, future))
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove((match, future))

    async def state(self, worker_id: str, to: str | set[str], timeout: float = 60) -> Received:
        states = {to} if isinstance(to, str) else to
        return await self.wait(
            lambda e: e.data.get("id") == worker_id and e.data.get("to") in states, timeout
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._session is not None:
            await self._session.close()

"""What the benchmark's figures share beyond ``harness/``: its tag, temp dirs and environment,
CPU accounting, a hive set up for it, and hive's event stream.

Every process the bench starts (hive, its workers, supervisord, circusd, sglang-router, the
load generator, bare ``Popen`` workers) carries ``BENCH_TAG`` in its environment, so that the
final sweep finds anything left behind wherever it was reparented.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from harness import ROOT
from harness.daemon import Hive
from harness.env import isolated_env
from harness.net import port_block
from harness.procs import Tag, tagged_processes
from hive.client.sse import SSEParser

BENCH = ROOT / "bench"
PYTHON = sys.executable
#: Marks every process started by this run of the bench.
TAG = Tag.new("BENCH_TAG", "hive-bench")
READY_AT = re.compile(rb"ready_at=(\d+(?:\.\d+)?)")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


#: What every environment the bench makes adds, and the prefixes of its own that it keeps out.
EXTRA_ENV = {"PYTHONDONTWRITEBYTECODE": "1"}
DROP_ENV = ("BENCH_",)


def bench_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment whose platformdirs point under ``home``, tagged for the leak sweep."""
    return isolated_env(home, TAG, {**EXTRA_ENV, **(extra or {})}, drop=DROP_ENV)


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


# -- CPU time --------------------------------------------------------------------------------------


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
    for proc in tagged_processes(TAG):
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


def bench_hive(name: str, config: str = "", port_span: int = 500) -> Hive:
    """A hive for the bench, in its own temp dir (``hb-<name>-*``), its workers on ``port_span``
    free ports, restarting nothing unless ``config`` says so."""
    home = new_home(name)
    low = port_block(port_span)
    return Hive(
        'default_restart = "no"\n' + config,
        EXTRA_ENV,
        tag=TAG,
        home=home,
        port_range=(low, low + port_span - 1),
        drop_env=DROP_ENV,
        log_tail=4000,
    )


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
        #: How often hive cut the stream off and it was resumed from the ring.
        self.reconnects = 0

    async def start(self) -> EventStream:
        self._session = aiohttp.ClientSession(
            headers=self.hive.headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
        )
        self._task = asyncio.create_task(self._follow())
        await asyncio.wait_for(self._connected.wait(), 10)
        return self

    async def _follow(self) -> None:
        """Follow the stream; when hive cuts it off (this process fell ``events_queue`` events
        behind, as it can while it sends hundreds of spawns on a 2-core machine), reconnect
        with ``Last-Event-ID`` and resume from hive's ring, so no event is lost."""
        assert self._session is not None
        last: str | None = None
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                async with self._session.get(
                    f"{self.hive.url}/v1/events", headers=headers
                ) as response:
                    response.raise_for_status()
                    self._connected.set()
                    parser = SSEParser()
                    async for raw in response.content:
                        for event in parser.feed(raw):
                            if event.id:
                                last = event.id
                            if event.event == "reset":  # ids are <instance>-<seq>
                                return self._fail(
                                    "hive could not replay the events missed (its ring no "
                                    "longer held them, or hive restarted since)"
                                )
                            if event.event == "worker" and event.data:
                                self._deliver(Received(time.time(), json.loads(event.data)))
            except (TimeoutError, aiohttp.ClientError):
                pass
            self.reconnects += 1
            await asyncio.sleep(0.1)

    def _fail(self, why: str) -> None:
        """The stream cannot say every event any more: every wait fails, saying why."""
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(RuntimeError(f"the event stream lost events: {why}"))
        self._waiters.clear()

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
            lambda e: (
                e.data.get("id") == worker_id
                and e.data.get("to") in states
                and "changed" not in e.data
            ),  # a change of state, not of fields
            timeout,
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._session is not None:
            await self._session.close()

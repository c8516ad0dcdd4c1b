"""What the figures share: the settings, the row each figure fills, the main hive's backends,
and the processes the bench starts itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import BENCH, PYTHON, bench_env, new_home

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
    burst: int
    connections: int
    list_connections: int
    router_peer_samples: int
    router_peer_stagger: float
    router_peer_cap: float
    fleet: tuple[int, ...]
    fleet_rest: float
    only: frozenset[str]
    out: Path
    pyspy: Path | None

    @classmethod
    def from_env(cls) -> Settings:
        quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
        scale = os.environ.get("BENCH_SCALE", "") or ("20,50" if quick else "200,1000")
        only = os.environ.get("BENCH_ONLY", "") or "1,2,3,4,5,6,7,8,9"
        fleet = os.environ.get("BENCH_FLEET", "") or ("20,50" if quick else "100,300,1000")
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
            burst=_env_int("BENCH_BURST", 10 if quick else 100),
            connections=_env_int("BENCH_CONNECTIONS", 16),
            list_connections=_env_int("BENCH_LIST_CONNECTIONS", 4),
            router_peer_samples=_env_int("BENCH_ROUTER_PEER_SAMPLES", 3 if quick else 30),
            router_peer_stagger=_env_float("BENCH_ROUTER_PEER_STAGGER", 0 if quick else 60),
            router_peer_cap=_env_float("BENCH_ROUTER_PEER_CAP", 0 if quick else 240),
            fleet=tuple(int(x) for x in fleet.split(",") if x.strip()),
            fleet_rest=_env_float("BENCH_FLEET_REST", 10 if quick else 60),
            only=frozenset(x.strip() for x in only.split(",")),
            out=Path(out),
            pyspy=Path(pyspy).resolve() if pyspy else None,
        )


# -- a row -----------------------------------------------------------------------------------------


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
    if settings.pyspy is None:
        return None
    settings.pyspy.mkdir(parents=True, exist_ok=True)
    kind = os.environ.get("BENCH_PYSPY_FORMAT", "") or "flamegraph"
    suffix = {"flamegraph": "svg", "raw": "txt", "speedscope": "json"}.get(kind, kind)
    out = settings.pyspy / f"{name}.{suffix}"
    return str(out) if await _record(pid, out, kind, seconds) else None


async def _record(pid: int, out: Path, kind: str, seconds: float) -> bool:
    spy = shutil.which("py-spy", path=str(Path(PYTHON).parent))
    if spy is None:
        return False
    proc = await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
        "--rate", "250", "--nonblocking", "--format", kind, "--output", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await proc.wait()
    return out.exists()


async def profile_top(
    settings: Settings, pid: int, name: str, seconds: float, top: int = 6
) -> list[str]:
    """A py-spy profile of ``pid`` over ``seconds`` (in a pass of its own, so the measured
    window is not perturbed), taken apart: where hive's busy samples went. Its collapsed
    stacks are kept as ``<name>.txt`` in BENCH_PYSPY's directory when one is given. Empty
    without py-spy."""
    if settings.pyspy is not None:
        settings.pyspy.mkdir(parents=True, exist_ok=True)
    out = (settings.pyspy or new_home("pyspy")) / f"{name}.txt"
    if not await _record(pid, out, "raw", seconds):
        return []
    return top_entries(out.read_text(), top)


def top_entries(collapsed: str, top: int) -> list[str]:
    """From py-spy's collapsed stacks: the functions the samples were in (self), and hive's own
    innermost frame of each sample (what in hive asked for that work), each as a share of the
    busy samples."""
    leaf: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        n = int(count)
        total += n
        leaf[_frame(frames[-1])] += n
        mine = [f for f in frames if _in_hive(f)]
        ours[_frame(mine[-1]) if mine else "(outside hive's code)"] += n
    if not total:
        return []

    def share(counter: Counter[str]) -> str:
        return "; ".join(f"{k} {100 * v / total:.0f} %" for k, v in counter.most_common(top))

    return [
        f"idle profile (py-spy, {total} busy samples at 250 Hz), self: {share(leaf)}",
        f"idle profile, hive's innermost frame: {share(ours)}",
    ]


def _in_hive(frame: str) -> bool:
    """A frame of hive's own code (``hive/...`` relative, or ``.../hive/...`` absolute)."""
    path = frame.partition(" (")[2]
    return (path.startswith("hive/") or "/hive/" in path) and "site-packages" not in path


def _frame(frame: str) -> str:
    """``write (asyncio/selector_events.py:1071)`` -> ``write (selector_events.py)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0]
    return f"{name} ({Path(path).name})" if path else name


def tiny_command(flags: str) -> str:
    return f"{PYTHON} {BENCH / 'tiny_worker.py'} {flags}"


#: The backends of the one hive that figures 1 to 3 share: ``probe`` is made ready by its health
#: probe (``spawn.py``), ``beat`` by its first heartbeat (``crash.py``).
HIVE_MAIN_CONFIG = """
[backends.probe]
command = ["{python}", "-m", "hive.demo_worker", "--port", "{port}", "--model", "{model}",
           "--no-heartbeat"]
health_path = "/health"

[backends.beat]
command = ["{python}", "-m", "hive.demo_worker", "--port", "{port}", "--model", "{model}"]
health_path = ""

[backends.sleeper]
command = ["/bin/sleep", "3600"]
health_path = ""
startup_timeout = 3600
"""


def durable_write(directory: Path, data: bytes) -> None:
    """The least a durable change costs: a small file written, fsynced, renamed into place and
    its directory fsynced (what hive's journal does for each change, at the least)."""
    partial = directory / "floor.json.tmp"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, directory / "floor.json")
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


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

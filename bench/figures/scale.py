"""Figure 6: many tiny workers: time until all are ready, then hive's idle CPU and RSS beside
supervisord and circus holding as many; figure 7 (``stop_all.py``) runs in the middle."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import Any

import psutil
from benchlib import BENCH, EventStream, bench_hive, watch_usage
from peers import Circus, PeerUnavailable, Supervisord

from figures.common import (
    Figure,
    Settings,
    check,
    ms,
    profile_top,
    tiny_command,
    unavailable,
    wait_listening,
)
from figures.stop_all import figure_stop_all
from harness.daemon import Hive
from harness.net import port_block
from harness.stats import summarize


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


def tiny_backend(name: str, extra: str) -> str:
    return (
        f"\n[backends.{name}]\n"
        f'command = ["{{python}}", "{BENCH / "tiny_worker.py"}", "--port", "{{port}}"]\n'
        'health_path = "/health"\nstartup_timeout = 300\n' + extra
    )


#: Probes off: hive then does what supervisord does for these workers, watch for exits.
QUIET = tiny_backend("tiny", "liveness_period = 1e9\n")
#: Default settings, and the engine's load read from its /slots as llama-server's backend does.
DEFAULT = tiny_backend("tiny", 'load = {path = "/slots", format = "llama-server"}\n')


async def crash_samples(hive: Hive, events: EventStream, ids: list[str], count: int) -> list[float]:
    """SIGKILL ``count`` of ``ids`` one at a time: each kill -> its ``failed`` event received."""
    samples = []
    for worker_id in ids[:count]:
        record = await hive.call("GET", f"/v1/workers/{worker_id}")
        killed = time.time()
        os.kill(record["pid"], signal.SIGKILL)
        event = await events.state(worker_id, "failed", 30)
        samples.append(event.recv - killed)
    return samples


def left_behind(hive: Hive) -> str:
    """What a clean shutdown left of the worker cgroups (there should be none), said in a
    note; the bench removes them either way, so no run leaves any."""
    left = [p for p in hive.cgroups() if p.name.startswith("worker.")]
    hive.remove_cgroups()
    return f"; it LEFT {len(left)} empty worker cgroups (removed by the bench)" if left else ""


def idle_figure(
    label: str,
    usage: dict[str, Any],
    peers: dict[str, Any],
    target: str,
    met: bool | None,
    notes: list[str],
) -> Figure:
    return Figure(
        "6",
        label,
        "%",
        {"value": usage["hive"]["cpu_percent"], "n": 1},
        peers,
        target=target,
        met=met,
        stat="value",
        notes=notes,
    )


async def figures_scale(settings: Settings) -> list[Figure]:
    small, large = (*settings.scale, 0, 0)[:2]
    figures: list[Figure] = []
    figures += await _quiet_beside_peers(settings, small)
    figures += await _default_settings(settings, small, large)
    return figures


async def _quiet_beside_peers(settings: Settings, small: int) -> list[Figure]:
    """Probes off, ``small`` workers, in one idle window with supervisord and circus holding as
    many; then figure 7 (stop at once)."""
    notes: list[str] = []
    hive = bench_hive("scale-quiet", QUIET, port_span=2 * small + 100)
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
            figures.append(
                Figure(
                    "6",
                    f"start {small} tiny workers: all ready",
                    "s",
                    summarize(per, keep=False) | {"value": round(wall, 3)},
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
        for name, why in peer_ready.items():
            if "unavailable" in why:
                cpu_peers[name] = why
        window = f"over {usage['hive']['window_s']:g} s idle, all three daemons in one window"
        sv = usage.get("supervisord", {}).get("cpu_percent")
        figures.append(
            idle_figure(
                f"idle CPU of hive, {small} workers, probes off",
                usage,
                cpu_peers,
                "<= supervisord (200 workers)",
                check(usage["hive"]["cpu_percent"], "<=", sv) if small == 200 else None,
                [
                    f"% of one core {window}; the daemon's own process only; liveness probes "
                    "off (liveness_period = 1e9): exits are all any of the three watches"
                ],
            )
        )
        ids = [f"tiny-{i:04d}" for i in range(small)]
        figures.append(await figure_stop_all(settings, hive, ids))
        await events.close()
        await hive.close()
        figures[-1].notes.append("hive's shutdown: done" + left_behind(hive))
        return figures
    finally:
        await events.close()
        await hive.close()
        hive.remove_cgroups()
        hive.remove_cgroups()


async def _default_settings(settings: Settings, small: int, large: int) -> list[Figure]:
    """Default settings, with load reads: ``small`` workers idle, SIGKILLs among them; then
    ``large`` in all, the same again, and hive's RSS."""
    hive = bench_hive("scale", DEFAULT, port_span=2 * max(small, large) + 100)
    await hive.start_async()
    events = await EventStream(hive).start()
    figures: list[Figure] = []
    crashes = 5 if settings.quick else 20
    try:
        held = 0
        for count, target, limit in (
            (small, "<= 1 % (200 workers)", (200, 1.0)),
            (large, "<= 3 % (1,000 workers)", (1000, 3.0)),
        ):
            if not count:
                continue
            notes: list[str] = []
            count = memory_cap(count, notes)
            if count > held:
                _, _, failed = await spawn_many(hive, events, count - held, f"d{count}")
                if failed:
                    notes.append(f"{failed} failed to start")
                if events.reconnects:
                    notes.append(
                        f"the bench's event stream fell behind and was resumed from hive's ring "
                        f"{events.reconnects} time(s) while it spawned"
                    )
                held = count
            # At rest: past the start-up, and past the load reads' back-off from every 2 s to
            # every liveness period (2 + 4 + 8 s) that follows each worker's ready.
            await asyncio.sleep(3 if settings.quick else 16)
            usage = await watch_usage({"hive": psutil.Process(hive.pid)}, settings.idle_seconds)
            top = await profile_top(settings, hive.pid, f"idle-{count}", settings.idle_seconds)
            figures.append(
                idle_figure(
                    f"idle CPU of hive, {count} workers, default settings",
                    usage,
                    {},
                    target,
                    check(usage["hive"]["cpu_percent"], "<=", limit[1])
                    if count == limit[0]
                    else None,
                    [
                        f"% of one core over {usage['hive']['window_s']:g} s idle; liveness "
                        "probes and load reads (/slots) at their defaults",
                        *notes,
                        *top,
                    ],
                )
            )
            figures.append(
                Figure(
                    "6",
                    f"RSS of hive, {count} workers",
                    "MB",
                    {"value": usage["hive"]["rss_mb"], "n": 1},
                    target="<= 150 MB (1,000 workers)" if count == large else "(none)",
                    met=check(usage["hive"]["rss_mb"], "<=", 150) if count == 1000 else None,
                    stat="value",
                )
            )
            listed = (await hive.call("GET", "/v1/workers"))["workers"]
            ids = [w["id"] for w in listed if w["state"] == "ready"]
            samples = ms(await crash_samples(hive, events, ids, crashes))
            crash = summarize(samples)
            figures.append(
                Figure(
                    "3",
                    f"crash: SIGKILL -> failed event, {count} workers",
                    "ms",
                    crash,
                    target="p50 <= 10 ms",
                    met=check(crash["p50"], "<=", 10),
                    notes=["received by this client on GET /v1/events; the worker restarts"],
                )
            )
        await events.close()
        begun = time.perf_counter()
        code = await hive.close()
        if figures:
            figures[-1].notes.append(
                f"hive's shutdown (SIGTERM, stops every worker) took "
                f"{time.perf_counter() - begun:.2f}s, exit code {code}" + left_behind(hive)
            )
        return figures
    finally:
        await events.close()
        await hive.close()
        hive.remove_cgroups()

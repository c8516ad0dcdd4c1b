"""Figure 6: many tiny workers: time until all are ready, then hive's idle CPU and RSS beside
supervisord and circus holding as many; figure 7 (``stop_all.py``) runs in the middle."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import psutil
from benchlib import BENCH, EventStream, bench_hive, watch_usage
from peers import Circus, PeerUnavailable, Supervisord

from figures.common import (
    Figure,
    Settings,
    check,
    profile,
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

        # 7: stop some of them at once (then the rest), before the larger count starts.
        ids = [f"tiny-{i:04d}" for i in range(small)]
        figures.append(await figure_stop_all(settings, hive, ids))

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

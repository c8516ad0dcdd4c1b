"""Figures 2b, 3 and 3': readiness by heartbeat and crash detection, sampled together on the
main hive (each worker is made ready by its first heartbeat, then SIGKILLed); the same SIGKILL
under supervisord and circus."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from typing import Any

from benchlib import EventStream, log, ready_at
from peers import Circus, PeerUnavailable, Supervisord

from figures.common import Figure, Settings, check, ms, tiny_command, unavailable, wait_listening
from harness.daemon import Hive
from harness.net import port_block
from harness.stats import summarize

#: circus' default ``check_delay`` (seconds between its checks for dead processes) when
#: started from an ini file, as the bench starts it.
CIRCUS_CHECK_DELAY = 5.0


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


async def crash_peers(settings: Settings, figures: list[Figure]) -> list[Figure]:
    """The same SIGKILL under supervisord and circus, added as peers to rows 3 and 3' (already
    in ``figures``); adds no row of its own."""
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

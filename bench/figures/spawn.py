"""Figures 1 and 2a: spawn (``POST /v1/workers`` beside a bare ``Popen``) and readiness by
health probe, sampled together on the main hive."""

from __future__ import annotations

import asyncio
import json
import time

from benchlib import EventStream, new_home, ready_at

from figures.common import Figure, Popened, Settings, check, demo_argv, durable_write, ms
from harness.daemon import Hive
from harness.net import free_port
from harness.stats import summarize


async def figures_spawn_and_probe(
    settings: Settings, hive: Hive, events: EventStream, popened: Popened
) -> list[Figure]:
    home = new_home("popen")
    spawn_s: list[float] = []
    popen_s: list[float] = []
    durable_s: list[float] = []
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
        started = time.perf_counter()
        durable_write(home, json.dumps(record).encode())
        durable_took = time.perf_counter() - started
        await ready_at(log_path, 30)  # let it finish starting: the next sample starts quiet
        await popened.reap(proc)
        if i == 0:
            continue
        spawn_s.append(took)
        popen_s.append(popen_took)
        durable_s.append(popen_took + durable_took)
        lag_recv.append(event.recv - own)
        lag_at.append(event.at - own)

    rtt: list[float] = []
    for _ in range(settings.samples):
        started = time.perf_counter()
        await hive.call("GET", "/health")
        rtt.append(time.perf_counter() - started)
    spawn = summarize(ms(spawn_s))
    floor = summarize(ms(popen_s))
    durable = summarize(ms(durable_s))
    spawn_fig = Figure(
        "1",
        "spawn: POST /v1/workers -> record with pid",
        "ms",
        spawn,
        {"Popen": floor, "durable floor": durable},
        target="p50 <= 3x durable floor p50",
        met=check(spawn["p50"], "<=", 3 * durable["p50"]),
        notes=[
            "demo worker --no-heartbeat; Popen of the same argv, start_new_session, stdout to a "
            "file; each sample waits for the worker to be ready and stops it before the next",
            "durable floor: that Popen plus the record written to a file, fsynced, renamed and "
            "its directory fsynced, on the same filesystem as hive's state_dir",
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


async def figure_spawn_burst(settings: Settings, hive: Hive, popened: Popened) -> Figure:
    """1b: ``settings.burst`` spawns sent at once, until every one is answered, beside as many
    bare Popens of the same program plus one durable write."""
    count = settings.burst
    home = new_home("burst")
    argv = ["/bin/sleep", "3600"]
    begun = time.perf_counter()
    answers = await asyncio.gather(
        *(
            hive.spawn({"model": "bench", "backend": "sleeper", "id": f"burst-{i:03d}"})
            for i in range(count)
        )
    )
    wall = time.perf_counter() - begun
    if not all(a.get("pid") for a in answers):
        raise RuntimeError("a spawn of the burst answered without a pid")
    await asyncio.gather(*(hive.stop_worker(a["id"]) for a in answers))
    for a in answers:
        await hive.call("DELETE", f"/v1/workers/{a['id']}")
    begun = time.perf_counter()
    procs = [popened.start(argv, home / "burst.log", home) for _ in range(count)]
    durable_write(home, b"{}")
    floor = time.perf_counter() - begun
    for proc in procs:
        await popened.reap(proc)
    return Figure(
        "1b",
        f"{count} spawns sent at once: all answered",
        "ms",
        {"value": round(wall * 1000, 2), "n": count},
        {f"Popen x{count} + 1 durable write": {"value": round(floor * 1000, 2)}},
        target="<= 2x the floor",
        met=check(wall, "<=", 2 * floor) if count == 100 else None,
        stat="value",
        notes=[
            "/bin/sleep workers (no probe); every answer holds a pid and is on disk (the "
            "journal's writes fold the changes that arrive during one into the next: a group "
            "commit); the floor starts the same processes one after another and writes once"
        ],
    )

"""Figures 1 and 2a: spawn (``POST /v1/workers`` beside a bare ``Popen``) and readiness by
health probe, sampled together on the main hive."""

from __future__ import annotations

import json
import time

from benchlib import EventStream, new_home, ready_at

from figures.common import Figure, Popened, Settings, check, demo_argv, ms
from harness.daemon import Hive
from harness.net import free_port
from harness.stats import summarize


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

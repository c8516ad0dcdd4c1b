"""A worker's lifecycle without a daemon: a :class:`WorkerRun` over the real spawner, real
processes and real probes, with the registry as the only witness. Also the adoption plan on its
own (the probes alone are in tests/unit/test_probes.py)."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hivetest import TAG

from harness.waits import async_wait_for
from hive.config import Config
from hive.devices import cpu
from hive.devices.placement import Placer
from hive.host.containment import choose
from hive.host.process import Spawner, start_time
from hive.models import SpawnRequest, State, Worker
from hive.state.journal import Saved
from hive.state.registry import Registry, now
from hive.workers.adoption import GONE_ERROR, plan, reattach
from hive.workers.deps import Deps
from hive.workers.logs import Logs
from hive.workers.ports import PortPool
from hive.workers.probes import Prober
from hive.workers.reservations import Reservations
from hive.workers.run import WorkerRun

PY = sys.executable
#: A worker that serves a health page on its port (the directory listing of /).
SERVES = ["{python}", "-m", "http.server", "--bind", "127.0.0.1", "--directory", "/", "{port}"]
BACKENDS = {
    "serves": {"command": SERVES, "health_path": "/", "startup_timeout": 20},
    # No health path: ready only by heartbeat (never, here). A probe could reach whatever else
    # listens on the port meanwhile (another test's worker) and take that for this one.
    "crashes": {
        "command": ["{python}", "-c", "import sys; sys.exit(3)"],
        "startup_timeout": 20,
        "health_path": "",
    },
    "silent": {
        "command": ["{python}", "-c", "import time; time.sleep(60)"],
        "startup_timeout": 1,
        "health_path": "",
    },
    "missing": {"command": ["/nonexistent/engine", "{port}"]},
    "notfound": {"command": SERVES, "health_path": "/health", "startup_timeout": 2},
}


@pytest.fixture
async def deps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Deps]:
    monkeypatch.setenv(TAG.var, TAG.value)  # the leak check finds what these tests start
    low = random.randrange(20000, 60000, 500)
    config = Config(
        state_dir=tmp_path,
        port_range=(low, low + 99),
        restart_delay=0.1,
        stop_timeout=5,
        backends=BACKENDS,
    )
    ports = PortPool(*config.port_range)
    deps = Deps(
        config=config,
        registry=Registry(),
        spawner=Spawner(),
        logs=Logs(tmp_path / "logs", config.max_log_bytes),
        prober=Prober(),
        reservations=Reservations(Placer(cpu.discover()), ports, "127.0.0.1"),
        api_url="http://127.0.0.1:9",
        containment=choose("auto", tmp_path)[0],
    )
    await deps.prober.start()
    yield deps
    await deps.prober.close()
    deps.spawner.close()
    # Whatever a failed test left running goes, and its cgroup with it.
    for worker_id, pids in deps.containment.inventory().items():
        deps.containment.kill(worker_id)
        for pid in pids:  # this process's children: reaped, not left as zombies
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        await async_wait_for(lambda w=worker_id: deps.containment.empty(w), what="emptied")
        deps.containment.release(worker_id)
    deps.containment.close()


def add(deps: Deps, backend: str, restart: str = "no") -> WorkerRun:
    spec = SpawnRequest(model="m", backend=backend, id=f"w-{backend}", restart=restart)
    backend_config = deps.config.backends[backend]

    def build(entries: Any) -> dict[str, Any]:
        reserved = deps.reservations.reserve(
            spec, backend, backend_config, entries, str(spec.id), None
        )
        return {"id": spec.id, "model": "m", "backend": backend, "restart": restart, **reserved}

    deps.registry.add(spec, "token", build)
    return WorkerRun(str(spec.id), deps)


async def settle(run: WorkerRun, state: State) -> Worker:
    return await run.deps.registry.wait_until(run.id, lambda w: w.state == state, 30)


async def test_ready_by_probe_then_stopped_with_nothing_left(deps: Deps) -> None:
    run = add(deps, "serves")
    await run.start()
    pid = deps.registry.get(run.id).pid
    assert pid is not None
    ready = await settle(run, State.READY)
    assert ready.ready_at is not None
    run.request_stop(None)
    assert run.task is not None
    await run.task
    stopped = deps.registry.get(run.id)
    assert (stopped.state, stopped.pid, stopped.exit_code) == (State.STOPPED, None, -15)
    assert start_time(pid) is None  # the process is gone
    assert not run.active


async def test_a_crash_is_recorded_and_the_policy_restarts_it(deps: Deps) -> None:
    run = add(deps, "crashes", restart="on-failure")
    await run.start()
    record = await deps.registry.wait_until(run.id, lambda w: w.restarts >= 2, 30)
    assert record.restarts >= 2
    failed = await settle(run, State.FAILED)
    assert failed.exit_code == 3
    assert failed.error is not None and failed.error.startswith("exited with code 3")
    run.request_stop(None)
    assert run.task is not None
    await run.task
    assert deps.registry.get(run.id).next_restart_at is None


async def test_never_ready_fails_after_startup_timeout(deps: Deps) -> None:
    run = add(deps, "silent")
    await run.start()
    failed = await settle(run, State.FAILED)
    assert failed.error == "not ready after 1s (startup_timeout)"
    assert run.task is not None
    await run.task
    assert deps.registry.get(run.id).exit_code == -15  # ended by hive, and reaped


async def test_a_command_that_cannot_start_fails_at_once_and_is_not_retried(deps: Deps) -> None:
    run = add(deps, "missing", restart="always")
    await run.start()
    assert run.task is not None
    await run.task  # over at once: no restart is scheduled
    record = deps.registry.get(run.id)
    assert record.state == State.FAILED
    assert record.error == (
        "cannot start '/nonexistent/engine': No such file or directory; "
        "not retried: fix the backend's command"
    )
    assert (record.pid, record.restarts, record.next_restart_at) == (None, 0, None)


async def test_a_startup_timeout_says_what_the_probe_last_got(deps: Deps) -> None:
    run = add(deps, "notfound")  # it serves, but /health is a 404
    await run.start()
    failed = await settle(run, State.FAILED)
    assert failed.error == (
        "not ready after 2s (startup_timeout); its /health last answered HTTP 404"
    )
    assert run.task is not None
    await run.task


async def test_silent_heartbeats_are_a_hang(deps: Deps) -> None:
    deps.config = deps.config.model_copy(update={"heartbeat_timeout": 0.5})
    run = add(deps, "serves")
    await run.start()
    await settle(run, State.READY)
    deps.registry.heartbeat(run.id, State.READY, in_flight=0)
    run.heard()  # one heartbeat, then none
    failed = await settle(run, State.FAILED)
    assert failed.error == "hung: no heartbeat for 0.5s"
    assert run.task is not None
    await run.task


# -- adoption ----------------------------------------------------------------------------------


def saved(wid: str, state: State, pid: int | None, started: float | None, **fields: Any) -> Saved:
    record = Worker(
        id=wid,
        model="m",
        backend="demo",
        device="CPU-0",
        port=18000,
        url="u",
        state=state,
        pid=pid,
        created_at=now(),
        **fields,
    )
    return Saved(record, SpawnRequest(model="m"), "tok", started)


async def test_adoption_plan_against_live_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TAG.var, TAG.value)
    live = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    try:
        started = start_time(live.pid)
        items = [
            saved("alive", State.READY, live.pid, started),
            saved("recycled", State.READY, live.pid, (started or 0) - 100),
            saved("gone", State.BUSY, dead.pid, 1.0),
            saved("rests", State.STOPPED, None, None, desired="stopped"),
            saved("known", State.READY, live.pid, started),
        ]
        decided = plan(items, {"known"}, reattach)
        by_id = {a.record.id: a for a in decided.adoptions}
        assert set(by_id) == {"alive", "recycled", "gone", "rests"}
        assert by_id["alive"].process is not None and by_id["alive"].process.pid == live.pid
        assert by_id["alive"].record.state == State.READY
        for wid in ("recycled", "gone"):
            assert by_id[wid].process is None
            assert by_id[wid].record.state == State.FAILED
            assert by_id[wid].record.error == GONE_ERROR
            assert by_id[wid].resume  # its restart policy applies now
        assert by_id["rests"].record.state == State.STOPPED and not by_id["rests"].resume
        assert decided.counts() == {
            "adopted": 1,
            "gone": 2,
            "restored": 3,
            "rebuilt": 0,
            "stray": 0,
        }
        by_id["alive"].process.detach()
        assert live.poll() is None  # planning never touches a process
    finally:
        live.kill()
        live.wait()

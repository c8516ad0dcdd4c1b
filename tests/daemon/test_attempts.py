"""One attempt of a worker never harms the next, and a server that exits unasked is restarted.

The demo worker's ``--child-exit-seconds`` gives it a child that behaves as vLLM's EngineCore:
seconds to exit on SIGTERM, and the server exits with code 0 when it dies. Both kinds of
containment (a cgroup per worker where this host allows one, environment tags elsewhere)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import aiohttp
import psutil
import pytest
from containments import KINDS
from hivetest import Hive, record, running_hive, spawn_ready

from harness.waits import async_wait_for, wait_for

pytestmark = pytest.mark.timeout(180)


def config(kind: str) -> str:
    return f"""
containment = "{kind}"
restart_delay = 0.2

[backends.engine]
command = ["{{python}}", "-m", "hive.demo_worker", "--port", "{{port}}", "--model", "{{model}}",
           "--child-exit-seconds", "3"]
"""


@pytest.fixture(scope="module", params=KINDS)
def hive(request: pytest.FixtureRequest) -> Iterator[Hive]:
    with running_hive(config(request.param)) as daemon:
        yield daemon


def _child(pid: int) -> psutil.Process:
    """The worker's engine core: its one child."""
    children = wait_for(lambda: psutil.Process(pid).children(), what=f"the child of {pid}")
    assert len(children) == 1, children
    return children[0]


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _where(s: aiohttp.ClientSession, wid: str, test: Any) -> dict[str, Any] | None:
    body = await record(s, wid)
    return body if test(body) else None


async def test_the_sweep_of_a_crashed_attempt_spares_the_next(hive: Hive) -> None:
    async with hive.session() as s:
        first = await spawn_ready(s, id="sweep", backend="engine")
        core = _child(first["pid"])
        os.kill(first["pid"], signal.SIGKILL)  # the server dies; its engine core lingers 3 s
        wait_for(lambda: _gone(core), timeout=30, what="the old engine core to be swept")
        again = await async_wait_for(
            lambda: _where(s, "sweep", lambda w: w["state"] == "ready" and w["restarts"] >= 1),
            timeout=60,
            what="the next attempt to be ready",
        )
        # The old tree is gone: its sweep is over, and so is anything it could do.
        assert again["restarts"] == 1, again
        assert again["pid"] != first["pid"] and psutil.pid_exists(again["pid"])
        assert not _gone(_child(again["pid"]))
        log = hive.worker_log("sweep").read_text()
        assert log.count("attempt ") == 2, log
        async with s.delete("/v1/workers/sweep") as r:
            assert r.status == 200


async def test_a_server_that_exits_0_unasked_is_restarted(hive: Hive) -> None:
    async with hive.session() as s:
        first = await spawn_ready(s, id="exit0", backend="engine", restart="on-failure")
        os.kill(_child(first["pid"]).pid, signal.SIGKILL)  # the OOM killer's usual pick
        again = await async_wait_for(
            lambda: _where(s, "exit0", lambda w: w["state"] == "ready" and w["restarts"] == 1),
            timeout=60,
            what="the server to be restarted",
        )
        assert again["pid"] != first["pid"]
        async with s.delete("/v1/workers/exit0") as r:
            assert r.status == 200


async def test_an_exit_0_unasked_is_a_failure_that_says_so(hive: Hive) -> None:
    async with hive.session() as s:
        first = await spawn_ready(s, id="exit0-no", backend="engine", restart="no")
        os.kill(_child(first["pid"]).pid, signal.SIGKILL)
        failed = await async_wait_for(
            lambda: _where(s, "exit0-no", lambda w: w["state"] in ("failed", "stopped")),
            what="the server's exit",
        )
        assert failed["state"] == "failed" and failed["exit_code"] == 0, failed
        assert failed["error"].startswith("exited with code 0 while it was wanted running"), failed
        assert failed["restarts"] == 0 and failed["next_restart_at"] is None
        async with s.delete("/v1/workers/exit0-no") as r:
            assert r.status == 200

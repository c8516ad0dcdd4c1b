"""The supervisor against real processes: restart policies and back-off, start-up timeouts,
hangs, whole process trees, exec failures, log caps, ports and exclusive cores."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from hivetest import Hive, running_hive

from harness.waits import async_wait_for

pytestmark = pytest.mark.timeout(120)

WORKERS = Path(__file__).parent.parent / "workers"
CHATTY = "import time\nwhile True:\n    print('x' * 99, flush=True)\n    time.sleep(0.0005)\n"

CONFIG = f"""
restart_delay = 0.3
restart_delay_max = 1.0
max_restarts = 3
heartbeat_timeout = 1.5
max_log_bytes = 20000

[backends.slow]
command = ["{{python}}", "-m", "hive.demo_worker", "--port", "{{port}}", "--model", "{{model}}",
           "--load-seconds", "60", "--no-heartbeat"]
startup_timeout = 1

[backends.tree]
command = ["{{python}}", "{WORKERS / "tree_worker.py"}",
           "--port", "{{port}}", "--model", "{{model}}"]

[backends.probed]
command = ["{{python}}", "-m", "hive.demo_worker", "--port", "{{port}}", "--model", "{{model}}",
           "--no-heartbeat"]
liveness_period = 0.2
liveness_failures = 2

[backends.missing]
command = ["/nonexistent/model-server", "--port", "{{port}}"]

[backends.chatty]
command = ["{{python}}", "-c", "{CHATTY.encode("unicode_escape").decode()}"]
health_path = ""
startup_timeout = 600
"""


@pytest.fixture(scope="module")
def hive() -> Iterator[Hive]:
    with running_hive(CONFIG) as daemon:
        yield daemon


async def record(s: aiohttp.ClientSession, worker_id: str) -> dict[str, Any]:
    async with s.get(f"/v1/workers/{worker_id}") as r:
        assert r.status == 200
        return await r.json()


async def spawn(s: aiohttp.ClientSession, **body: Any) -> tuple[int, dict[str, Any]]:
    body.setdefault("model", "m")
    async with s.post("/v1/workers", json=body) as r:
        return r.status, await r.json()


async def delete(s: aiohttp.ClientSession, worker_id: str) -> None:
    async with s.delete(f"/v1/workers/{worker_id}") as r:
        assert r.status == 200, await r.text()


def seconds(later: str, earlier: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


async def test_crash_loop_backs_off_doubling_then_gives_up(hive: Hive) -> None:
    async with hive.session() as s:
        status, _ = await spawn(s, id="loop", restart="on-failure", args=["--fail-after", "0.1"])
        assert status == 201
        delays: dict[int, float] = {}

        async def given_up() -> dict[str, Any] | None:
            r = await record(s, "loop")
            if r["state"] == "failed" and r["next_restart_at"]:
                delays[r["restarts"]] = seconds(r["next_restart_at"], r["stopped_at"])
            if r["state"] == "failed" and "gave up" in (r["error"] or ""):
                return r
            return None

        final = await async_wait_for(given_up, timeout=60, interval=0.01, what="to give up")
        assert final["restarts"] == 3 and final["next_restart_at"] is None
        assert (
            "exited with code 3" in final["error"] and "gave up after 3 restarts" in final["error"]
        )
        # 0.3 s, doubled, capped at 1.0 s: what hive scheduled after each failure.
        assert sorted(delays) == [0, 1, 2]
        for restarts, expected in ((0, 0.3), (1, 0.6), (2, 1.0)):
            assert abs(delays[restarts] - expected) < 0.1, delays
        assert final["pid"] is None
        await delete(s, "loop")


async def test_exit_0_unasked_is_a_failure(hive: Hive) -> None:
    """A server that exits, even with code 0, while hive wants it running is down: failed, and
    restarted unless its policy is ``no``."""
    async with hive.session() as s:
        for policy, expected_restarts in (("on-failure", 1), ("always", 1), ("no", 0)):
            wid = f"clean-{policy}"
            await spawn(s, id=wid, restart=policy)
            ready = await async_wait_for(
                lambda w=wid: _in(s, w, "ready"),
                what=f"{wid} ready",  # type: ignore[misc]
            )
            os.kill(ready["pid"], signal.SIGTERM)  # the demo worker exits 0 on SIGTERM
            if expected_restarts:
                again = await async_wait_for(
                    lambda w=wid: _restarted(s, w), timeout=30, what=f"{wid} restarted"
                )
                assert again["pid"] != ready["pid"]
            else:
                failed = await async_wait_for(
                    lambda w=wid: _in(s, w, "failed"),
                    what=f"{wid} failed",  # type: ignore[misc]
                )
                assert failed["exit_code"] == 0 and failed["next_restart_at"] is None
                assert failed["error"].startswith("exited with code 0 while it was wanted running")
                assert failed["restarts"] == 0
            await delete(s, wid)


async def _in(s: aiohttp.ClientSession, worker_id: str, state: str) -> dict[str, Any] | None:
    r = await record(s, worker_id)
    return r if r["state"] == state else None


async def _restarted(s: aiohttp.ClientSession, worker_id: str) -> dict[str, Any] | None:
    r = await record(s, worker_id)
    return r if r["restarts"] >= 1 and r["state"] == "ready" else None


async def test_startup_timeout_fails_and_kills(hive: Hive) -> None:
    async with hive.session() as s:
        status, w = await spawn(s, id="slow", backend="slow", restart="no")
        assert status == 201
        failed = await async_wait_for(lambda: _in(s, "slow", "failed"), what="timeout")
        assert "startup_timeout" in failed["error"]
        await async_wait_for(lambda: not psutil.pid_exists(w["pid"]), what="process gone")
        await delete(s, "slow")


async def test_silent_after_heartbeats_is_hung(hive: Hive) -> None:
    async with hive.session() as s:
        _, w = await spawn(s, id="hang", restart="no")
        await async_wait_for(lambda: _heartbeated(s, "hang"), timeout=30, what="a first heartbeat")
        os.kill(w["pid"], signal.SIGSTOP)
        try:
            failed = await async_wait_for(lambda: _in(s, "hang", "failed"), what="hang noticed")
            assert "hung" in failed["error"] and "heartbeat" in failed["error"]
            await async_wait_for(lambda: not psutil.pid_exists(w["pid"]), what="killed")
        finally:
            if psutil.pid_exists(w["pid"]):
                os.kill(w["pid"], signal.SIGKILL)
        await delete(s, "hang")


async def test_failing_health_probes_make_it_failed(hive: Hive) -> None:
    async with hive.session() as s:
        _, w = await spawn(s, id="probed", backend="probed", restart="no")
        await async_wait_for(lambda: _in(s, "probed", "ready"), what="ready")
        os.kill(w["pid"], signal.SIGSTOP)  # alive, but answers nothing
        try:
            failed = await async_wait_for(lambda: _in(s, "probed", "failed"), what="unhealthy")
            assert "unhealthy" in failed["error"] and "2 times in a row" in failed["error"]
            await async_wait_for(lambda: not _alive(w["pid"]), what="killed")
        finally:
            if _alive(w["pid"]):
                os.kill(w["pid"], signal.SIGKILL)
        await delete(s, "probed")


async def _heartbeated(s: aiohttp.ClientSession, worker_id: str) -> bool:
    return (await record(s, worker_id))["last_heartbeat_at"] is not None


async def test_stop_ends_the_whole_tree(hive: Hive) -> None:
    child_file = hive.home / "tree.child"
    async with hive.session() as s:
        _, w = await spawn(s, id="tree", backend="tree", env={"TREE_CHILD_FILE": str(child_file)})
        await async_wait_for(lambda: _in(s, "tree", "ready"), what="tree ready")
        child = int(child_file.read_text())
        assert psutil.Process(child).ppid() == w["pid"]
        async with s.post("/v1/workers/tree/stop", params={"wait": "true", "timeout": "1"}) as r:
            assert r.status == 200
            assert (await r.json())["state"] == "stopped"
        assert not psutil.pid_exists(w["pid"])
        await async_wait_for(lambda: not _alive(child), timeout=10, what="stubborn child gone")
        await delete(s, "tree")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_a_command_that_cannot_start(hive: Hive) -> None:
    async with hive.session() as s:
        async with s.post(
            "/v1/workers",
            params={"wait": "ready"},
            json={"model": "m", "id": "nobin", "backend": "missing", "restart": "no"},
        ) as r:
            assert r.status == 409
            body = await r.json()
        worker = body["error"]["worker"]
        assert worker["state"] == "failed" and worker["pid"] is None
        assert "cannot start" in worker["error"] and "No such file" in worker["error"]
        await delete(s, "nobin")


async def test_log_is_capped(hive: Hive) -> None:
    logs = hive.state_dir / "logs"
    async with hive.session() as s:
        status, _ = await spawn(s, id="chatty", backend="chatty", restart="no")
        assert status == 201
        await async_wait_for(
            lambda: (logs / "chatty.log.1").exists(), timeout=30, what="log moved aside"
        )
        first = (logs / "chatty.log.1").stat().st_mtime_ns
        await async_wait_for(
            lambda: (logs / "chatty.log.1").stat().st_mtime_ns != first,
            timeout=30,
            what="capped again",
        )
        # What was kept aside is the log's end: half of the cap (less after an overshoot).
        assert 0 < (logs / "chatty.log.1").stat().st_size <= 10000

        async def whole_lines() -> bool:  # just after a rotation the log may hold fewer
            async with s.get("/v1/workers/chatty/logs", params={"tail": "3"}) as r:
                return (await r.text()).splitlines() == ["x" * 99] * 3

        await async_wait_for(whole_lines, timeout=30, what="the last 3 lines, whole")
        await delete(s, "chatty")
    assert not (logs / "chatty.log").exists() and not (logs / "chatty.log.1").exists()


async def test_concurrent_spawns_never_share_ports_or_cores(hive: Hive) -> None:
    cores = len(os.sched_getaffinity(0))
    async with hive.session() as s:
        results = await asyncio.gather(
            *(spawn(s, id=f"pin-{i}", cpus=1, restart="no") for i in range(cores + 1))
        )
        made = [w for status, w in results if status == 201]
        refused = [w for status, w in results if status == 503]
        assert len(made) == cores and len(refused) == 1, results
        assert "core" in refused[0]["error"]["message"]
        assert len({w["port"] for w in made}) == cores
        assert sorted(c for w in made for c in w["cpus"]) == sorted(os.sched_getaffinity(0))
        for w in made:
            assert psutil.Process(w["pid"]).cpu_affinity() == w["cpus"]
            assert psutil.Process(w["pid"]).environ()["OMP_NUM_THREADS"] == "1"
        async with s.get("/v1/workers") as r:
            ids = [w["id"] for w in (await r.json())["workers"]]
        assert sorted(i for i in ids if i.startswith("pin-")) == sorted(w["id"] for w in made)
        for w in made:
            await delete(s, w["id"])


async def test_port_range_exhausted_is_503() -> None:
    with running_hive() as daemon:
        daemon.config_path.write_text(
            daemon.config_path.read_text().replace(
                f"port_range = [{daemon.port_range[0]}, {daemon.port_range[1]}]",
                f"port_range = [{daemon.port_range[0]}, {daemon.port_range[0]}]",
            )
        )
        daemon.stop()
        daemon.start()
        async with daemon.session() as s:
            status, _ = await spawn(s, id="only")
            assert status == 201
            status, body = await spawn(s, id="second")
            assert status == 503 and body["error"]["code"] == "no_capacity"
            assert "port" in body["error"]["message"]
            async with s.get("/v1/workers") as r:
                assert [w["id"] for w in (await r.json())["workers"]] == ["only"]

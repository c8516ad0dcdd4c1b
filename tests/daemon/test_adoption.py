"""A hive restart never kills a worker: the journal lets the next hive adopt what runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from hivetest import TAG, Hive, running_hive

from harness.waits import async_wait_for

pytestmark = pytest.mark.timeout(120)


async def spawn_ready(s: aiohttp.ClientSession, **body: Any) -> dict[str, Any]:
    body.setdefault("model", "m")
    async with s.post("/v1/workers", params={"wait": "ready"}, json=body) as r:
        data = await r.json()
        assert r.status == 200, data
        return data


async def get(s: aiohttp.ClientSession, worker_id: str) -> dict[str, Any]:
    async with s.get(f"/v1/workers/{worker_id}") as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def state_is(s: aiohttp.ClientSession, worker_id: str, state: str) -> dict[str, Any] | None:
    record = await get(s, worker_id)
    return record if record["state"] == state else None


async def assert_adopted(s: aiohttp.ClientSession, *workers: dict[str, Any]) -> None:
    """Each worker is back as it was: the same process, port and cores, ready, not restarted."""
    for before in workers:
        after = await get(s, before["id"])
        assert after["state"] == "ready" and after["pid"] == before["pid"]
        assert after["port"] == before["port"] and after["cpus"] == before["cpus"]
        assert after["restarts"] == 0


async def test_sigkill_of_hive_keeps_workers_and_the_next_hive_adopts_them() -> None:
    with running_hive("heartbeat_timeout = 3\n") as hive:
        async with hive.session() as s:
            a = await spawn_ready(s, id="keep-a", labels={"k": "v"})
            b = await spawn_ready(s, id="keep-b", cpus=1)
            await spawn_ready(s, id="was-stopped")
            async with s.post("/v1/workers/was-stopped/stop", params={"wait": "true"}) as r:
                assert r.status == 200
        hive.kill()
        assert psutil.pid_exists(a["pid"]) and psutil.pid_exists(b["pid"])

        hive.start()
        async with hive.session() as s:
            await assert_adopted(s, a, b)
            assert (await get(s, "keep-a"))["labels"] == {"k": "v"}
            assert (await get(s, "was-stopped"))["state"] == "stopped"

            # Still supervised: heartbeats with the token the worker already had are accepted,
            # a new spawn cannot take the adopted worker's port or core...
            token = psutil.Process(a["pid"]).environ()["HIVE_WORKER_TOKEN"]
            headers = {"Authorization": f"Bearer {token}"}
            async with (
                aiohttp.ClientSession(hive.url, headers=headers) as ws,
                ws.post(
                    "/v1/workers/keep-a/heartbeat", json={"state": "ready", "in_flight": 0}
                ) as r,
            ):
                assert r.status == 200
            async with s.post("/v1/workers", json={"model": "m", "port": a["port"]}) as r:
                assert r.status == 409

            # ...its exit is noticed at once, though it is no longer hive's child...
            os.kill(b["pid"], signal.SIGKILL)
            failed = await async_wait_for(lambda: state_is(s, "keep-b", "failed"), what="failed")
            assert "exit status unknown" in failed["error"]

            # ...and stopping it ends it.
            async with s.post("/v1/workers/keep-a/stop", params={"wait": "true"}) as r:
                assert (await r.json())["state"] == "stopped"
            await async_wait_for(lambda: not _alive(a["pid"]), what="adopted worker gone")


async def test_a_spawn_answered_before_its_pid_was_written_is_adopted_by_its_tag() -> None:
    # A spawn is answered once its intent is on disk; the pid follows in the next write. A hive
    # killed before that write leaves a record without a pid: the next hive finds the process
    # by its attempt's tag and adopts it, the same pid, not restarted and not left running.
    with running_hive() as hive:
        async with hive.session() as s:
            answered = await spawn_ready(s, id="no-pid")
        hive.kill()
        journal = hive.state_dir / "journal.json"
        data = json.loads(journal.read_text())
        for item in data["workers"]:
            if item["record"]["id"] == "no-pid":
                item["record"].update(pid=None, state="starting", ready_at=None)
                item["start_time"] = None
        journal.write_text(json.dumps(data))

        hive.start()
        async with hive.session() as s:
            adopted = await async_wait_for(
                lambda: state_is(s, "no-pid", "ready"), what="the pid-less record ready"
            )
            assert adopted["pid"] == answered["pid"] and adopted["restarts"] == 0
            async with s.post("/v1/workers/no-pid/stop", params={"wait": "true"}) as r:
                assert (await r.json())["state"] == "stopped"
        await async_wait_for(lambda: not _alive(answered["pid"]), what="the worker gone")


async def test_detach_leaves_workers_for_the_next_hive() -> None:
    with running_hive('on_exit = "detach"\n') as hive:
        async with hive.session() as s:
            w = await spawn_ready(s, id="detached")
        assert hive.stop() == 0
        assert psutil.Process(w["pid"]).status() != psutil.STATUS_ZOMBIE
        hive.start()
        async with hive.session() as s:
            again = await get(s, "detached")
            assert again["pid"] == w["pid"] and again["state"] == "ready"
            async with s.delete("/v1/workers/detached") as r:
                assert r.status == 200
        await async_wait_for(lambda: not _alive(w["pid"]), what="adopted worker gone")


async def test_a_worker_that_died_while_hive_was_down_is_failed_then_restarted() -> None:
    with running_hive("restart_delay = 0.2\n") as hive:
        async with hive.session() as s:
            w = await spawn_ready(s, id="died", restart="on-failure")
            await spawn_ready(s, id="died-no", restart="no")
        hive.kill()
        for worker in ("died", "died-no"):
            pid = json.loads(hive.journal_path.read_text())
            pid = next(x["record"]["pid"] for x in pid["workers"] if x["record"]["id"] == worker)
            os.kill(pid, signal.SIGKILL)
            await async_wait_for(lambda p=pid: not _alive(p), what="worker gone")  # type: ignore[misc]
        hive.start()
        async with hive.session() as s:
            gone = await get(s, "died-no")
            assert gone["state"] == "failed" and gone["pid"] is None
            assert "while hive was not running" in gone["error"]
            back = await async_wait_for(lambda: state_is(s, "died", "ready"), what="restarted")
            assert back["pid"] != w["pid"] and back["restarts"] == 1


async def test_a_torn_journal_is_survived_by_adopting_from_the_previous_generation() -> None:
    with running_hive() as hive:
        previous = hive.state_dir / "journal.json.1"
        async with hive.session() as s:
            a = await spawn_ready(s, id="torn-a")
            b = await spawn_ready(s, id="torn-b", cpus=1)
            # journal.json.1 is one write behind: later writes, so that it holds both, ready.
            await spawn_ready(s, id="torn-later", restart="no")
            async with s.delete("/v1/workers/torn-later") as r:
                assert r.status == 200
        await async_wait_for(
            lambda: _holds_ready(previous, a, b), what="both workers ready in journal.json.1"
        )
        hive.kill()
        whole = hive.journal_path.read_bytes()
        assert _holds_ready(hive.journal_path, a, b)
        hive.journal_path.write_bytes(whole[: len(whole) // 2])

        hive.start()
        async with hive.session() as s:
            await assert_adopted(s, a, b)
        log = hive.log()
        assert f"journal {hive.journal_path} is not valid JSON" in log
        assert f"(from {previous})" in log
        assert (hive.state_dir / "journal.json.bad").read_bytes() == whole[: len(whole) // 2]


def _holds_ready(path: Path, *workers: dict[str, Any]) -> bool:
    """Whether the journal at ``path`` has each worker ready, with its pid."""
    try:
        items = json.loads(path.read_bytes())["workers"]
    except (OSError, ValueError):
        return False
    records = {item["record"]["id"]: item["record"] for item in items}
    return all(
        w["id"] in records
        and records[w["id"]]["pid"] == w["pid"]
        and records[w["id"]]["state"] == "ready"
        for w in workers
    )


async def test_a_recycled_pid_is_never_adopted_or_signalled() -> None:
    with running_hive() as hive:
        async with hive.session() as s:
            w = await spawn_ready(s, id="recycled", restart="no")
        hive.kill()
        os.kill(w["pid"], signal.SIGKILL)
        stranger = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"],
            env={**os.environ, **TAG.env},
        )
        try:
            # Make the journal point at the stranger, as if the pid had been reused.
            journal = json.loads(hive.journal_path.read_text())
            for item in journal["workers"]:
                if item["record"]["id"] == "recycled":
                    item["record"]["pid"] = stranger.pid
            hive.journal_path.write_text(json.dumps(journal))
            hive.start()
            async with hive.session() as s:
                record = await get(s, "recycled")
                assert record["state"] == "failed" and record["pid"] is None
            assert stranger.poll() is None, "hive signalled a process it does not own"
        finally:
            stranger.kill()
            stranger.wait()


def test_one_hive_per_state_dir(hive_for_lock: Hive) -> None:
    second = subprocess.run(
        [*hive_for_lock.cli_command(), "serve", "--config", str(hive_for_lock.config_path)],
        env={**hive_for_lock.env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1
    assert "another hive" in second.stderr


@pytest.fixture
def hive_for_lock() -> Any:
    with running_hive() as hive:
        yield hive


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

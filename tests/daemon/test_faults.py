"""Faults of the host under hive: a full disk under state_dir, and a journal that cannot be
read at all while workers run. Each leaves a clear answer, nothing stuck, nothing lost."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from hivetest import Hive, running_hive

from harness.disk import CannotMount, fill, tmpfs
from harness.waits import async_wait_for, wait_for


@contextlib.contextmanager
def mounted(path: Path, size: str) -> Iterator[Path]:
    try:
        with tmpfs(path, size) as mount_point:
            yield mount_point
    except CannotMount as exc:
        pytest.skip(str(exc))


async def spawn(s: aiohttp.ClientSession, worker_id: str, **params: str) -> tuple[int, Any]:
    async with s.post("/v1/workers", params=params, json={"model": "m", "id": worker_id}) as r:
        return r.status, await r.json()


async def test_a_full_state_dir_refuses_spawns_clearly_and_keeps_what_runs() -> None:
    hive = Hive()
    try:
        with mounted(hive.state_dir, "4m"):
            hive.start()
            async with hive.session() as s:
                status, kept = await spawn(s, "kept", wait="ready")
                assert status == 200, kept
                filler = fill(hive.state_dir)
                for _ in range(3):
                    status, body = await spawn(s, "refused")
                    assert status == 503, body
                    assert body["error"]["code"] == "no_capacity"
                    assert str(hive.state_dir) in body["error"]["message"]
                    assert "full" in body["error"]["message"]
                async with s.get("/v1/workers") as r:
                    assert r.status == 200
                    listed = (await r.json())["workers"]
                assert [w["id"] for w in listed] == ["kept"]  # nothing left behind
                assert listed[0]["state"] == "ready" and psutil.pid_exists(kept["pid"])
                assert hive.log().count("is full") == 1  # one line per condition
                filler.unlink()
                status, body = await spawn(s, "after", wait="ready")
                assert status == 200, body
                for wid in ("kept", "after"):
                    async with s.delete(f"/v1/workers/{wid}") as r:
                        assert r.status == 200
            assert hive.stop() == 0
    finally:
        hive.cleanup()


async def test_an_unreadable_journal_rebuilds_running_workers_from_their_processes() -> None:
    with running_hive() as hive:
        async with hive.session() as s:
            before = {}
            for wid in ("r1", "r2"):
                status, body = await spawn(s, wid, wait="ready")
                assert status == 200, body
                before[wid] = body
        hive.kill()
        for path in (hive.journal_path, hive.journal_path.with_suffix(".json.1")):
            path.write_bytes(b"\x00garbage{")
        hive.start()
        assert "rebuilt 2 running worker(s)" in hive.log()
        async with hive.session() as s:
            for wid, old in before.items():
                async with s.get(f"/v1/workers/{wid}") as r:
                    assert r.status == 200
                    now = await r.json()
                assert (now["pid"], now["port"], now["model"]) == (
                    old["pid"],
                    old["port"],
                    old["model"],
                )
                assert now["state"] == "ready"
            # Its heartbeats still count: the token came back from its own environment.
            await async_wait_for(
                lambda: _heartbeat_seen(s, "r1"), what="a heartbeat of the rebuilt worker"
            )
            for wid in before:
                async with s.delete(f"/v1/workers/{wid}") as r:
                    assert r.status == 200
        for old in before.values():
            wait_for(lambda pid=old["pid"]: not psutil.pid_exists(pid), what="worker gone")


async def _heartbeat_seen(s: aiohttp.ClientSession, worker_id: str) -> bool:
    async with s.get(f"/v1/workers/{worker_id}") as r:
        return (await r.json())["last_heartbeat_at"] is not None

"""The HTTP API of a real ``hive serve`` with real demo workers, over TCP and the unix socket."""

from __future__ import annotations

import asyncio
import os
import stat
from typing import Any

import aiohttp
import psutil
import pytest
from hivetest import TAG, Hive

from harness.net import port_in_use
from harness.procs import tagged_processes
from harness.waits import async_wait_for
from hive.models import MARKER

pytestmark = pytest.mark.timeout(120)


async def spawn_ready(s: aiohttp.ClientSession, **body: Any) -> dict[str, Any]:
    body.setdefault("model", "demo-model")
    async with s.post("/v1/workers", params={"wait": "ready", "timeout": "60"}, json=body) as r:
        data = await r.json()
        assert r.status == 200, data
        assert r.headers["Location"] == f"/v1/workers/{data['id']}"
        return data


async def get(s: aiohttp.ClientSession, path: str, **params: str) -> tuple[int, Any]:
    async with s.get(path, params=params) as r:
        return r.status, await r.json()


async def post(s: aiohttp.ClientSession, path: str, body: Any = None, **params: str) -> Any:
    async with s.post(path, json=body, params=params) as r:
        return r.status, await r.json()


def worker_token(pid: int) -> str:
    """The token hive handed the worker, read from the worker's own environment."""
    return psutil.Process(pid).environ()["HIVE_WORKER_TOKEN"]


def error_of(body: Any, code: str) -> str:
    """The error's message, after checking the §5 shape and the code."""
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]["message"]


# -- health, auth, files -------------------------------------------------------------------------


async def test_health_needs_no_token(hive: Hive) -> None:
    async with hive.session(auth=False) as s:
        status, body = await get(s, "/health")
    assert status == 200
    assert body["status"] == "ok" and body["version"]


async def test_tcp_needs_the_bearer_token(hive: Hive) -> None:
    async with hive.session(auth=False) as s:
        status, body = await get(s, "/v1/workers")
        assert status == 401
        error_of(body, "unauthorized")
        async with s.get("/v1/workers", headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
            error_of(await r.json(), "unauthorized")
    async with hive.session() as s:
        status, body = await get(s, "/v1/workers")
        assert status == 200
        assert set(body) == {"workers", "total"}


async def test_files_are_private(hive: Hive) -> None:
    assert stat.S_IMODE(hive.token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(hive.socket.stat().st_mode) == 0o600
    assert len(hive.token) >= 32


async def test_unix_socket_needs_no_token(hive: Hive) -> None:
    async with hive.unix_session() as s:
        status, body = await get(s, "/v1/node")
    assert status == 200
    assert body["devices"]["cpus"] >= 1 and body["devices"]["cores"] >= 1
    assert set(body["workers"]) == {"starting", "ready", "busy", "stopped", "failed"}


async def test_devices_without_gpu(hive: Hive) -> None:
    async with hive.session() as s:
        status, body = await get(s, "/v1/devices")
    assert status == 200
    assert body["gpus"] == [] and isinstance(body["gpu_error"], str)
    cpu = body["cpus"][0]
    assert cpu["id"] == "CPU-0"
    assert set(cpu["cores"]) <= os.sched_getaffinity(0)
    assert cpu["memory_total_bytes"] > 0


# -- a worker's life ---------------------------------------------------------------------------


async def test_spawn_list_heartbeat_stop_restart_delete(hive: Hive) -> None:
    async with hive.session() as s:
        w = await spawn_ready(s, id="life", labels={"team": "a"})
        assert w["state"] == "ready" and w["desired"] == "running"
        assert w["device"] == "CPU-0" and w["backend"] == "demo"
        assert w["url"] == f"http://127.0.0.1:{w['port']}"
        assert hive.port_range[0] <= w["port"] <= hive.port_range[1]
        assert psutil.pid_exists(w["pid"])
        for key in ("created_at", "started_at", "ready_at"):
            assert w[key] and w[key].endswith(("Z", "+00:00")), w[key]

        # The worker really serves, and knows who it is.
        async with (
            aiohttp.ClientSession() as direct,
            direct.get(f"{w['url']}/get_server_info") as r,
        ):
            info = await r.json()
        assert info["pid"] == w["pid"] and info["worker_id"] == "life"
        assert info["cuda_visible_devices"] == ""
        env = psutil.Process(w["pid"]).environ()
        assert env["HIVE_WORKER_ID"] == "life" and env["HIVE_PORT"] == str(w["port"])
        assert env["HIVE_DEVICE"] == "CPU-0" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert env["HIVE_URL"] == hive.url and "HIVE_TOKEN" not in env

        # Filters.
        for params, expected in (
            ({"state": "ready"}, True),
            ({"state": "failed"}, False),
            ({"model": "demo-model"}, True),
            ({"model": "other"}, False),
            ({"label": "team=a"}, True),
            ({"label": "team=b"}, False),
            ({"device": "CPU-0"}, True),
        ):
            status, body = await get(s, "/v1/workers", **params)
            assert status == 200
            assert ("life" in [x["id"] for x in body["workers"]]) is expected, params
            assert body["total"] == len(body["workers"])

        # Heartbeats with the worker's own token.
        token = worker_token(w["pid"])
        beat = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(hive.url, headers=beat) as ws:
            async with ws.post(
                "/v1/workers/life/heartbeat", json={"state": "busy", "in_flight": 3}
            ) as r:
                assert r.status == 200
                body = await r.json()
                assert body["state"] == "busy" and body["in_flight"] == 3
                assert body["last_heartbeat_at"]
            async with ws.get("/v1/workers") as r:  # good for its heartbeat only
                assert r.status == 403
                error_of(await r.json(), "forbidden")
            async with ws.post(
                "/v1/workers/life/heartbeat", json={"state": "ready", "in_flight": 0}
            ) as r:
                assert (await r.json())["state"] == "ready"

        # Stop: the process is gone, the port free, the record stays.
        pid, port = w["pid"], w["port"]
        status, body = await post(s, "/v1/workers/life/stop", wait="true")
        assert status == 200
        assert body["state"] == "stopped" and body["desired"] == "stopped" and body["pid"] is None
        assert body["stopped_at"] and body["error"] is None
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert not port_in_use(port)
        status, body = await post(s, "/v1/workers/life/heartbeat", {"state": "ready"})
        assert status == 409
        error_of(body, "conflict")

        # Restart: a new process, the same id, counted.
        status, body = await post(s, "/v1/workers/life/restart")
        assert status == 200 and body["state"] == "starting" and body["desired"] == "running"
        assert body["pid"] != pid
        ready = await async_wait_for(
            lambda: _state(s, "life", "ready"), timeout=30, what="restarted worker to be ready"
        )
        assert ready["restarts"] == 1

        # Delete: stopped, then forgotten.
        new_pid = ready["pid"]
        async with s.delete("/v1/workers/life") as r:
            assert r.status == 200
            assert (await r.json())["state"] == "stopped"
        assert not psutil.pid_exists(new_pid)
        status, body = await get(s, "/v1/workers/life")
        assert status == 404
        error_of(body, "not_found")


async def _state(s: aiohttp.ClientSession, worker_id: str, state: str) -> dict[str, Any] | None:
    status, body = await get(s, f"/v1/workers/{worker_id}")
    return body if status == 200 and body["state"] == state else None


async def test_spawn_over_the_unix_socket(hive: Hive) -> None:
    async with hive.unix_session() as s:
        status, w = await post(s, "/v1/workers", {"model": "m", "id": "unix"})
        assert status == 201 and w["state"] == "starting" and w["pid"]
        ready = await async_wait_for(lambda: _state(s, "unix", "ready"), what="ready")
        assert ready["pid"] == w["pid"]
        async with s.delete("/v1/workers/unix") as r:
            assert r.status == 200


async def test_worker_token_is_only_for_its_own_heartbeat(hive: Hive) -> None:
    async with hive.session() as s:
        a = await spawn_ready(s, id="tok-a")
        await spawn_ready(s, id="tok-b")
        headers = {"Authorization": f"Bearer {worker_token(a['pid'])}"}
        async with aiohttp.ClientSession(hive.url, headers=headers) as ws:
            async with ws.post("/v1/workers/tok-b/heartbeat", json={"state": "ready"}) as r:
                assert r.status == 403
                error_of(await r.json(), "forbidden")
            async with ws.post("/v1/workers/tok-a/stop") as r:
                assert r.status == 403
        _, body = await get(s, "/v1/workers/tok-b")
        assert body["state"] == "ready"
        for wid in ("tok-a", "tok-b"):
            async with s.delete(f"/v1/workers/{wid}") as r:
                assert r.status == 200


async def test_logs_tail_and_follow(hive: Hive) -> None:
    async with hive.session() as s:
        w = await spawn_ready(s, id="logs")
        async with s.get("/v1/workers/logs/logs", params={"tail": "50"}) as r:
            assert r.status == 200
            text = await r.text()
        assert "ready_at=" in text
        async with s.get("/v1/workers/logs/logs", params={"tail": "1"}) as r:
            assert len((await r.text()).strip().splitlines()) == 1

        # Follow: the tail first, then what is written after (hive's stop marker), until the
        # worker has stopped.
        async with s.get("/v1/workers/logs/logs", params={"follow": "true"}) as r:
            assert r.status == 200
            first = (await asyncio.wait_for(r.content.readany(), 30)).decode()
            assert "ready_at=" in first and "stopped:" not in first
            status, _ = await post(s, "/v1/workers/logs/stop", wait="true")
            assert status == 200
            rest = (await asyncio.wait_for(r.read(), 30)).decode()
        assert MARKER in rest and "stopped: exited with code 0" in rest
        assert not psutil.pid_exists(w["pid"])
        async with s.delete("/v1/workers/logs") as r:
            assert r.status == 200


async def test_sigkill_is_noticed_with_the_signal(hive: Hive) -> None:
    async with hive.session() as s:
        w = await spawn_ready(s, id="killed", restart="no")
        os.kill(w["pid"], 9)
        failed = await async_wait_for(lambda: _state(s, "killed", "failed"), what="failed")
        assert "signal 9" in failed["error"] and "SIGKILL" in failed["error"]
        # Its last line is quoted as what it said last, not as the cause of its death.
        assert "(its last output: " in failed["error"]
        assert failed["pid"] is None and failed["next_restart_at"] is None
        assert not port_in_use(w["port"])
        async with s.delete("/v1/workers/killed") as r:
            assert r.status == 200


async def test_failure_at_start_names_exit_code_and_last_line(hive: Hive) -> None:
    async with hive.session() as s:
        # It fails while still loading, so it can never be seen ready first.
        args = ["--fail-after", "0", "--load-seconds", "30"]
        body = {"model": "m", "id": "dies", "restart": "no", "args": args}
        status, data = await post(s, "/v1/workers", body, wait="ready", timeout="30")
        message = error_of(data, "conflict")
        assert status == 409
        assert "dies" in message
        record = data["error"]["worker"]
        assert record["state"] == "failed" and record["exit_code"] == 3
        assert "exited with code 3" in record["error"]
        assert "simulated failure" in record["error"]
        async with s.delete("/v1/workers/dies") as r:
            assert r.status == 200


# -- refusals ------------------------------------------------------------------------------------


async def _nothing_changed(s: aiohttp.ClientSession, before: list[str], procs: set[int]) -> None:
    _, body = await get(s, "/v1/workers")
    assert sorted(x["id"] for x in body["workers"]) == before
    assert {p.pid for p in tagged_processes(TAG)} <= procs


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "model"),
        ({"model": ""}, "model"),
        ({"model": "m", "id": "Bad Id"}, "id"),
        ({"model": "m", "port": 80}, "port"),
        ({"model": "m", "restart": "sometimes"}, "restart"),
        ({"model": "m", "device": "tpu"}, "device"),
        ({"model": "m", "gpus": 0}, "gpus"),
        ({"model": "m", "env": {"HIVE_WORKER_ID": "x"}}, "env"),
        ({"model": "m", "env": {"CUDA_VISIBLE_DEVICES": "0"}}, "env"),
        ({"model": "m", "args": "--x"}, "args"),
        ({"model": "m", "unknown": 1}, "unknown"),
        ({"model": "m", "backend": "nope"}, "backend"),
    ],
)
async def test_bad_spawn_is_refused_and_changes_nothing(
    hive: Hive, body: dict[str, Any], field: str
) -> None:
    async with hive.session() as s:
        _, listing = await get(s, "/v1/workers")
        before = sorted(x["id"] for x in listing["workers"])
        procs = {p.pid for p in tagged_processes(TAG)}
        status, data = await post(s, "/v1/workers", body)
        assert status in (400, 422), data
        assert field in error_of(data, "invalid")
        await _nothing_changed(s, before, procs)


async def test_bad_json_and_bad_queries(hive: Hive) -> None:
    async with hive.session() as s:
        async with s.post("/v1/workers", data=b"{not json") as r:
            assert r.status == 400
            assert "JSON" in error_of(await r.json(), "invalid")
        async with s.post("/v1/workers", json=["model"]) as r:
            assert r.status in (400, 422)
            error_of(await r.json(), "invalid")
        status, body = await get(s, "/v1/workers", state="sleeping")
        assert status in (400, 422) and "state" in error_of(body, "invalid")
        status, body = await get(s, "/v1/workers/nobody/logs", tail="-1")
        assert status in (400, 404, 422)
        async with s.put("/v1/workers") as r:
            assert r.status == 405
            error_of(await r.json(), "invalid")
        async with s.get("/v1/nothing-here") as r:
            assert r.status == 404
            error_of(await r.json(), "not_found")


async def test_unknown_worker_is_404_everywhere(hive: Hive) -> None:
    async with hive.session() as s:
        for method, path in (
            ("GET", "/v1/workers/ghost"),
            ("POST", "/v1/workers/ghost/stop"),
            ("POST", "/v1/workers/ghost/restart"),
            ("DELETE", "/v1/workers/ghost"),
            ("GET", "/v1/workers/ghost/logs"),
        ):
            async with s.request(method, path) as r:
                assert r.status == 404, (method, path)
                assert "ghost" in error_of(await r.json(), "not_found")


async def test_too_large_body_is_413(hive: Hive) -> None:
    async with hive.session() as s:
        _, listing = await get(s, "/v1/workers")
        before = sorted(x["id"] for x in listing["workers"])
        big = {"model": "m", "labels": {"pad": "x" * (1024 * 1024 + 10)}}
        async with s.post("/v1/workers", json=big) as r:
            assert r.status == 413
            error_of(await r.json(), "too_large")
        await _nothing_changed(s, before, {p.pid for p in tagged_processes(TAG)})


async def test_duplicate_id_and_taken_port_are_409(hive: Hive) -> None:
    async with hive.session() as s:
        w = await spawn_ready(s, id="dup")
        procs = {p.pid for p in tagged_processes(TAG)}
        status, body = await post(s, "/v1/workers", {"model": "m", "id": "dup"})
        assert status == 409 and "dup" in error_of(body, "conflict")
        status, body = await post(s, "/v1/workers", {"model": "m", "id": "dup2", "port": w["port"]})
        assert status == 409 and str(w["port"]) in error_of(body, "conflict")
        status, listing = await get(s, "/v1/workers")
        assert "dup2" not in [x["id"] for x in listing["workers"]]
        assert {p.pid for p in tagged_processes(TAG)} <= procs
        async with s.delete("/v1/workers/dup") as r:
            assert r.status == 200


async def test_gpu_request_without_gpu_is_503(hive: Hive) -> None:
    async with hive.session() as s:
        _, listing = await get(s, "/v1/workers")
        before = sorted(x["id"] for x in listing["workers"])
        procs = {p.pid for p in tagged_processes(TAG)}
        for device in ("gpu", "GPU-0"):
            status, body = await post(s, "/v1/workers", {"model": "m", "device": device})
            assert status == 503, body
            assert "GPU" in error_of(body, "no_capacity")
        await _nothing_changed(s, before, procs)


async def test_stopped_record_stays_and_heartbeat_is_409(hive: Hive) -> None:
    async with hive.session() as s:
        await spawn_ready(s, id="stays")
        status, body = await post(s, "/v1/workers/stays/stop", wait="true")
        assert status == 200
        status, body = await get(s, "/v1/workers", state="stopped")
        assert "stays" in [x["id"] for x in body["workers"]]
        async with s.delete("/v1/workers/stays") as r:
            assert r.status == 200

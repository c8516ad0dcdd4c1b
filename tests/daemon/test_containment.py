"""A worker is its whole tree, whatever it does: an escapee that double-forks and calls
``setsid()`` is ended on stop, rm, a crash of the worker, and across a SIGKILL of hive. Both
kinds of containment: a cgroup per worker (where this host lets hive write one) and
environment tags with hive as child subreaper."""

from __future__ import annotations

import grp
import json
import os
import pwd
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from containments import KINDS
from hivetest import Hive, record, running_hive, spawn_ready

from harness.waits import async_wait_for, wait_for
from hive.host.containment import instance_of

WORKERS = Path(__file__).parent.parent / "workers"


def escaping_config(kind: str, escapees: Path) -> str:
    """hive with the given containment and a backend whose workers leave an escapee."""
    return f"""
containment = "{kind}"
restart_delay = 0.2

[backends.escaping]
command = ["{{python}}", "{WORKERS / "escaping_worker.py"}",
           "--port", "{{port}}", "--model", "{{model}}"]
env = {{ ESCAPEE_FILE = "{escapees}/{{id}}" }}
"""


@pytest.fixture(scope="module", params=KINDS)
def hive(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hive]:
    escapees = tmp_path_factory.mktemp("escapees")
    with running_hive(escaping_config(request.param, escapees)) as daemon:
        daemon.escapees = escapees  # type: ignore[attr-defined]
        daemon.kind = request.param  # type: ignore[attr-defined]
        yield daemon


def escapee(hive: Hive, worker: dict[str, Any]) -> psutil.Process:
    path = hive.escapees / worker["id"]  # type: ignore[attr-defined]
    pid = int(wait_for(lambda: path.exists() and path.read_text(), what=f"{path}"))
    path.unlink()
    proc = psutil.Process(pid)
    # It left the worker's session and process group, and is no descendant of the worker.
    assert os.getsid(pid) != worker["pid"] and os.getpgid(pid) != worker["pid"]
    assert pid not in {p.pid for p in psutil.Process(worker["pid"]).children(recursive=True)}
    return proc


def gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def spawn(s: aiohttp.ClientSession, worker_id: str, **body: Any) -> dict[str, Any]:
    return await spawn_ready(s, id=worker_id, backend="escaping", **body)


async def test_the_record_says_which_containment(hive: Hive) -> None:
    async with hive.session() as s:
        w = await spawn(s, "says")
        assert w["containment"] == hive.kind  # type: ignore[attr-defined]
        escapee(hive, w)
        async with s.delete("/v1/workers/says") as r:
            assert r.status == 200


async def test_stop_ends_an_escapee(hive: Hive) -> None:
    async with hive.session() as s:
        proc = escapee(hive, await spawn(s, "esc-stop"))
        async with s.post("/v1/workers/esc-stop/stop", params={"wait": "true"}) as r:
            assert r.status == 200
            assert (await r.json())["state"] == "stopped"
        assert gone(proc), "the escapee outlived hive stop"
        async with s.delete("/v1/workers/esc-stop") as r:
            assert r.status == 200


async def test_rm_ends_an_escapee(hive: Hive) -> None:
    async with hive.session() as s:
        proc = escapee(hive, await spawn(s, "esc-rm"))
        async with s.delete("/v1/workers/esc-rm") as r:
            assert r.status == 200
        assert gone(proc), "the escapee outlived hive rm"


async def test_a_crash_of_the_worker_ends_its_escapee(hive: Hive) -> None:
    async with hive.session() as s:
        w = await spawn(s, "esc-crash", restart="no")
        proc = escapee(hive, w)
        os.kill(w["pid"], signal.SIGKILL)
        await async_wait_for(lambda: _is(s, "esc-crash", "failed"), what="the crash to be recorded")
        wait_for(lambda: gone(proc), what="the escapee to be ended after the crash")
        async with s.delete("/v1/workers/esc-crash") as r:
            assert r.status == 200


async def test_a_stopped_worker_gets_sigcont_with_its_sigterm(hive: Hive) -> None:
    async with hive.session() as s:
        w = await spawn(s, "esc-sigstop")
        escapee(hive, w)
        os.kill(w["pid"], signal.SIGSTOP)
        async with s.post("/v1/workers/esc-sigstop/stop", params={"wait": "true"}) as r:
            stopped = await r.json()
        # A stopped process cannot act on SIGTERM: only SIGCONT lets it exit cleanly.
        assert stopped["exit_code"] == 0, stopped
        async with s.delete("/v1/workers/esc-sigstop") as r:
            assert r.status == 200


async def _is(s: aiohttp.ClientSession, worker_id: str, state: str) -> dict[str, Any] | None:
    body = await record(s, worker_id)
    return body if body["state"] == state else None


@pytest.mark.parametrize("kind", KINDS)
async def test_sigkill_of_hive_then_start_ends_what_nothing_accounts_for(
    kind: str, tmp_path: Path
) -> None:
    """Across a SIGKILL of hive: a worker still running is adopted whole (stop still ends its
    escapee); the escapee of a worker that died while hive was down is ended at start-up."""
    with running_hive(escaping_config(kind, tmp_path)) as hive:
        hive.escapees = tmp_path  # type: ignore[attr-defined]
        async with hive.session() as s:
            kept = await spawn(s, "kept")
            kept_escapee = escapee(hive, kept)
            died = await spawn(s, "died", restart="no")
            died_escapee = escapee(hive, died)
        hive.kill()
        os.kill(died["pid"], signal.SIGKILL)
        wait_for(lambda: gone(psutil.Process(died["pid"])), what="the worker to die")
        assert not gone(died_escapee)  # hive is down: nothing has ended it yet
        hive.start()
        wait_for(lambda: gone(died_escapee), what="the stray escapee to be ended at start")
        assert "stray" in hive.log()
        async with hive.session() as s:
            adopted = await record(s, "kept")
            assert adopted["pid"] == kept["pid"] and adopted["state"] == "ready"
            assert (await record(s, "died"))["state"] == "failed"
            assert not gone(kept_escapee)
            async with s.delete("/v1/workers/kept") as r:
                assert r.status == 200
            assert gone(kept_escapee), "the adopted worker's escapee outlived rm"
            async with s.delete("/v1/workers/died") as r:
                assert r.status == 200


def test_instance_is_stable_per_state_dir(tmp_path: Path) -> None:
    assert instance_of(tmp_path) == instance_of(tmp_path / ".")
    assert instance_of(tmp_path) != instance_of(tmp_path / "other")


async def test_a_worker_on_the_unix_socket_gets_only_its_own_heartbeat(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    with running_hive() as hive:
        config = f"""
[backends.prober]
command = ["{{python}}", "{WORKERS / "socket_worker.py"}",
           "--port", "{{port}}", "--model", "{{model}}"]
env = {{ PROBE_SOCKET = "{hive.socket}", PROBE_RESULTS = "{results}", PROBE_OTHER = "bystander" }}
"""
        hive.stop()
        hive.config_path.write_text(hive.config_path.read_text() + config)
        hive.start()
        async with hive.unix_session() as s:
            async with s.post("/v1/workers", json={"model": "m", "id": "bystander"}) as r:
                assert r.status == 201, await r.text()
            body = {"model": "m", "id": "intruder", "backend": "prober"}
            async with s.post("/v1/workers", params={"wait": "ready"}, json=body) as r:
                assert r.status == 200, await r.text()
            answers = json.loads(wait_for(lambda: results.exists() and results.read_text()))
            for name in ("list", "spawn", "stop_other"):
                status, error = answers[name]
                assert status == 403, (name, answers[name])
                assert error["error"]["code"] == "forbidden"
                assert "intruder" in error["error"]["message"]
            assert answers["own_heartbeat"][0] == 200, answers
            async with s.get("/v1/workers") as r:  # the operator, on the same socket, may
                ids = sorted(w["id"] for w in (await r.json())["workers"])
            assert ids == ["bystander", "intruder"]
            for wid in ids:
                async with s.delete(f"/v1/workers/{wid}") as r:
                    assert r.status == 200


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_a_backend_runs_its_workers_as_its_user() -> None:
    config = """
[backends.asnobody]
command = ["/bin/sleep", "300"]
health_path = ""
user = "nobody"
group = "nogroup"

[backends.asnoone]
command = ["/bin/sleep", "300"]
user = "no-such-user-here"
"""
    with running_hive(config) as hive:
        async with hive.session() as s:
            body = {"model": "m", "id": "nobody", "backend": "asnobody"}
            async with s.post("/v1/workers", json=body) as r:
                assert r.status == 201, await r.text()
                worker = await r.json()
            proc = psutil.Process(worker["pid"])
            assert proc.uids().real == pwd.getpwnam("nobody").pw_uid
            assert proc.gids().real == grp.getgrnam("nogroup").gr_gid
            assert "HIVE_WORKER_TOKEN" in proc.environ()  # hive's env, not the user's login
            body = {"model": "m", "id": "noone", "backend": "asnoone", "restart": "no"}
            async with s.post("/v1/workers", json=body) as r:
                failed = await r.json()
            failed = await async_wait_for(lambda: _is(s, "noone", "failed"), what="noone failed")
            assert "this host has no user 'no-such-user-here'" in failed["error"]
            for wid in ("nobody", "noone"):
                async with s.delete(f"/v1/workers/{wid}") as r:
                    assert r.status == 200
            assert gone(proc)

"""Declared workers, ``hive apply``/``hive diff`` and ``replace``, on a real daemon with demo
workers: boot and SIGHUP, plans and their results, bad files, failed successors, and a hive
killed in the middle of a replacement."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from hivetest import Hive, running_hive

from harness.waits import async_wait_for

pytestmark = pytest.mark.timeout(180)


@contextlib.asynccontextmanager
async def serving(config: str = "") -> AsyncIterator[Hive]:
    """:func:`running_hive`, its API session closed at the end."""
    with running_hive(config) as hive:
        try:
            yield hive
        finally:
            await hive.close_http()


def workers_toml(*workers: dict[str, Any]) -> str:
    """``[[workers]]`` tables for these workers (strings and lists of strings only)."""
    text = ""
    for worker in workers:
        text += "[[workers]]\n"
        for key, value in worker.items():
            if isinstance(value, list):
                value = "[" + ", ".join(f'"{v}"' for v in value) + "]"
            else:
                value = f'"{value}"'
            text += f"{key} = {value}\n"
    return text


async def records(hive: Hive) -> dict[str, dict[str, Any]]:
    body = await hive.call("GET", "/v1/workers")
    return {w["id"]: w for w in body["workers"]}


async def until_ready(hive: Hive, *ids: str) -> dict[str, dict[str, Any]]:
    """Wait until exactly these workers exist, each ready; returns the records."""

    async def settled() -> dict[str, dict[str, Any]] | None:
        found = await records(hive)
        if set(found) != set(ids) or any(w["state"] != "ready" for w in found.values()):
            return None
        return found

    return await async_wait_for(settled, timeout=60, what=f"workers {ids} ready")  # type: ignore[no-any-return]


async def test_declared_workers_start_at_boot_and_follow_sighup() -> None:
    web = {"id": "web", "model": "demo-a"}
    other = {"id": "other", "model": "demo-b"}
    async with serving(workers_toml(web)) as hive:
        directory = hive.config_path.parent / "workers.d"
        directory.mkdir()
        (directory / "other.toml").write_text(workers_toml(other))
        hive.signal(signal.SIGHUP)
        found = await until_ready(hive, "web", "other")
        assert found["web"]["declared"] == f"config:{hive.config_path}"
        assert found["other"]["declared"] == f"config:{directory / 'other.toml'}"
        web_pid = found["web"]["pid"]
        mine = await hive.spawn({"model": "demo-c", "id": "mine"}, wait=True)

        # A stopped declared worker stays stopped across a reload.
        await hive.stop_worker("other")
        hive.signal(signal.SIGHUP)
        await async_wait_for(
            lambda: _logged(hive, "declared workers: 2 declared", 2), what="reload pass"
        )
        assert (await records(hive))["other"]["state"] == "stopped"

        # Changed in its file: started again under the new request (declared again), web out of
        # the config: pruned; a worker that was only spawned: left alone.
        (directory / "other.toml").write_text(workers_toml({**other, "model": "demo-b2"}))
        text = hive.config_path.read_text().split("[[workers]]")[0]
        hive.config_path.write_text(text)
        hive.signal(signal.SIGHUP)
        found = await until_ready(hive, "other", "mine")
        assert found["other"]["model"] == "demo-b2"
        assert found["other"]["generation"] == 2
        assert found["mine"]["pid"] == mine["pid"]
        assert not alive(web_pid)

    # A fresh hive on the same files starts what they declare at boot.
    async with serving(workers_toml(web)) as hive:
        found = await until_ready(hive, "web")
        assert found["web"]["declared"].startswith("config:")


def _logged(hive: Hive, text: str, times: int) -> bool:
    return hive.log().count(text) >= times


async def test_apply_diff_create_replace_leave_alone_and_prune(tmp_path: Path) -> None:
    async with serving() as hive:
        kept = await hive.spawn({"model": "demo-k", "id": "kept"}, wait=True)
        first = tmp_path / "first.toml"
        first.write_text(workers_toml({"id": "a", "model": "demo-a"}, {"id": "b", "model": "m"}))

        diff = hive.cli("diff", "-f", str(first))
        assert diff.returncode == 0, diff.stderr
        assert diff.stdout.split("\n")[:3] == ["create      a", "create      b", "plan: 2 create"]
        assert set(await records(hive)) == {"kept"}  # diff changed nothing

        applied = hive.cli("apply", "-f", str(first))
        assert applied.returncode == 0, applied.stderr
        assert "applied: 2 create" in applied.stdout
        found = await until_ready(hive, "kept", "a", "b")
        assert found["a"]["declared"] == f"apply:{first}"

        # The same file again: nothing changes, no process is touched.
        again = hive.cli("apply", "-f", str(first))
        assert again.returncode == 0, again.stderr
        assert "applied: 2 unchanged" in again.stdout
        assert {k: w["pid"] for k, w in (await records(hive)).items()} == {
            k: w["pid"] for k, w in found.items()
        }

        # b changes, a stays, kept is pruned; the plan says so before it is done.
        second = tmp_path / "second.toml"
        second.write_text(
            workers_toml(
                {"id": "a", "model": "demo-a"},
                {"id": "b", "model": "m", "args": ["--latency-ms", "5"]},
            )
        )
        diff = hive.cli("diff", "-f", str(second), "--prune")
        assert diff.returncode == 0, diff.stderr
        assert diff.stdout.splitlines() == [
            "unchanged   a",
            "replace     b",
            "              args: (none) -> ['--latency-ms', '5']",
            "would prune kept",
            "plan: 1 replace, 1 unchanged, 1 would prune",
        ]
        # kept was spawned through the API, not declared by these files: pruning it needs
        # --force (issue 26); without it nothing is done.
        refused = hive.cli("apply", "-f", str(second), "--prune")
        assert refused.returncode == 1, refused.stdout
        assert "did not declare: kept (spawned through the API)" in refused.stderr
        applied = hive.cli("apply", "-f", str(second), "--prune", "--force", "--json")
        assert applied.returncode == 0, applied.stderr
        after = await until_ready(hive, "a", "b")
        assert after["a"]["pid"] == found["a"]["pid"]
        assert after["b"]["pid"] != found["b"]["pid"]
        assert after["b"]["generation"] == 2
        assert not alive(kept["pid"])
        assert not alive(found["b"]["pid"])
        log = hive.worker_log("b").read_text()  # the successor wrote on in b's log
        assert log.count("attempt 1:") == 2


async def test_a_bad_file_is_refused_whole_and_changes_nothing(tmp_path: Path) -> None:
    async with serving() as hive:
        bad = tmp_path / "bad.toml"
        bad.write_text(workers_toml({"id": "good", "model": "m"}) + '[[workers]]\nid = "bad"\n')
        result = hive.cli("apply", "-f", str(bad))
        assert result.returncode == 2
        assert result.stderr.strip() == f"hive: {bad}: worker 'bad': model: is required"

        # The API refuses it the same way (422, the worker and the field named), and one
        # naming an unknown backend.
        for workers, message in (
            ([{"id": "good", "model": "m"}, {"id": "bad", "model": "m", "cpus": 0}],
             "workers: worker 'bad': cpus: must be a count of at least 1, or a list of core ids"),
            ([{"id": "good", "model": "m"}, {"id": "bad", "model": "m", "backend": "nope"}],
             "api: worker 'bad': backend: no backend 'nope'"),
            ([{"id": "x", "model": "m"}, {"id": "x", "model": "n"}],
             "workers: worker 'x': id: declared twice"),
        ):  # fmt: skip
            async with hive.http().post("/v1/apply", json={"workers": workers}) as r:
                body = await r.json()
                assert r.status == 422, body
                assert body["error"]["message"].startswith(message), body
        assert await records(hive) == {}
        assert _worker_cgroups(hive) == set()


async def test_a_failed_successor_leaves_the_old_worker_serving() -> None:
    async with serving() as hive:
        old = await hive.spawn({"model": "m", "id": "web"}, wait=True)
        async with hive.http().post(
            "/v1/workers/web/replace", json={"args": ["--fail-after", "0"]}
        ) as r:
            body = await r.json()
            assert r.status == 409, body
        message = body["error"]["message"]
        assert message.startswith("replacement of 'web' abandoned: its successor failed: exited")
        assert message.endswith("'web' goes on unchanged")
        found = await records(hive)
        assert set(found) == {"web"}
        assert found["web"]["pid"] == old["pid"] and found["web"]["state"] == "ready"
        assert found["web"]["generation"] == 1 and found["web"]["replacement"] is None
        # A pinned port cannot be had beside the old worker: said, and nothing changes.
        async with hive.http().post("/v1/workers/web/replace", json={"port": old["port"]}) as r:
            body = await r.json()
            assert r.status == 409, body
            assert "replace in place" in body["error"]["message"]
        # In place, it can: the old one stops first.
        record = await hive.call(
            "POST", "/v1/workers/web/replace", json_body={"port": old["port"]},
            params={"in_place": "true"},
        )  # fmt: skip
        assert record["generation"] == 2 and record["port"] == old["port"]
        assert not alive(old["pid"])


async def test_a_hive_killed_mid_replacement_ends_with_one_worker_serving() -> None:
    hive = Hive()
    try:
        hive.start()
        old = await hive.spawn({"model": "m", "id": "web"}, wait=True)
        # A successor that takes its time to be ready; hive dies while it starts. The next
        # hive carries the replacement on (issue 26): the successor takes over once ready.
        body = {"args": ["--load-seconds", "4"]}
        task = asyncio.create_task(hive.call("POST", "/v1/workers/web/replace", json_body=body))

        async def successor() -> dict[str, Any] | None:
            return (await records(hive)).get("web~2")

        started = await async_wait_for(successor, what="the successor")
        await async_wait_for(lambda: _pid_of(hive, "web~2"), what="the successor's pid")
        successor_pid = await _pid_of(hive, "web~2")
        assert started["replacing"] == "web"
        hive.kill()
        with contextlib.suppress(aiohttp.ClientError):  # its hive died under it: no answer
            await task
        await hive.close()
        hive.start()
        await async_wait_for(
            lambda: _logged(hive, "was cut short by a hive restart: carrying it on with web~2", 1),
            what="the half-done replacement carried on",
        )
        found = await until_ready(hive, "web")
        assert found["web"]["pid"] == successor_pid  # the successor took over
        assert found["web"]["generation"] == 2
        await async_wait_for(lambda: not alive(old["pid"]), what="the old worker ended")
        assert set(await records(hive)) == {"web"}
        assert _worker_cgroups(hive) <= {"worker.web~2"}  # the old worker's is gone
    finally:
        await hive.close()
        hive.cleanup()


def alive(pid: int) -> bool:
    """The process runs (a zombie waiting for its parent to reap it does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _worker_cgroups(hive: Hive) -> set[str]:
    return {p.name for p in hive.cgroups() if p.name.startswith("worker.")}


async def _pid_of(hive: Hive, worker_id: str) -> int | None:
    record = (await records(hive)).get(worker_id)
    return record["pid"] if record else None


async def test_a_successor_heartbeats_on_under_its_own_key_after_taking_over() -> None:
    # Heartbeats every 0.5 s: the successor's process goes on sending them as web~2.
    async with serving("heartbeat_timeout = 1.5\n") as hive:
        await hive.spawn({"model": "m", "id": "web"}, wait=True)
        record = await hive.call(
            "POST", "/v1/workers/web/replace", json_body={"args": ["--latency-ms", "1"]}
        )
        assert record["generation"] == 2 and record["id"] == "web"
        seen = {record["last_heartbeat_at"]}

        async def beats() -> bool:
            current = (await records(hive))["web"]
            assert current["state"] == "ready", current  # never hung, never unknown
            seen.add(current["last_heartbeat_at"])
            return len(seen) >= 4

        await async_wait_for(beats, timeout=30, what="heartbeats after the take-over")
        assert "heartbeat" not in hive.worker_log("web").read_text().split("attempt 1:")[-1]

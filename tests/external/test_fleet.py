"""Two hives in a fleet on a real etcd server, with one real sglang-router: desired state
written to etcd runs on the right node and joins the router, a change replaces the worker, a
removal stops it; a SIGKILLed hive leaves the fleet view within its lease while its workers run
on, and comes back with them; etcd stopped and started again changes nothing on the hosts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from hivetest import TAG, Hive, running_hive
from routers import Router, in_router, router_config

from harness.etcd import EtcdServer, etcd_path
from harness.waits import async_wait_for
from hive.desired.etcd import Etcd

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(etcd_path() is None, reason="etcd is not installed (etcd-server)"),
]

TTL = 2


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    server = EtcdServer(TAG).start()
    try:
        yield server
    finally:
        server.cleanup()


def fleet_config(etcd: EtcdServer, router: Router, node: str) -> str:
    return router_config(router) + (
        f'[fleet]\nendpoints = ["{etcd.url}"]\nnode = "{node}"\nlease_ttl = {TTL}\n'
    )


def fleet_cli(hive: Hive, etcd: EtcdServer, *args: str) -> str:
    result = hive.cli("fleet", "--etcd", etcd.url, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


async def records(hive: Hive) -> dict[str, dict[str, Any]]:
    return {w["id"]: w for w in (await hive.call("GET", "/v1/workers"))["workers"]}


async def published(etcd: EtcdServer, node: str) -> dict[str, dict[str, Any]]:
    client = Etcd([etcd.url])
    try:
        _, kvs = await client.range(f"/hive/workers/{node}/")
    finally:
        await client.close()
    return {k.rsplit("/", 1)[1]: json.loads(v) for k, v in kvs.items()}


async def node_up(etcd: EtcdServer, node: str) -> bool:
    client = Etcd([etcd.url])
    try:
        _, kvs = await client.range(f"/hive/nodes/{node}")
    finally:
        await client.close()
    return bool(kvs)


def desired(path: Path, *workers: dict[str, Any]) -> Path:
    text = ""
    for worker in workers:
        text += "[[workers]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in worker.items())
    path.write_text(text)
    return path


async def test_desired_state_from_etcd_runs_on_its_node(
    etcd: EtcdServer, router: Router, tmp_path: Path
) -> None:
    with (
        running_hive(fleet_config(etcd, router, "n1")) as n1,
        running_hive(fleet_config(etcd, router, "n2")) as n2,
    ):
        try:
            await _desired_state(etcd, router, tmp_path, n1, n2)
        finally:
            await n1.close_http()
            await n2.close_http()


async def _desired_state(
    etcd: EtcdServer, router: Router, tmp_path: Path, n1: Hive, n2: Hive
) -> None:
    await async_wait_for(lambda: node_up(etcd, "n1"), what="n1 in etcd")
    await async_wait_for(lambda: node_up(etcd, "n2"), what="n2 in etcd")
    local = await n1.spawn({"model": "m", "id": "local"}, wait=True)  # etcd never touches it

    # Written to etcd: runs on n1 only, and joins the router.
    # Written by any etcd client (here: a put of the key, timed), or by `hive fleet apply` below.
    client = Etcd([etcd.url])
    try:
        await client.put("/hive/desired/n1/chat", json.dumps({"model": "demo-chat"}))
        written = time.monotonic()
    finally:
        await client.close()

    async def chat_ready() -> dict[str, Any] | None:
        record = (await records(n1)).get("chat")
        return record if record and record["state"] == "ready" else None

    chat = await async_wait_for(chat_ready, timeout=60, what="chat ready on n1")
    lag = time.monotonic() - written
    load = _iso(chat["ready_at"]) - _iso(
        chat["started_at"]
    )  # the worker's own start-up, not hive's
    print(f"\nfleet: desired write -> ready {lag * 1000:.0f} ms, of which the worker's load "
          f"{load * 1000:.0f} ms: hive's part {(lag - load) * 1000:.0f} ms")  # fmt: skip
    assert chat["declared"] == "etcd:n1"
    assert "chat" not in await records(n2)
    await async_wait_for(lambda: in_router(router, chat["url"]), what="chat in the router")
    await async_wait_for(lambda: _has(published(etcd, "n1"), "chat", "ready"), what="published")
    listing = fleet_cli(n1, etcd, "ls")
    assert listing.splitlines()[1].split()[:2] == ["n1", "up"]
    assert listing.splitlines()[2].split()[:2] == ["n2", "up"]
    assert "chat" in fleet_cli(n1, etcd, "show", "n1")
    as_json = json.loads(fleet_cli(n1, etcd, "ls", "--json"))
    assert as_json["n1"]["up"] is True and as_json["n1"]["api_url"] == n1.url
    assert fleet_cli(n1, etcd, "devices").strip() == "no GPUs in the fleet"  # none here
    nodes = json.loads(fleet_cli(n1, etcd, "show", "n1", "--json"))
    assert nodes["workers"]["chat"]["declared"] == "etcd:n1"
    assert nodes["desired"] == {"chat": {"model": "demo-chat"}}

    # A change replaces it; a removal stops it; the local worker stays as it was.
    fleet_cli(n1, etcd, "apply", "--node", "n1", "-f",
              str(desired(tmp_path / "b.toml", {"id": "chat", "model": "demo-chat",
                                                "args": ["--latency-ms", "3"]})))  # fmt: skip

    async def replaced() -> bool:
        record = (await records(n1)).get("chat")
        return bool(record and record["generation"] == 2 and record["state"] == "ready")

    await async_wait_for(replaced, timeout=60, what="chat replaced")
    fleet_cli(n1, etcd, "apply", "--node", "n1", "-f", str(desired(tmp_path / "c.toml")))
    await async_wait_for(
        lambda: _gone(records(n1), "chat"), timeout=60, what="chat removed from n1"
    )
    assert (await records(n1))["local"]["pid"] == local["pid"]

    # n2 SIGKILLed: its node leaves the fleet view within the lease; its worker runs on.
    kept = await n2.spawn({"model": "m", "id": "kept"}, wait=True)
    await async_wait_for(lambda: _has(published(etcd, "n2"), "kept", "ready"), what="kept")
    n2.kill()
    killed = time.monotonic()
    await async_wait_for(lambda: _not(node_up(etcd, "n2")), timeout=TTL * 5, what="n2 gone")
    vanished = time.monotonic() - killed
    print(f"fleet: SIGKILL of a hive -> its node gone from etcd in {vanished * 1000:.0f} ms "
          f"(lease TTL {TTL} s)")  # fmt: skip
    assert vanished <= TTL + 2
    assert psutil.pid_exists(kept["pid"])
    rows = [line.split()[:2] for line in fleet_cli(n1, etcd, "ls").splitlines()]
    assert ["n2", "up"] not in rows and ["n1", "up"] in rows
    n2.start()
    await async_wait_for(lambda: node_up(etcd, "n2"), what="n2 back")
    await async_wait_for(lambda: _has(published(etcd, "n2"), "kept", "ready"), what="republished")
    assert (await records(n2))["kept"]["pid"] == kept["pid"]  # adopted, not restarted

    # etcd down: nothing changes on the hosts; /v1/node and the metric say so.
    pids = {k: w["pid"] for k, w in (await records(n1)).items()}
    etcd.stop()

    async def says_unreachable() -> bool:
        node = await n1.call("GET", "/v1/node")
        return bool(node["fleet"]["etcd"] == "unreachable")

    await async_wait_for(says_unreachable, timeout=TTL * 5, what="n1 says etcd is unreachable")
    async with n1.http().get("/metrics") as r:
        assert "hive_fleet_connected 0.0" in await r.text()
    down_since = time.monotonic()
    while time.monotonic() - down_since < 3:  # workers keep serving, the API keeps answering
        assert {k: w["pid"] for k, w in (await records(n1)).items()} == pids
        await asyncio.sleep(0.2)
    etcd.start()

    async def agree() -> bool:
        node = await n1.call("GET", "/v1/node")
        if node["fleet"]["etcd"] != "connected":
            return False
        ours = {k: w["state"] for k, w in (await records(n1)).items()}
        theirs = {k: w["state"] for k, w in (await published(etcd, "n1")).items()}
        return ours == theirs and await node_up(etcd, "n1") and await node_up(etcd, "n2")

    await async_wait_for(agree, timeout=30, what="the views agree again")
    assert {k: w["pid"] for k, w in (await records(n1)).items()} == pids
    await n2.call("DELETE", "/v1/workers/kept")
    await n1.call("DELETE", "/v1/workers/local")


async def test_a_busy_worker_writes_nothing_to_etcd(etcd: EtcdServer, router: Router) -> None:
    """Whether a worker holds a request changes with each request: etcd says ``ready`` for a
    busy worker (the node's API has it live), so traffic alone writes nothing to etcd. Before,
    each flip between ready and busy rewrote the worker's key and the node's (its counts):
    every node under load wrote at the pace of its requests."""
    with running_hive(fleet_config(etcd, router, "n3")) as hive:
        client = Etcd([etcd.url])
        try:
            await _busy_writes_nothing(etcd, router, hive, client)
        finally:
            await hive.close_http()
            await client.close()


async def _busy_writes_nothing(etcd: EtcdServer, router: Router, hive: Hive, client: Etcd) -> None:
    await async_wait_for(lambda: node_up(etcd, "n3"), what="n3 in etcd")
    held = await hive.spawn(
        {"model": "m", "id": "held", "args": ["--latency-ms", "1500"]}, wait=True
    )

    async def settled() -> bool:  # ready, and registered with the router
        record = (await published(etcd, "n3")).get("held") or {}
        return record.get("state") == "ready" and record.get("routers") == {
            router.url: "registered"
        }

    await async_wait_for(settled, what="held published, in the router")
    before, kvs = await client.range("/hive/nodes/n3")
    # The room the scheduler places by is what the node admits: host_memory_mib (the host's
    # memory less a tenth, by default) less what its workers hold, as /metrics has them.
    async with hive.http().get("/metrics") as r:
        figures = dict(
            line.rsplit(" ", 1) for line in (await r.text()).splitlines() if "memory" in line
        )
    free = float(figures["hive_host_memory_budget_mib"]) - float(
        figures["hive_host_memory_reserved_mib"]
    )
    assert json.loads(kvs["/hive/nodes/n3"])["fleet"]["room"]["memory_mib"] == free
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 4}}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        request = asyncio.create_task(http.post(f"{held['url']}/generate", json=body))
        await async_wait_for(lambda: _state(hive, "held", "busy"), what="held busy")
        assert (await published(etcd, "n3"))["held"]["state"] == "ready"
        async with await request as answer:
            assert answer.status == 200
    await async_wait_for(lambda: _state(hive, "held", "ready"), what="held ready again")
    await asyncio.sleep(0.5)  # what a flip would have written is written by now (0.1 s)
    marker = "/hive/zz-marker"
    await client.put(marker, "1")
    written = []
    async with asyncio.timeout(30):
        async for events in client.watch("/hive/", before + 1):
            written += [e.key for e in events if e.key != marker]
            if any(e.key == marker for e in events):
                break
    await client.delete(marker)
    assert written == [], f"a busy worker wrote to etcd: {written}"
    await hive.call("DELETE", "/v1/workers/held")


async def _state(hive: Hive, worker_id: str, state: str) -> bool:
    return bool((await records(hive))[worker_id]["state"] == state)


def _iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def _has(found: Any, worker_id: str, state: str) -> bool:
    workers = await found
    return bool(worker_id in workers and workers[worker_id]["state"] == state)


async def _gone(found: Any, worker_id: str) -> bool:
    return worker_id not in await found


async def _not(value: Any) -> bool:
    return not await value

"""A fleet that places and heals itself: three hives on a 3-member etcd cluster and a real
sglang-router, the demo backend.

- Deployed replicas spread one per node. A hive SIGKILLed with its workers (a dead machine):
  its replica is ready on another node once ``reschedule_after`` has passed, and not before.
  The scheduler's hive SIGKILLed: another takes the election within the lease's TTL; the
  healed replicas serve; the killed hive, started again, finds its keys moved and stops those
  workers (out of the router first). Every desired key's history (a watch from revision 1)
  never has a replica on two nodes without a move that says why.
- etcd members killed: one changes nothing; two (no quorum) leave every worker running and
  nothing moved; all converge when they return.
- Cordon, drain, uncordon, and a rolling change of a deployment, with clients sending requests
  through a router whose retries are off: 0 failed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
from hivetest import TAG, Hive, running_hive
from routers import Router, router_config
from test_replace_router import Load  # the same clients as the replacement tests

from harness.etcd import EtcdCluster, etcd_path
from harness.net import port_block
from harness.waits import async_wait_for
from hive.desired.etcd import Etcd

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(etcd_path() is None, reason="etcd is not installed (etcd-server)"),
]

TTL = 2
RESCHEDULE_AFTER = 3.0
NODES = ("n1", "n2", "n3")


@pytest.fixture(scope="module")
def cluster() -> Iterator[EtcdCluster]:
    members = EtcdCluster(TAG).start()
    try:
        yield members
    finally:
        members.cleanup()


class Fleet:
    """Three hives under one prefix, and what the test reads of etcd."""

    def __init__(self, cluster: EtcdCluster, router: Router, prefix: str) -> None:
        self.cluster, self.router, self.prefix = cluster, router, prefix
        self.hives: dict[str, Hive] = {}
        self.etcd = Etcd(cluster.urls)

    def config(self, node: str) -> str:
        urls = ", ".join(f'"{u}"' for u in self.cluster.urls)
        return router_config(self.router) + (
            f'[fleet]\nendpoints = [{urls}]\nprefix = "{self.prefix}"\nnode = "{node}"\n'
            f"lease_ttl = {TTL}\nreschedule_after = {RESCHEDULE_AFTER}\n"
            f'labels = {{zone = "{node}"}}\n'
        )

    def cli(self, *args: str) -> str:
        hive = next(iter(self.hives.values()))
        endpoints = [a for url in self.cluster.urls for a in ("--etcd", url)]
        result = hive.cli("fleet", *endpoints, "--prefix", self.prefix, *args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def deploy(self, path: Path, name: str, replicas: int, **spawn: Any) -> str:
        fields = {"name": name, "replicas": replicas, "model": "demo-chat", **spawn}
        path.write_text(
            "[[deployments]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items())
        )
        return self.cli("deploy", "-f", str(path))

    async def range(self, under: str) -> dict[str, Any]:
        _, kvs = await self.etcd.range(f"{self.prefix}/{under}")
        return {k.removeprefix(f"{self.prefix}/{under}"): json.loads(v) for k, v in kvs.items()}

    async def placed(self) -> dict[str, list[str]]:
        """replica id -> the nodes whose desired keys hold it."""
        found: dict[str, list[str]] = {}
        for key in await self.range("desired/"):
            node, worker_id = key.split("/")
            found.setdefault(worker_id, []).append(node)
        return found

    async def serving(self, name: str, replicas: int, revision: str | None = None) -> bool:
        """Each replica placed once, ready on its node at ``revision`` (any when None), in the
        router; no move under way. (etcd says ``ready`` for a busy worker too: under load, a
        replica that holds a request still counts.)"""
        placed = await self.placed()
        workers = await self.range("workers/")
        if await self.range("moves/"):
            return False
        urls = await self.router.urls()
        for k in range(replicas):
            nodes = placed.get(f"{name}-{k}", [])
            if len(nodes) != 1:
                return False
            record = workers.get(f"{nodes[0]}/{name}-{k}")
            if record is None or record["state"] != "ready" or record["url"] not in urls:
                return False
            if revision is not None and record["labels"].get("hive.revision") != revision:
                return False
        return not [k for k in placed if k.startswith(f"{name}-") and
                    int(k.rsplit("-", 1)[1]) >= replicas]  # fmt: skip

    async def scheduler(self) -> str | None:
        _, kvs = await self.etcd.range(f"{self.prefix}/scheduler")
        value = kvs.get(f"{self.prefix}/scheduler")
        return json.loads(value)["node"] if value else None

    async def history_check(self) -> int:
        """Replay every change of the desired keys and moves from revision 1: at no revision
        is a replica on two nodes unless a move names exactly those two. Returns the number of
        revisions checked."""
        marker = f"{self.prefix}/zz-history-marker"
        await self.etcd.put(marker, "1")
        desired: dict[str, set[str]] = {}
        moves: dict[str, tuple[str, str]] = {}
        checked = 0

        def check(revision: int) -> None:
            for worker_id, nodes in desired.items():
                move = moves.get(worker_id)
                assert len(nodes) <= 1 or (move is not None and set(move) == nodes), (
                    f"revision {revision}: {worker_id} on {sorted(nodes)}, move {move}"
                )

        async with asyncio.timeout(30):
            async for events in self.etcd.watch(f"{self.prefix}/", 1):
                for event in events:
                    if event.revision != checked and checked:
                        check(checked)
                    checked = event.revision
                    rest = event.key.removeprefix(f"{self.prefix}/")
                    if rest.startswith("desired/"):
                        _, node, worker_id = rest.split("/")
                        if event.kind == "put" and "hive.deployment" in json.loads(event.value).get(
                            "labels", {}
                        ):
                            desired.setdefault(worker_id, set()).add(node)
                        else:
                            desired.get(worker_id, set()).discard(node)
                    elif rest.startswith("moves/"):
                        worker_id = rest.removeprefix("moves/")
                        if event.kind == "put":
                            data = json.loads(event.value)
                            moves[worker_id] = (data["from"], data["to"])
                        else:
                            moves.pop(worker_id, None)
                    elif event.key == marker:
                        check(checked)
                        return checked
        raise AssertionError("the history never reached the marker")


@asynccontextmanager
async def fleet_of(
    cluster: EtcdCluster, router: Router, prefix: str
) -> AsyncIterator[tuple[Fleet, ExitStack]]:
    fleet = Fleet(cluster, router, prefix)
    with ExitStack() as stack:
        try:
            base = port_block(200 * len(NODES))
            for i, node in enumerate(NODES):
                ports = (base + 200 * i, base + 200 * i + 199)
                fleet.hives[node] = stack.enter_context(
                    running_hive(fleet.config(node), port_range=ports)
                )
            up = lambda: fleet.range("nodes/")  # noqa: E731
            await async_wait_for(
                lambda: _len(up(), len(NODES)), timeout=30, what="every node in etcd"
            )
            yield fleet, stack
        finally:
            for hive in fleet.hives.values():
                await hive.close_http()
            await fleet.etcd.close()


async def _len(found: Any, n: int) -> bool:
    return len(await found) == n


def kill_machine(hive: Hive, pids: list[int]) -> None:
    """SIGKILL a hive and every worker process of it: the machine is gone."""
    hive.kill()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for child in proc.children(recursive=True):
                child.kill()
            proc.kill()
        except psutil.NoSuchProcess:
            pass


async def pids(hive: Hive) -> dict[str, int]:
    return {w["id"]: w["pid"] for w in (await hive.call("GET", "/v1/workers"))["workers"]}


async def test_spread_heal_failover_and_no_replica_placed_twice(
    cluster: EtcdCluster, router: Router, tmp_path: Path
) -> None:
    async with fleet_of(cluster, router, "/heal") as (fleet, _):
        bad = tmp_path / "bad.toml"
        bad.write_text('[[deployments]]\nname = "chat"\nreplicas = 3\nmodel = "m"\ngpus = 0\n')
        hive = fleet.hives["n1"]
        endpoints = [a for url in cluster.urls for a in ("--etcd", url)]
        refused = hive.cli("fleet", *endpoints, "--prefix", "/heal", "deploy", "-f", str(bad))
        assert refused.returncode == 2 and "deployment 'chat': gpus:" in refused.stderr
        assert "Traceback" not in refused.stderr and not await fleet.range("deployments/")
        out = fleet.deploy(tmp_path / "chat.toml", "chat", 3, args=["--latency-ms", "5"])
        assert "deployment chat: written (3 replica(s)" in out
        await async_wait_for(lambda: fleet.serving("chat", 3), timeout=60, what="3 replicas")
        placed = await fleet.placed()
        assert sorted(nodes[0] for nodes in placed.values()) == list(NODES)  # one per node
        listing = fleet.cli("ls")
        assert "scheduler: n" in listing
        assert ["chat", "demo-chat", "3", "3", "3/3"] in [
            r.split()[:5] for r in listing.splitlines()
        ]
        # The scheduler's metrics: the leader says so, the others do not; the 3 placements
        # are counted once, by whoever held the election when it placed them (with a 2-s TTL
        # on a loaded machine the election may have moved since: the sum is what holds).
        boss = await fleet.scheduler()
        assert boss is not None
        every = {node: await scheduler_metrics(hive) for node, hive in fleet.hives.items()}
        for node, figures in every.items():
            leads = node == boss
            assert figures["hive_scheduler_leader"] == leads, (node, figures)
            assert figures["hive_scheduler_unplaceable"] == 0
            assert figures["hive_scheduler_fenced_writes_total"] == 0
            if figures[PLACED] > 0:  # only a hive that held the election places
                assert figures["hive_scheduler_elections_total"] >= 1, (node, figures)
                assert figures["hive_scheduler_pass_seconds_count"] > 0, (node, figures)
        assert sum(figures[PLACED] for figures in every.values()) == 3, every
        assert every[boss]["hive_scheduler_elections_total"] >= 1, every

        # A dead machine: the hive and its workers SIGKILLed. Its replica moves once
        # reschedule_after has passed since its lease expired, and not before.
        victim = next(n for n in NODES if n != boss)
        lost = next(k for k, nodes in placed.items() if nodes == [victim])
        kill_machine(fleet.hives[victim], list((await pids(fleet.hives[victim])).values()))
        killed = time.monotonic()
        await async_wait_for(
            lambda: _not_in(fleet.range("nodes/"), victim), timeout=TTL * 5, what="lease gone"
        )
        await async_wait_for(
            lambda: fleet.serving("chat", 3), timeout=RESCHEDULE_AFTER + 60, what="healed"
        )
        healed = time.monotonic() - killed
        moved_to = (await fleet.placed())[lost]
        print(f"\nscheduler: dead machine -> its replica ready elsewhere in {healed:.2f} s "
              f"(TTL {TTL} s + reschedule_after {RESCHEDULE_AFTER} s + start-up)")  # fmt: skip
        assert healed >= RESCHEDULE_AFTER and moved_to != [victim]
        healers = [h for n, h in fleet.hives.items() if n != victim]  # the victim is dead
        assert sum([(await scheduler_metrics(h)).get(HEALED, 0) for h in healers]) == 1

        # The scheduler's hive SIGKILLed (its workers run on): another is elected within the
        # lease's TTL (and etcd's lease check).
        boss_hive = fleet.hives[boss]
        kept = {w["id"]: w for w in (await boss_hive.call("GET", "/v1/workers"))["workers"]}
        on_boss = [k for k, nodes in (await fleet.placed()).items() if nodes == [boss]]
        boss_hive.kill()
        killed = time.monotonic()
        new = await async_wait_for(
            lambda: _other(fleet.scheduler(), boss), timeout=TTL * 10, what="a new scheduler"
        )
        took = time.monotonic() - killed
        print(f"scheduler: its hive SIGKILLed -> {new} elected in {took:.2f} s (TTL {TTL} s)")
        assert new not in (boss, victim)
        # Its node is gone too, so its replicas are healed onto the last node.
        await async_wait_for(lambda: fleet.serving("chat", 3), timeout=60, what="healed again")
        assert all(nodes == [new] for nodes in (await fleet.placed()).values())
        figures = await scheduler_metrics(fleet.hives[new])
        assert figures["hive_scheduler_leader"] == 1 and figures[HEALED] == len(on_boss), figures

        # It comes back: it finds its keys moved, and stops those workers, out of the router
        # first.
        boss_hive.start()
        await async_wait_for(
            lambda: _no_workers(boss_hive), timeout=60, what="the moved workers stopped"
        )
        assert not any(_alive(w["pid"]) for w in kept.values())
        assert not {w["url"] for w in kept.values()} & await router.urls()
        assert await fleet.serving("chat", 3)
        revisions = await fleet.history_check()
        print(f"scheduler: {revisions} revisions replayed, no replica ever on two nodes")

        # Replicas no node can take (a label no node has): counted by the leader alone.
        nowhere = tmp_path / "nowhere.toml"
        nowhere.write_text('[[deployments]]\nname = "nowhere"\nreplicas = 2\nmodel = "m"\n'
                           'node_labels = { zone = "nowhere" }\n')  # fmt: skip
        fleet.cli("deploy", "-f", str(nowhere))
        await async_wait_for(
            lambda: _unplaceable(fleet.hives[new], 2), timeout=30, what="2 unplaceable"
        )
        assert (await scheduler_metrics(boss_hive))["hive_scheduler_unplaceable"] == 0
        fleet.cli("undeploy", "nowhere")
        await async_wait_for(
            lambda: _unplaceable(fleet.hives[new], 0), timeout=30, what="none unplaceable"
        )
        fleet.cli("undeploy", "chat")
        await async_wait_for(lambda: _empty(fleet.placed()), timeout=30, what="undeployed")


async def test_etcd_members_die_and_return(
    cluster: EtcdCluster, router: Router, tmp_path: Path
) -> None:
    async with fleet_of(cluster, router, "/quorum") as (fleet, _):
        fleet.deploy(tmp_path / "chat.toml", "chat", 3)
        await async_wait_for(lambda: fleet.serving("chat", 3), timeout=60, what="3 replicas")
        before = {n: await pids(h) for n, h in fleet.hives.items()}
        placed = await fleet.placed()
        first, second = cluster.names[0], cluster.names[1]
        try:
            cluster.kill(first)  # one of three: nothing changes, and the scheduler still works
            fleet.deploy(tmp_path / "chat.toml", "chat", 4)
            await async_wait_for(lambda: fleet.serving("chat", 4), timeout=60, what="4 replicas")
            assert {k: v for k, v in (await fleet.placed()).items() if k != "chat-3"} == placed
            cluster.kill(second)  # no quorum: nodes keep their workers, nothing moves
            begun = time.monotonic()
            while time.monotonic() - begun < TTL * 2 + RESCHEDULE_AFTER:
                for node, hive in fleet.hives.items():
                    now = await pids(hive)
                    assert {k: now.get(k) for k in before[node]} == before[node], node
                await asyncio.sleep(0.5)
        finally:
            cluster.start(first, second)
        await async_wait_for(lambda: fleet.serving("chat", 4), timeout=60, what="converged")
        assert {k: v for k, v in (await fleet.placed()).items() if k != "chat-3"} == placed
        for node, hive in fleet.hives.items():
            now = await pids(hive)
            assert {k: now.get(k) for k in before[node]} == before[node], node
        await fleet.history_check()


async def test_cordon_drain_and_rolling_change_lose_no_request(
    cluster: EtcdCluster, strict_router: Router, tmp_path: Path
) -> None:
    async with fleet_of(cluster, strict_router, "/drain") as (fleet, _):
        path = tmp_path / "chat.toml"
        slow = ["--latency-ms", "20"]
        fleet.deploy(path, "chat", 3, args=slow)
        await async_wait_for(lambda: fleet.serving("chat", 3), timeout=60, what="3 replicas")
        async with Load(strict_router.url) as load:
            await load.more(40)
            # Cordon: nothing new there.
            assert "cordoned" in fleet.cli("cordon", "n3")
            fleet.deploy(path, "chat", 4, args=slow)
            await async_wait_for(lambda: fleet.serving("chat", 4), timeout=60, what="scaled")
            assert (await fleet.placed())["chat-3"] != ["n3"]
            assert "up,cordoned" in fleet.cli("ls")
            # Drain: each replica on n3 serves elsewhere before it leaves n3.
            moving = sum(nodes == ["n3"] for nodes in (await fleet.placed()).values())
            assert "draining" in fleet.cli("drain", "n3")
            drain_begun = time.monotonic()
            await async_wait_for(lambda: _off(fleet.placed(), "n3"), timeout=60, what="n3 drained")
            await async_wait_for(lambda: fleet.serving("chat", 4), timeout=60, what="drained")
            await async_wait_for(
                lambda: _no_workers(fleet.hives["n3"]), timeout=60, what="n3 empty"
            )
            drained = time.monotonic() - drain_begun
            await load.more(40)
            # Uncordon: n3 may take replicas again.
            fleet.cli("uncordon", "n3")
            fleet.deploy(path, "chat", 5, args=slow)
            await async_wait_for(lambda: fleet.serving("chat", 5), timeout=60, what="5 replicas")
            assert (await fleet.placed())["chat-4"] == ["n3"]
            # A rolling change: one replica at a time, each replaced without a gap.
            out = fleet.deploy(path, "chat", 5, args=["--latency-ms", "21"])
            roll_begun = time.monotonic()
            revision = out.split("revision ")[1].rstrip(")\n")
            await async_wait_for(
                lambda: fleet.serving("chat", 5, revision), timeout=120, what="rolled"
            )
            rolled = time.monotonic() - roll_begun
            await load.more(40)
        boss = await fleet.scheduler()
        assert boss is not None  # one election all along: it wrote every step
        figures = await scheduler_metrics(fleet.hives[boss])
        reasons = {k: figures[f'hive_scheduler_placements_total{{reason="{k}"}}']
                   for k in ("placed", "drained", "rolled", "healed")}  # fmt: skip
        assert reasons == {"placed": 5, "drained": moving, "rolled": 5, "healed": 0}, figures
        lost = {k: v for k, v in load.counts.items() if k != "2xx"}
        print(f"\nscheduler: cordon, drain, rolling change under load: sent {load.sent}, "
              f"failed {sum(lost.values())} {lost}; n3 drained ({moving} replica(s)) in "
              f"{drained:.1f} s, 5 replicas rolled in {rolled:.1f} s")  # fmt: skip
        assert lost == {}, f"requests failed: {dict(load.counts)}"
        await fleet.history_check()
        fleet.cli("undeploy", "chat")
        await async_wait_for(lambda: _empty(fleet.placed()), timeout=30, what="undeployed")


PLACED = 'hive_scheduler_placements_total{reason="placed"}'
HEALED = 'hive_scheduler_placements_total{reason="healed"}'


async def scheduler_metrics(hive: Hive) -> dict[str, float]:
    """The hive_scheduler_ samples of the hive's /metrics, by name and labels."""
    async with hive.http().get("/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return {
        name: float(value)
        for line in text.splitlines()
        if line.startswith("hive_scheduler_")
        for name, value in [line.rsplit(" ", 1)]
    }


async def _unplaceable(hive: Hive, n: int) -> bool:
    return (await scheduler_metrics(hive))["hive_scheduler_unplaceable"] == n


async def _not_in(found: Any, key: str) -> bool:
    return key not in await found


async def _other(found: Any, old: str) -> str | None:
    holder = await found
    return holder if holder not in (None, old) else None


async def _empty(found: Any) -> bool:
    return not await found


async def _off(found: Any, node: str) -> bool:
    return all(node not in nodes for nodes in (await found).values())


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def _no_workers(hive: Hive) -> bool:
    return not await pids(hive)

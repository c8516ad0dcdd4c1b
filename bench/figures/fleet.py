"""Figure 9: the fleet's scheduler at scale, by simulation, and a real node's etcd traffic.

- **9 place.** A real etcd 3.4 (one member) and ``N`` simulated nodes: tasks of the bench's own
  process, each with a lease of its own (renewed every third of 60 s) under which it publishes a
  node key as a hive does (labels, backends, routers, room: 8 GPUs of 80 GiB, 2 x 64 cores,
  500 GiB). A real hive (``[fleet]``, no label the deployments ask for, so it takes no
  replica) is the scheduler. 20 deployments of ``2N / 20`` replicas each (half asking for
  ``gpus = 1``, half for a 20 GiB share of a GPU) are written in one transaction; the value is the
  time from that write until etcd holds all ``2N`` desired keys. The notes give the write
  transactions (etcd revisions) and keys the scheduler wrote meanwhile, the CPU time of its
  hive's process, and its CPU at rest afterwards.
- **9b at rest.** A real hive with two ready demo workers, alone with its etcd: the write
  transactions it makes in ``BENCH_FLEET_REST`` seconds at rest (revisions of the store), as
  writes per minute, and its lease renewals (etcd's ``etcd_debugging_lease_renewed_total``).
- **9c a worker changes.** The same hive restarts one worker (``POST /v1/workers/{id}/restart``):
  the write transactions and keys until it is ready again and etcd has it so.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request

import psutil
from benchlib import TAG, bench_hive, cpu_seconds, log

from figures.common import Figure, Settings, unavailable
from harness.daemon import Hive
from harness.etcd import EtcdServer, etcd_path
from hive.desired.etcd import Etcd, put_op
from hive.desired.etcd_txn import count, get

SIM_TTL = 60
#: Seconds of rest measured after the placements.
REST = 10.0
#: The scheduler's log line for a pass that placed replicas.
PASS = re.compile(r"scheduler: placed (\d+) replica\(s\) in ([\d.]+) s")
DEPLOYMENTS = 20
#: What etcd's /metrics says, by the names read here.
METRICS = ("etcd_mvcc_put_total", "etcd_mvcc_delete_total", "etcd_debugging_lease_renewed_total")


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in METRICS:
            found[name] = float(value)
    return found


async def revision(etcd: Etcd) -> int:
    at, _ = await get(etcd, "/")
    return at


def node_doc(name: str) -> str:
    gpus = [
        {"id": f"GPU-{i}", "healthy": True, "memory_total_mib": 81920, "memory_free_mib": 81920,
         "whole": True}
        for i in range(8)
    ]  # fmt: skip
    return json.dumps({
        "hostname": name, "version": "sim",
        "fleet": {
            "labels": {"sim": "1"}, "backends": {"demo": "optional"}, "default_backend": "demo",
            "routers": [], "room": {"cores": [64, 64], "memory_mib": 512000, "gpus": gpus},
        },
    })  # fmt: skip


class SimNodes:
    """``count`` nodes that publish themselves under leases of their own, and renew them."""

    def __init__(self, etcd: Etcd, prefix: str, count: int) -> None:
        self.etcd, self.prefix, self.count = etcd, prefix, count
        self.leases: list[int] = []
        self._task: asyncio.Task[None] | None = None
        self._gate = asyncio.Semaphore(64)

    async def start(self) -> None:
        async def one(i: int) -> int:
            async with self._gate:
                name = f"sim{i:04d}"
                lease = await self.etcd.grant(SIM_TTL)
                await self.etcd.txn([put_op(f"{self.prefix}/nodes/{name}", node_doc(name), lease)])
                return lease

        self.leases = list(await asyncio.gather(*(one(i) for i in range(self.count))))
        self._task = asyncio.create_task(self._renew())

    async def _renew(self) -> None:
        async def one(lease: int) -> None:
            async with self._gate:
                await self.etcd.keepalive(lease)

        while True:
            await asyncio.sleep(SIM_TTL / 3)
            await asyncio.gather(*(one(lease) for lease in self.leases))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

        async def one(lease: int) -> None:
            async with self._gate:
                await self.etcd.revoke(lease)

        await asyncio.gather(*(one(lease) for lease in self.leases), return_exceptions=True)


def fleet_config(url: str, prefix: str, node: str) -> str:
    return f'[fleet]\nendpoints = ["{url}"]\nprefix = "{prefix}"\nnode = "{node}"\n'


async def figures_fleet(settings: Settings) -> list[Figure]:
    if etcd_path() is None:
        return [Figure("9", "fleet: scheduler", "s", unavailable("etcd is not installed"))]
    server = await asyncio.to_thread(EtcdServer(TAG).start)
    etcd = Etcd([server.url])
    figures: list[Figure] = []
    try:
        for nodes in settings.fleet:
            figures.append(await _place(server, etcd, nodes))
        figures += await _node_traffic(settings, server, etcd)
    finally:
        await etcd.close()
        await asyncio.to_thread(server.cleanup)
    return figures


async def _place(server: EtcdServer, etcd: Etcd, nodes: int) -> Figure:
    replicas = 2 * nodes
    prefix = f"/sim{nodes}"
    title = f"fleet: {replicas:,} replicas placed on {nodes:,} simulated nodes"
    log(f"figure 9: {title}")
    sims = SimNodes(etcd, prefix, nodes)
    hive = bench_hive(f"fleet{nodes}", fleet_config(server.url, prefix, "scheduler"))
    try:
        await sims.start()
        await hive.start_async()
        deadline = time.monotonic() + 60
        while (await get(etcd, f"{prefix}/scheduler"))[1] is None:
            if time.monotonic() > deadline:
                raise RuntimeError("no scheduler was elected")
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # its first read done
        proc = psutil.Process(hive.pid)
        cpu0, m0, rev0 = cpu_seconds(proc), metrics(server.url), await revision(etcd)
        per = replicas // DEPLOYMENTS
        ops = []
        for j in range(DEPLOYMENTS):
            need = {"gpus": 1} if j % 2 == 0 else {"gpu_memory_mib": 20480}
            spec = {"name": f"d{j:02d}", "replicas": per, "model": f"model-{j}",
                    "node_labels": {"sim": "1"}, **need}  # fmt: skip
            ops.append(put_op(f"{prefix}/deployments/d{j:02d}", json.dumps(spec)))
        begun = time.perf_counter()
        await etcd.txn(ops)
        while await count(etcd, f"{prefix}/desired/") < per * DEPLOYMENTS:
            if time.perf_counter() - begun > 300:
                raise RuntimeError("the replicas were not all placed in 300 s")
            await asyncio.sleep(0.02)
        seconds = time.perf_counter() - begun
        cpu1, m1, rev1 = cpu_seconds(proc), metrics(server.url), await revision(etcd)
        passes = [(int(n), float(t)) for n, t in PASS.findall(hive.log())]
        await asyncio.sleep(3.0)  # its own writes come back through its watch
        cpu2, rev2 = cpu_seconds(proc), await revision(etcd)
        await asyncio.sleep(REST)  # at rest: what it writes and burns with nothing to do
        cpu3, rev3 = cpu_seconds(proc), await revision(etcd)
        transactions = rev1 - rev0 - 1  # less the deployments' own
        keys = int(m1["etcd_mvcc_put_total"] - m0["etcd_mvcc_put_total"]) - DEPLOYMENTS
        notes = [
            f"{per * DEPLOYMENTS:,} replicas of {DEPLOYMENTS} deployments on {nodes:,} nodes: "
            f"{seconds:.2f} s from the deployments' write to the last desired key; the "
            f"scheduler wrote {keys:,} keys in {transactions} transactions; its hive used "
            f"{cpu1 - cpu0:.2f} s of CPU (and {cpu2 - cpu1:.2f} s in the next 3 s, reading its "
            f"own writes back from the watch); its passes: "
            + ", ".join(f"{n} placed in {t:.2f} s" for n, t in passes),
            f"then {REST:g} s at rest: {rev3 - rev2} writes, "
            f"{100 * (cpu3 - cpu2) / REST:.1f} % of a core",
        ]
        for note in notes:
            log(f"figure 9: {note}")
        target = "<= 10 s" if replicas == 2000 else ""
        return Figure(
            "9", title, "s",
            {"value": round(seconds, 3), "n": 1, "transactions": transactions, "keys": keys,
             "cpu_s": round(cpu1 - cpu0, 3), "echo_cpu_s": round(cpu2 - cpu1, 3),
             "pass_s": [t for _, t in passes], "rest_writes": rev3 - rev2,
             "rest_cpu_percent": round(100 * (cpu3 - cpu2) / REST, 2), "nodes": nodes},
            target=target, met=(seconds <= 10) if target else None, stat="value", notes=notes,
        )  # fmt: skip
    finally:
        await hive.close()
        await sims.stop()


async def _node_traffic(settings: Settings, server: EtcdServer, etcd: Etcd) -> list[Figure]:
    """9b and 9c: one real node, alone with its etcd."""
    hive: Hive = bench_hive("fleetnode", fleet_config(server.url, "/rest", "node1"))
    try:
        await hive.start_async()
        for worker_id in ("a", "b"):
            await hive.spawn({"model": "bench", "id": worker_id}, wait=True)
        await _published_ready(etcd, ("a", "b"))
        await asyncio.sleep(12.0)  # past one periodic compare (10 s)
        window = settings.fleet_rest
        log(f"figure 9b: a node with two workers at rest for {window:g} s")
        changed: dict[str, list[str]] = {}
        follow = asyncio.create_task(_written(etcd, "/rest/", changed))
        await asyncio.sleep(0.5)
        m0, rev0 = metrics(server.url), await revision(etcd)
        await asyncio.sleep(window)
        m1, rev1 = metrics(server.url), await revision(etcd)
        follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)
        what = "; ".join(f"{k} ({', '.join(v)})" for k, v in changed.items()) or "none"
        writes = (rev1 - rev0) * 60 / window
        renewals = (
            (m1["etcd_debugging_lease_renewed_total"] - m0["etcd_debugging_lease_renewed_total"])
            * 60 / window
        )  # fmt: skip
        rest = Figure(
            "9b", "fleet: a node at rest, etcd writes", "/min",
            {"value": round(writes, 2), "n": 1, "keepalives_per_min": round(renewals, 1)},
            target="0", met=writes == 0, stat="value",
            notes=[f"{rev1 - rev0} writes in {window:g} s; {renewals:.1f} lease renewals a "
                   "minute (lease_ttl 10 s: one every 3.3 s)", f"keys written: {what}"],
        )  # fmt: skip
        log(f"figure 9b: {rest.notes[0]}; {rest.notes[1]}")
        changed = {}
        follow = asyncio.create_task(_written(etcd, "/rest/", changed))
        await asyncio.sleep(0.5)
        m0, rev0 = metrics(server.url), await revision(etcd)
        await hive.call("POST", "/v1/workers/a/restart")
        await asyncio.sleep(0.5)
        await _published_ready(etcd, ("a",))
        await asyncio.sleep(3.0)  # the last coalesced writes
        m1, rev1 = metrics(server.url), await revision(etcd)
        follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)
        what = "; ".join(f"{k} ({', '.join(v)})" for k, v in changed.items()) or "none"
        keys = int(m1["etcd_mvcc_put_total"] - m0["etcd_mvcc_put_total"])
        change = Figure(
            "9c", "fleet: a worker restarted, etcd writes", "writes",
            {"value": rev1 - rev0, "n": 1, "keys": keys}, stat="value",
            notes=[f"{rev1 - rev0} write transactions, {keys} keys, from the restart until "
                   "the worker is ready again and published", f"keys written: {what}"],
        )  # fmt: skip
        log(f"figure 9c: {change.notes[0]}; {change.notes[1]}")
        return [rest, change]
    finally:
        await hive.close()


async def _written(etcd: Etcd, prefix: str, found: dict[str, list[str]]) -> None:
    """Each key written under ``prefix`` from now on, and the fields of its JSON that changed."""
    revision, kvs = await etcd.range(prefix)
    last = {k: _loads(v) for k, v in kvs.items()}
    async for events in etcd.watch(prefix, revision + 1):
        for event in events:
            value = _loads(event.value)
            before = last.get(event.key, {})
            fields = sorted(k for k in set(value) | set(before) if value.get(k) != before.get(k))
            last[event.key] = value
            found.setdefault(event.key, []).append(",".join(fields[:6]) or event.kind)


def _loads(raw: bytes) -> dict[str, object]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def _published_ready(etcd: Etcd, ids: tuple[str, ...]) -> None:
    deadline = time.monotonic() + 60
    while True:
        _, kvs = await etcd.range("/rest/workers/node1/")
        states = {k.rsplit("/", 1)[1]: json.loads(v).get("state") for k, v in kvs.items()}
        if all(states.get(i) == "ready" for i in ids):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers {ids} not published ready: {states}")
        await asyncio.sleep(0.05)

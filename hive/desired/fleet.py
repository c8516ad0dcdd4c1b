"""This hive as a node of a fleet in etcd: a lease, the node's name claimed under it, its
status for all to watch, and the workers the fleet wants on it.

Keys, under ``prefix`` (``/hive`` by default), as docs/fleet-etcd.md gives them:

- ``{prefix}/nodes/{node}``: the node (name, version, API URL, devices, worker counts), under
  this hive's lease. It is also the claim on the name: created only if absent, in one etcd
  transaction, and every later write is made only while it is still under this hive's lease;
- ``{prefix}/workers/{node}/{id}``: each worker record (less the figures that change with every
  heartbeat or usage refresh, and ``busy`` said as ``ready``), under the lease;
- ``{prefix}/desired/{node}/{id}``: what an orchestrator wants here, one declared worker (a spawn
  request with an ``id``) a key. Not under a lease: it outlives this hive.

The lease is renewed every third of its TTL; a hive that dies leaves the fleet view when it
expires, one that stops cleanly revokes it at once. A lease found gone at renewal (hive was
paused or cut off for longer than the TTL) is logged and counted, and a new one granted. A hive
that finds its node's name held by another hive's lease does not join: it says who holds it,
publishes nothing, runs no desired worker, keeps serving its host alone, and tries the name
again at each renewal, so it takes over once the holder stops. Writes are coalesced: a record is
written when it changes (at most every 0.1 s), and everything is compared again every 10 s. The
desired set is kept by :class:`~hive.desired.watch.DesiredWatch` (read whole, then watched; any
end of the watch reads it again); hive applies it as ``hive apply --prune`` would for that set
alone (workers declared elsewhere are never pruned by it). While etcd cannot be reached nothing
changes on the host: workers run on, the API answers, and ``/v1/node`` and
``hive_fleet_connected`` say so; when it comes back the lease is granted again if it expired,
the name claimed again, everything republished, and the desired set read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal

from hive.config import FleetConfig
from hive.desired.declared import parse_workers
from hive.desired.etcd import Etcd, delete_op, put_op
from hive.desired.node_doc import published_state, publishing
from hive.desired.reconcile import Reconciler
from hive.desired.scheduler import Scheduler
from hive.desired.watch import DesiredWatch
from hive.errors import DeclarationError, EtcdError
from hive.models import FleetStatus, State, Worker
from hive.state.registry import Change, Registry, now

log = logging.getLogger("hive.fleet")

#: Record fields left out of etcd: they change with each heartbeat or usage refresh (the peaks
#: too, while a worker's use grows), and the node's API has them live. A node at rest writes
#: nothing but its lease's keep-alives.
VOLATILE = frozenset(
    {
        "last_heartbeat_at", "in_flight", "rss_bytes", "cpu_percent", "gpu_memory_used_mib",
        "memory_peak_mib", "gpu_memory_peak_mib",
    }
)  # fmt: skip
#: Source of the workers that etcd's desired set declares.
ETCD_SOURCE = "etcd:"


def ssl_context(config: FleetConfig) -> ssl.SSLContext | None:
    """TLS towards etcd, from the CA and client files given (None: the system's defaults)."""
    if config.ca_file is None and config.cert_file is None:
        return None
    context = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
    if config.cert_file is not None:
        context.load_cert_chain(
            str(config.cert_file), str(config.key_file) if config.key_file else None
        )
    return context


def node_name(config: FleetConfig) -> str:
    return config.node or socket.gethostname()


class Fleet:
    """The lease, the claim on the node's name, the publisher and the desired set of one node.

    About 300 lines: loops that share one connection state (the lease they write under, whether
    the name is held, whether etcd answers), kept in one object so that a reconnect or a lost
    claim is one decision, made once.
    """

    def __init__(
        self,
        config: FleetConfig,
        registry: Registry,
        reconciler: Reconciler,
        node_value: Callable[[], dict[str, Any]],
    ) -> None:
        self.config = config
        self.node = node_name(config)
        self.registry = registry
        self.reconciler = reconciler
        # Stable figures only, and what the scheduler places by (hive.desired.node_doc).
        self.node_value = publishing(
            node_value,
            registry,
            lambda: reconciler.supervisor.config,
            config,
            reconciler.supervisor.memory.budget,
        )
        self.etcd = Etcd(config.endpoints, ssl_context(config))
        #: With ``schedule``: this hive campaigns to be the fleet's scheduler, under its lease.
        self.scheduler: Scheduler | None = None
        if config.schedule:
            etcd = Etcd(config.endpoints, ssl_context(config))
            self.scheduler = Scheduler(config, self.node, etcd, self._held_lease)
        prefix = config.prefix
        self.node_key = f"{prefix}/nodes/{self.node}"
        self.workers_prefix = f"{prefix}/workers/{self.node}/"
        self.desired_prefix = f"{prefix}/desired/{self.node}/"
        self.lease: int | None = None
        self.connected = False
        self.error: str | None = None
        self.since: datetime = now()
        #: ``held``: this hive has the node's name; ``taken``: another hive's lease has it
        #: (``holder`` says whose); ``pending``: not known yet.
        self.claim: Literal["held", "taken", "pending"] = "pending"
        self.holder: dict[str, Any] | None = None
        #: Figures for the metrics: leases etcd no longer had at renewal.
        self.lease_losses = 0
        self.watch = DesiredWatch(self.etcd, self.desired_prefix, self._desired_changed_now)
        self._renewed: float | None = None  # loop time of the last renewal that etcd took
        self._published: dict[str, bytes] = {}  # key -> the value etcd holds from us
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._renew_now = asyncio.Event()
        self._desired_changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._unsubscribe: Callable[[], None] | None = None

    def _held_lease(self) -> int | None:
        """The lease, while this hive holds the node's name under it."""
        return self.lease if self.claim == "held" else None

    @property
    def watch_restarts(self) -> int:
        return self.watch.restarts

    # -- life -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._unsubscribe = self.registry.subscribe(self._on_change)
        self._dirty.update(self.registry.ids())
        self._tasks = [
            asyncio.create_task(self._lease_loop(), name="hive-fleet-lease"),
            asyncio.create_task(self._publish_loop(), name="hive-fleet-publish"),
            asyncio.create_task(self._reconcile_loop(), name="hive-fleet-reconcile"),
        ]
        if self.scheduler is not None:
            self.scheduler.start()
        log.info("fleet: node %s in etcd at %s", self.node, ", ".join(self.config.endpoints))

    async def close(self) -> None:
        """Stop the loops and revoke the lease: this node leaves the fleet view at once (a name
        another hive holds is not this hive's to give up)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self.scheduler is not None:  # first: it writes nothing more; the revocation frees
            await self.scheduler.close()  # its key for another hive at once
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.watch.stop()
        if self.lease is not None:
            with contextlib.suppress(EtcdError):
                await self.etcd.revoke(self.lease)
                if self.claim == "held":
                    log.info("fleet: lease revoked, node %s left the fleet", self.node)
        await self.etcd.close()

    def status(self) -> FleetStatus:
        return FleetStatus(
            node=self.node,
            etcd="connected" if self.connected else "unreachable",
            error=self.error,
            since=self.since,
            lease_ttl=self.config.lease_ttl,
            desired=len(self.watch.desired),
            claim=self.claim,
            holder=self.holder,
            watch=self.watch.state,
            watch_error=self.watch.error,
        )

    def _state(self, connected: bool, error: str | None = None) -> None:
        if connected != self.connected:
            self.since = now()
            if connected:
                log.info("fleet: etcd answers again")
                if self.error is not None:  # it was unreachable, not just not yet asked
                    # The watch may hang on a connection that went away with etcd.
                    self.watch.restart("etcd answers again")
            else:
                log.warning("fleet: etcd unreachable, workers keep running: %s", error)
        self.connected, self.error = connected, error

    # -- the lease and the name ----------------------------------------------------------------

    async def _lease_loop(self) -> None:
        ttl = self.config.lease_ttl
        loop = asyncio.get_running_loop()
        while True:
            try:
                if self.lease is None:
                    self.lease = await self.etcd.grant(ttl)
                    self._renewed = loop.time()
                    await self._unclaimed()  # a new lease: the name is claimed under it
                elif await self.etcd.keepalive(self.lease) == 0:
                    self._lease_lost(loop.time(), ttl)
                    continue
                else:
                    self._renewed = loop.time()
                if self.claim != "held":
                    await self._claim()
                self._state(True)
            except EtcdError as exc:
                self._state(False, str(exc))
            self._renew_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._renew_now.wait(), ttl / 3)

    def _lease_lost(self, at: float, ttl: int) -> None:
        away = at - self._renewed if self._renewed is not None else float("nan")
        self.lease_losses += 1
        log.warning(
            "fleet: lease %x was gone when hive renewed it, %.1f s after its last renewal "
            "(lease_ttl %d s: hive was paused or cut off from etcd that long); node %s and its "
            "workers left the fleet view meanwhile; granting a new lease",
            self.lease,
            away,
            ttl,
            self.node,
        )
        self.lease = None

    async def _claim(self) -> None:
        """Create the node's key under this lease if no one has it; else say who does."""
        assert self.lease is not None
        value = json.dumps(self.node_value(), sort_keys=True, default=str)
        created, held, lease = await self.etcd.create(self.node_key, value, self.lease)
        if created or lease == self.lease:
            if self.claim != "held":
                log.info("fleet: node name %s claimed under lease %x", self.node, self.lease)
            self.claim, self.holder = "held", None
            self._published = {self.node_key: value.encode()} if created else {}
            self._dirty.update(self.registry.ids())
            self._wake.set()
            self.watch.start()
            return
        if not held:  # its holder left meanwhile: try again at once
            self._renew_now.set()
            return
        try:
            holder = json.loads(held)
        except ValueError:
            holder = {}
        holder = {k: holder.get(k) for k in ("hostname", "api_url", "started_at", "version")}
        if self.claim != "taken" or holder != self.holder:
            log.error(
                "fleet: node name %s is held by another hive (%s at %s, up since %s, lease %x): "
                "this hive does not join the fleet; its workers run on here alone, and it takes "
                "the name when that hive leaves. Give each hive its own [fleet] node",
                self.node,
                holder.get("hostname"),
                holder.get("api_url"),
                holder.get("started_at"),
                lease,
            )
        self.claim, self.holder = "taken", holder
        await self.watch.stop()

    async def _unclaimed(self) -> None:
        """The name is no longer known to be this hive's: publish and watch nothing until it
        is claimed again."""
        self.claim = "pending"
        self._published.clear()
        await self.watch.stop()

    # -- publishing ------------------------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        # On the loop (the registry delivers there): coalesced into the next publish.
        self._dirty.add(change.id)
        self._wake.set()

    async def _publish_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 10.0)
            self._wake.clear()
            if self.lease is None or self.claim != "held":
                continue
            if not self._dirty:  # the periodic pass: compare everything
                self._dirty.update(self.registry.ids())
                self._dirty.update(k.removeprefix(self.workers_prefix) for k in self._published
                                   if k.startswith(self.workers_prefix))  # fmt: skip
            dirty, self._dirty = self._dirty, set()
            try:
                await self._publish(dirty)
            except EtcdError as exc:
                self._dirty |= dirty
                self._state(False, str(exc))
                await asyncio.sleep(1.0)
                self._wake.set()
                continue
            except Exception:
                log.exception("fleet: publishing failed; trying again at the next pass")
            await asyncio.sleep(0.1)  # what changes meanwhile goes in the next write

    async def _publish(self, dirty: set[str]) -> None:
        ops: list[dict[str, Any]] = []
        written: dict[str, bytes | None] = {}
        node = json.dumps(self.node_value(), sort_keys=True, default=str).encode()
        if self._published.get(self.node_key) != node:
            ops.append(put_op(self.node_key, node.decode(), self.lease))
            written[self.node_key] = node
        for worker_id in sorted(dirty):
            key = self.workers_prefix + worker_id
            record = self._record(worker_id)
            if record is None:
                if key in self._published:
                    ops.append(delete_op(key))
                    written[key] = None
            elif self._published.get(key) != record:
                ops.append(put_op(key, record.decode(), self.lease))
                written[key] = record
        if not ops or self.lease is None:
            return
        if not await self.etcd.txn(ops, held=(self.node_key, self.lease)):
            log.warning(
                "fleet: node %s's key is no longer under this hive's lease; claiming it again",
                self.node,
            )
            self._dirty |= dirty
            await self._unclaimed()
            self._renew_now.set()
            return
        for key, value in written.items():
            if value is None:
                self._published.pop(key, None)
            else:
                self._published[key] = value

    def _record(self, worker_id: str) -> bytes | None:
        if worker_id not in self.registry:
            return None
        record: Worker = self.registry.get(worker_id)
        if record.state == State.BUSY:  # see published_state
            record = record.model_copy(update={"state": published_state(record.state)})
        return record.model_dump_json(exclude=set(VOLATILE)).encode()

    # -- desired state -------------------------------------------------------------------------

    def _desired_changed_now(self) -> None:
        self._desired_changed.set()

    async def _reconcile_loop(self) -> None:
        while True:
            await self._desired_changed.wait()
            await asyncio.sleep(0.1)  # a burst of writes is one pass
            self._desired_changed.clear()
            if self.claim != "held":  # another hive has the name: its desired set is not ours
                continue
            try:
                await self._reconcile()
            except Exception:  # a pass that failed must not end the loop: the next one retries
                log.exception("fleet: reconciling the desired workers failed")

    def _parse_desired(self) -> list[Any]:
        items = []
        for worker_id, raw in sorted(self.watch.desired.items()):
            where = self.desired_prefix + worker_id
            try:
                spec = json.loads(raw)
            except ValueError:
                raise DeclarationError(f"{where}: not valid JSON") from None
            if isinstance(spec, dict):
                spec.setdefault("id", worker_id)
                if spec["id"] != worker_id:
                    raise DeclarationError(f"{where}: id: {spec['id']!r} is not the key's")
            items.append(spec)
        return parse_workers(items, self.desired_prefix.rstrip("/"), f"{ETCD_SOURCE}{self.node}")

    async def _reconcile(self) -> None:
        try:
            declared = self._parse_desired()
            await self.reconciler.apply_set(declared, ETCD_SOURCE, "fleet: desired workers")
        except DeclarationError as exc:
            log.error("fleet: desired workers refused, nothing of them applied: %s", exc)

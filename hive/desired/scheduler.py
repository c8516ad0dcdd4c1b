"""The fleet's scheduler: one hive at a time, elected through etcd, places the deployments'
replicas on nodes and heals them (docs/fleet-etcd.md).

**Election.** Each hive with ``[fleet] schedule = true`` campaigns for ``{prefix}/scheduler``:
a transaction that creates the key under this hive's lease if no one holds it. The holder
schedules; the others watch the key and campaign again when it goes: when the holder's lease
expires (the hive died, or lost etcd for longer than ``lease_ttl``) or is revoked (it stopped).

**Fencing.** Every write the scheduler makes is a transaction whose condition is that the key
still exists with the create revision of its own election. A scheduler that lost the key (its
lease expired while it was cut off, and perhaps another was elected since) has every write
refused, and goes back to campaigning: two schedulers never both write.

**Passes.** Once elected, it reads everything under the prefix, then follows the watch from the
revision it read; after each burst of changes (0.1 s), and every second while a clock runs (a
node gone, a move under way, a replica no node can take yet), it runs one pass
(:mod:`hive.desired.scheduling`) and carries out its steps, up to 100 writes a transaction.
At rest it runs none and writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from hive.config import FleetConfig
from hive.desired.deployments import Keys
from hive.desired.etcd import TXN_OPS, Etcd, delete_op, put_op
from hive.desired.etcd_txn import created_at, get, range_op, txn
from hive.desired.fleet_view import FleetView
from hive.desired.scheduling import PLACEMENTS, Plan, Step, plan
from hive.errors import Compacted, EtcdError

log = logging.getLogger("hive.scheduler")

#: A pass runs this long after the first change of a burst.
GATHER = 0.1
#: ... and this often while a clock runs (healing, moves, replicas waiting for room).
PERIOD = 1.0
#: A watch silent this long while etcd's revision moved on is read again whole: it may hang on
#: a connection the network dropped without a word.
RESYNC = 60.0


class Deposed(Exception):
    """This hive no longer holds the election key: it must not write."""


class Scheduler:
    def __init__(
        self,
        config: FleetConfig,
        node: str,
        etcd: Etcd,
        lease: Callable[[], int | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.node = node
        self.etcd = etcd
        self.lease = lease
        self.keys = Keys(config.prefix)
        self.view = FleetView(self.keys, clock)
        self.leading = False
        #: What this hive has written as scheduler: transactions, and keys in them; the
        #: replicas it wrote onto nodes, by why (scheduling.PLACEMENTS); its transactions the
        #: fence refused (another hive held the election); its passes, each timed to the
        #: ``on_pass`` callbacks (the metrics' histogram). Read by hive.state.metrics.
        self.transactions = 0
        self.writes = 0
        self.elections = 0
        self.placements: Counter[str] = Counter(dict.fromkeys(PLACEMENTS, 0))
        self.fenced_writes = 0
        self.passes = 0
        self.on_pass: list[Callable[[float], None]] = []
        self._changed = asyncio.Event()
        self._heard = 0.0  # when the watch last said something (monotonic)
        self._election = 0
        self._task: asyncio.Task[None] | None = None
        self._unplaced: set[str] = set()

    @property
    def unplaceable(self) -> int:
        """Replicas wanted that no node can take now (room, labels, backends, cordons), as of
        this hive's last pass; 0 while it does not schedule."""
        return len(self._unplaced) if self.leading else 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="hive-fleet-scheduler")

    async def close(self) -> None:
        """Stop scheduling (the lease's revocation then frees the key for another hive)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.etcd.close()

    # -- the election ----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            lease = self.lease()
            if lease is None:
                await asyncio.sleep(0.2)
                continue
            try:
                revision = await self._campaign(lease)
                if revision is None:
                    continue
                await self._lead(lease, revision)
            except Deposed as exc:
                log.warning("scheduler: %s no longer schedules the fleet: %s", self.node, exc)
            except EtcdError as exc:
                log.debug("scheduler: %s", exc)
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("scheduler: a pass failed; campaigning again")
                await asyncio.sleep(1.0)
            finally:
                self.leading = False
                self._unplaced = set()  # another hive's to count now

    async def _campaign(self, lease: int) -> int | None:
        """Take the key if it is free; its create revision when this hive holds it, else None
        (after the key went, or a while: whichever comes first)."""
        value = json.dumps({"node": self.node, "lease": lease, "since": _now()})
        key = self.keys.scheduler
        result = await txn(
            self.etcd, [created_at(key, 0)], [put_op(key, value, lease)], [range_op(key)]
        )
        if result.succeeded:
            return result.revision
        held = result.kvs[0] if result.kvs else None
        if held is not None and held.lease == lease:
            return held.create_revision  # ours already (the watch had ended)
        await self._until_free(result.revision)
        return None

    async def _until_free(self, revision: int) -> None:
        """Wait until the key is deleted (or a lease TTL passed: then campaign again)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.lease_ttl):
                async for events in self.etcd.watch(self.keys.scheduler, revision + 1):
                    if any(e.kind == "delete" and e.key == self.keys.scheduler for e in events):
                        return

    # -- leading ---------------------------------------------------------------------------------

    async def _lead(self, lease: int, revision: int) -> None:
        self.fence = created_at(self.keys.scheduler, revision)
        self.leading = True
        if revision != self._election:
            self.elections += 1
            self._election = revision
            log.info("scheduler: %s schedules the fleet (elected at revision %d)", self.node,
                     revision)  # fmt: skip
        else:
            log.info("scheduler: reading the fleet again (its watch ended)")
        at, kvs = await self.etcd.range(self.keys.root)
        self.view.load(at, kvs)
        self._heard = time.monotonic()
        follow = asyncio.create_task(self._follow(), name="hive-fleet-scheduler-watch")
        try:
            while True:
                if self.lease() != lease:
                    raise Deposed("its lease changed")
                self._changed.clear()  # what changes during the pass wakes the next one
                await self._pass()
                # At rest nothing is due unless a clock runs: a node gone, a move under way.
                timed = bool(self.view.gone_since or self.view.moves or self._unplaced)
                changed = asyncio.ensure_future(self._changed.wait())
                await asyncio.wait(
                    {changed, follow},
                    timeout=PERIOD if timed else RESYNC,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                changed.cancel()
                if follow.done():
                    follow.result()  # raises why it ended
                    return
                await self._check_watch()
                await asyncio.sleep(GATHER)
        finally:
            follow.cancel()
            await asyncio.gather(follow, return_exceptions=True)

    async def _check_watch(self) -> None:
        """After :data:`RESYNC` seconds without a word from the watch, etcd's revision must not
        have moved past the view's (else start over: read everything again)."""
        if time.monotonic() - self._heard < RESYNC:
            return
        self._heard = time.monotonic()
        at, _ = await get(self.etcd, self.keys.scheduler)
        if at > self.view.revision:
            raise EtcdError(f"the watch said nothing for {RESYNC:g} s while etcd moved on")

    async def _follow(self) -> None:
        """The watch: every change under the prefix into the view. Ends (raising) when the watch
        ends or the election key is gone: the caller starts over."""
        keys = self.keys
        try:
            async for events in self.etcd.watch(keys.root, self.view.revision + 1):
                self._heard = time.monotonic()
                for event in events:
                    if event.key == keys.scheduler:
                        if event.kind == "delete":
                            raise Deposed("the election key was deleted")
                        continue
                    if event.kind == "delete":
                        self.view.delete(event.key, event.revision)
                    else:
                        self.view.put(event.key, event.value, event.revision)
                self._changed.set()
        except Compacted as exc:
            raise EtcdError(f"{exc}; reading everything again") from None

    async def _pass(self) -> None:
        started = time.monotonic()
        result: Plan = plan(self.view, self.config.reschedule_after)
        if result.steps:
            transactions, writes = await self._carry_out(result.steps)
            placed = sum(1 for s in result.steps if s.quiet)
            for step in result.steps:
                if not step.quiet:
                    log.info("scheduler: %s", step.why)
            if placed:
                log.info(
                    "scheduler: placed %d replica(s) in %.2f s: %d write(s) in %d transaction(s)",
                    placed,
                    time.monotonic() - started,
                    writes,
                    transactions,
                )
        unplaced = set(result.unplaced)
        if unplaced - self._unplaced:
            log.warning(
                "scheduler: no node can take %s now (room, labels, backends, cordons)",
                ", ".join(sorted(unplaced)[:10]) + (" ..." if len(unplaced) > 10 else ""),
            )
        self._unplaced = unplaced
        self.passes += 1
        seconds = time.monotonic() - started
        for observe in self.on_pass:
            observe(seconds)

    async def _carry_out(self, steps: list[Step]) -> tuple[int, int]:
        """The steps in transactions of at most 100 writes (a step is never split), each fenced
        on the election; the view takes each write as etcd takes it."""
        batches: list[list[Step]] = [[]]
        size = 0
        for step in steps:
            if size + len(step.ops) > TXN_OPS and batches[-1]:
                batches.append([])
                size = 0
            batches[-1].append(step)
            size += len(step.ops)
        transactions = writes = 0
        for batch in batches:
            ops = [op for step in batch for op in step.ops]
            requests = [
                put_op(key, value) if kind == "put" and value is not None else delete_op(key)
                for kind, key, value in ops
            ]
            result = await txn(self.etcd, [self.fence], requests)
            if not result.succeeded:
                self.fenced_writes += 1
                raise Deposed("a write was refused: another hive holds the election")
            self.placements.update(step.kind for step in batch if step.kind)
            transactions += 1
            writes += len(ops)
            for kind, key, value in ops:
                if kind == "put" and value is not None:
                    self.view.put(key, value.encode(), result.revision)
                else:
                    self.view.delete(key, result.revision)
        self.transactions += transactions
        self.writes += writes
        return transactions, writes


def _now() -> str:
    return datetime.now(UTC).isoformat()


def scheduler_value(raw: bytes) -> dict[str, Any]:
    """The election key's value: ``node``, ``lease`` and ``since``."""
    data = json.loads(raw)
    return data if isinstance(data, dict) else {}

"""The supervisor: the request API over the set of worker lifecycles.

It turns requests (spawn, stop, restart, delete, heartbeat) into registry changes and
:class:`~hive.workers.run.WorkerRun` calls. House is kept by
:class:`~hive.workers.housekeeping.Housekeeping` (retention, log caps, orphans); taking back what
the previous hive left is :class:`~hive.workers.takeover.Takeover`'s. Each worker's process is
owned by its ``WorkerRun``; the policies live beside it as plain functions:
:mod:`hive.workers.launch` (argv and environment), :mod:`hive.workers.restart` (the back-off),
:mod:`hive.workers.probes` and :mod:`hive.workers.adoption`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Mapping
from typing import Any

from hive.config import Config
from hive.devices.placement import Placer
from hive.errors import Conflict, DuplicateWorker
from hive.host.containment import Containment, end_strays
from hive.host.process import Spawner
from hive.models import (
    DOWN_STATES,
    Entry,
    Heartbeat,
    SpawnRequest,
    State,
    Worker,
    process_key,
    successor_id,
)
from hive.state.journal import Journal, JournalError
from hive.state.memory_metrics import MemoryCollector
from hive.state.metrics import Metrics
from hive.state.registry import Registry, now
from hive.upstream.router_sync import RouterSync
from hive.workers.deps import Deps
from hive.workers.housekeeping import Housekeeping
from hive.workers.launch import forget_workdir
from hive.workers.logs import Logs
from hive.workers.memory import Memory
from hive.workers.ports import PortPool, ephemeral_overlap
from hive.workers.probes import Prober
from hive.workers.reservations import Reservations
from hive.workers.room import Room
from hive.workers.run import WorkerRun
from hive.workers.stall import LoopWatch

log = logging.getLogger("hive.supervisor")


class Supervisor:
    """Spawns, stops, restarts and deletes workers; one :class:`WorkerRun` per worker.

    About 430 lines: the request API, each request a few lines over the policies it calls
    (memory, placement, the journal);
    a spawn's crash-safe order (intent on disk, then the process, then the answer; the pid in
    the journal's next write) reads best in one place, and so do
    the two moves of a replacement that touch runs (a successor promoted to its worker's id, a
    worker restarted in place under a new request). The replacement itself lives in
    :mod:`hive.desired.reconcile`.
    """

    def __init__(
        self,
        config: Config,
        registry: Registry,
        placer: Placer,
        logs: Logs,
        api_url: str,
        metrics: Metrics | None = None,
        journal: Journal | None = None,
        upstream: RouterSync | None = None,
        *,
        containment: Containment,
    ) -> None:
        self.registry = registry
        self.logs = logs
        self.journal = journal
        ports = PortPool(*config.port_range)
        if (overlap := ephemeral_overlap(*config.port_range)) is not None:
            log.warning("%s", overlap)
        self.containment = containment
        self.memory = Memory(
            lambda: self._deps.config, registry, containment, placer.snapshot, config.state_path
        )
        reservations = Reservations(
            placer, ports, config.worker_host, self.memory.sizing, self.memory.budget
        )
        self._deps = Deps(
            config=config,
            registry=registry,
            spawner=Spawner(),
            logs=logs,
            prober=Prober(),
            reservations=reservations,
            api_url=api_url,
            containment=self.containment,
            journal=journal,
            upstream=upstream,
            metrics=metrics,
            watch=LoopWatch(metrics),
            memory=self.memory.watch,
        )
        if metrics is not None:
            metrics.prometheus.register(
                MemoryCollector(registry, self.memory.budget, self.memory.watch.cost)
            )
        self._runs: dict[str, WorkerRun] = {}
        self._room = Room(logs.directory, config.state_path)
        self.housekeeping = Housekeeping(self)

    @property
    def config(self) -> Config:
        return self._deps.config

    @config.setter
    def config(self, config: Config) -> None:
        """A reloaded configuration: new attempts and stops use it."""
        self._deps.config = config

    # -- life of the supervisor itself ---------------------------------------------------------

    @property
    def watch(self) -> LoopWatch:
        """How long hive's loop did not run (workers' deadlines leave it out)."""
        return self._deps.watch

    async def start(self) -> None:
        await self.memory.start()
        self._deps.watch.start()
        await self._deps.prober.start()
        self.logs.start_keeper()
        self.housekeeping.start()

    async def close(self, detach: bool | None = None, host_down: bool = False) -> None:
        """Stop every worker (``on_exit = "stop"``) or leave them running (``"detach"``).
        ``host_down``: the host is shutting down, which would end them anyway: stopped, and
        each that should run is due to start again at the next hive's start, as its restart
        policy says (as when the next hive found it gone: docs/deploy.md)."""
        self._deps.closing = True
        if detach is None:
            detach = self.config.on_exit == "detach" and not host_down
        await self.housekeeping.close()
        runs = [run for run in self._runs.values() if run.active]
        for run in runs:
            if detach:
                run.detach()
            else:
                run.request_stop(None)
        await asyncio.gather(*(run.task for run in runs if run.task), return_exceptions=True)
        if not detach:
            await self._end_leftovers()
        if host_down:
            self._due_at_boot([run.id for run in runs])
        # Detached too: the empty worker cgroups go, and hive's own once nothing is left in it
        # (a worker that runs on keeps its cgroup, and so the base stays).
        self.containment.close()
        await self._deps.prober.close()
        await self.logs.stop_keeper()
        self._deps.spawner.close()
        self._deps.watch.close()
        await self.memory.close()

    def _due_at_boot(self, ids: list[str]) -> None:
        """The host shuts down: each worker just stopped that should run is due to start
        again, which the next hive does at its start (:func:`hive.workers.adoption.plan`)."""
        for worker_id in ids:
            if worker_id not in self.registry:
                continue
            record = self.registry.get(worker_id)
            down = record.state in DOWN_STATES and record.desired == "running"
            if down and record.restart != "no":
                self.registry.restart_due(worker_id, now())

    async def _end_leftovers(self, timeout: float = 10.0) -> None:
        """``on_exit = "stop"``: nothing of hive's is left running, whatever failed on the way
        (a stop that raised, a process hive lost track of). What the containment still holds
        is killed; while ``/proc`` cannot be read (hive out of descriptors) it is tried again."""
        deadline = time.monotonic() + timeout
        told: set[str] = set()
        why = ""
        while time.monotonic() < deadline:
            try:
                left = await asyncio.to_thread(self._kill_leftovers)
            except OSError as exc:
                why = f": {exc.strerror or exc}"
            else:
                if not left:
                    return
                why = f": {', '.join(sorted(left))}"
                if new := set(left) - told:
                    log.warning("shut-down: killed what was left of worker(s) %s", sorted(new))
                    told |= new
            await asyncio.sleep(0.1)
        log.error("shut-down: worker processes may be left running%s", why)

    def _kill_leftovers(self) -> set[str]:
        """One pass, in a thread: the workers the containment still holds processes of, killed."""
        left = {w: pids for w, pids in self.containment.inventory().items() if pids}
        for worker_id, pids in left.items():
            end_strays(self.containment, worker_id, pids)
        return set(left)

    # -- runs --------------------------------------------------------------------------------

    def new_run(self, worker_id: str) -> WorkerRun:
        """A lifecycle for a record in the registry, kept until the record is forgotten (for
        :class:`~hive.workers.takeover.Takeover`, which restores records at start)."""
        run = WorkerRun(worker_id, self._deps)
        self._runs[worker_id] = run
        return run

    # -- requests ------------------------------------------------------------------------------

    def normalized(self, spec: SpawnRequest) -> SpawnRequest:
        """The request as hive keeps it: backend and restart policy filled in from the
        configuration's defaults (so that two requests meaning the same compare equal)."""
        return spec.model_copy(
            update={
                "backend": self.config.backend_name(spec),
                "restart": spec.restart or self.config.default_restart,
            }
        )

    async def spawn(
        self,
        spec: SpawnRequest,
        *,
        declared: str | None = None,
        successor: tuple[str, int] | None = None,
    ) -> Worker:
        """Place, reserve and start a new worker; returns its record once it has a pid.

        ``declared`` says where it is declared; ``successor`` = (id it replaces, generation)
        starts it as that worker's successor, under the id ``<id>~<generation>``.
        """
        self._refuse_if_closing()
        spec = self.normalized(spec)
        backend_name = self.config.backend_name(spec)
        backend = self.config.backend(backend_name)
        worker_id = spec.id or self._new_id(spec.model)
        restart = spec.restart or self.config.default_restart
        spec = spec.model_copy(update={"id": worker_id})
        record_id, generation, replacing = worker_id, 1, None
        if successor is not None:
            replacing, generation = successor
            record_id = successor_id(replacing, generation)
        reservations = self._deps.reservations
        await self.memory.prepare(spec, backend_name, backend)

        def build(entries: Mapping[str, Entry]) -> dict[str, Any]:
            if record_id in entries or (successor is None and _successor_of(worker_id, entries)):
                raise DuplicateWorker(worker_id, field="id")
            return {
                "id": record_id,
                "generation": generation,
                "replacing": replacing,
                "declared": declared,
                "model": spec.model,
                "backend": backend_name,
                "labels": spec.labels,
                "restart": restart,
                "desired": "running",
                "containment": self.containment.kind,
                "role": spec.role,
                "priority": spec.priority,
                "cost": spec.cost,
                **reservations.reserve(spec, backend_name, backend, entries, record_id, None),
            }

        self._room.check()
        self.registry.add(spec, secrets.token_urlsafe(24), build)
        # The intent (id, spec, port, devices, token, attempt) reaches the disk before the
        # process starts; the pid follows in the journal's next write, which the answer does
        # not wait for. A hive killed in between finds the process by its attempt's tag
        # (adoption adopts a live record without a pid by its leader), so the journal and what
        # the containment finds running still say exactly what to adopt and what to end: one
        # fsync a spawn, shared by the spawns in flight.
        try:
            await self._persist()
        except JournalError:
            self.registry.forget_unstarted(record_id)
            raise
        run = WorkerRun(record_id, self._deps)
        await self._start(run)
        return self.registry.get(record_id)

    async def _start(self, run: WorkerRun) -> None:
        self._runs[run.id] = run
        self.logs.started(run.id)
        await run.start()

    def check_backend(self, spec: SpawnRequest) -> None:
        """Refuse a request that names a backend hive does not have (UnknownBackend)."""
        self.config.backend(self.config.backend_name(spec))

    async def persist(self) -> None:
        """Wait until the journal holds every change so far."""
        await self._persist()

    async def _persist(self) -> None:
        """Answer only once the journal holds the change: a hive crash right after a reply
        must not forget a worker it just started, or restart one it was told to stop."""
        if self.journal is not None:
            await self.journal.flush()

    async def stop(
        self, worker_id: str, timeout: float | None = None, wait: bool = False
    ) -> Worker:
        """Stop gracefully; the record stays, ``stopped``. Idempotent."""
        record = self.registry.set_desired(worker_id, "stopped")
        run = self._runs.get(worker_id)
        if run is not None and run.active and run.task is not None:
            run.request_stop(timeout)
            if wait:
                await asyncio.shield(run.task)
                record = self.registry.get(worker_id)
        else:
            record = self._settle_unwatched(worker_id) or record
        await self._persist_if_room(f"worker {worker_id} stopped")
        return record

    async def _persist_if_room(self, what: str) -> None:
        """:meth:`_persist` for a request that frees rather than takes (a stop, a delete): it
        is carried out and answered even when the journal cannot be written (state_dir full),
        so that the operator can always remove the culprit; the journal writes again on its
        own once there is room."""
        try:
            await self._persist()
        except JournalError as exc:
            log.warning("%s; the journal does not hold it yet: %s", what, exc)

    def _settle_unwatched(self, worker_id: str) -> Worker | None:
        """A record in a live state with no lifecycle watching a process cannot be: end
        whatever of the worker runs and record it stopped, so it can always be removed."""
        run = self._runs.get(worker_id)
        if run is not None and run.active:
            return None
        key = process_key(self.registry.get(worker_id))
        end_strays(self.containment, key, self.containment.members(key))
        record = self.registry.attempt_ended(
            worker_id, State.STOPPED, exit_code=None, error="no process was being watched"
        )
        self.registry.memory_released(worker_id)  # what ran is ended: nothing waits for it
        return record

    async def restart(self, worker_id: str) -> Worker:
        """Stop the worker if it runs, then start it again (the same id, port when free)."""
        self._refuse_if_closing()
        await self.stop(worker_id, wait=True)
        old = self._runs.get(worker_id)
        if old is not None:
            await old.swept()  # what the last attempt left is gone before the next one starts
        if old is not None and old.active:
            raise Conflict(f"worker {worker_id!r} is changing state; try again")
        run = WorkerRun(worker_id, self._deps)
        run.begin_attempt(restarts_delta=1)
        await self._start(run)
        await self._persist()
        return self.registry.get(worker_id)

    async def start_again(self, worker_id: str) -> Worker:
        """Start a stopped or failed worker once more, as its next attempt (a declared worker
        that should run: :func:`hive.desired.declared.needs_start`). Nothing happens to one that
        runs, or whose restart is due or whose lifecycle is still deciding."""
        self._refuse_if_closing()
        record = self.registry.get(worker_id)
        if record.state not in DOWN_STATES or record.next_restart_at is not None:
            return record
        old = self._runs.get(worker_id)
        if old is not None:
            await old.swept()
            if old.active:
                return self.registry.get(worker_id)
        run = WorkerRun(worker_id, self._deps)
        run.begin_attempt(restarts_delta=1)
        await self._start(run)
        await self._persist()
        return self.registry.get(worker_id)

    async def delete(self, worker_id: str, keep_log: bool = False) -> Worker:
        """Stop the worker if it runs, then forget it and (unless ``keep_log``) its log."""
        await self.stop(worker_id, wait=True)
        self._settle_unwatched(worker_id)
        record = self.registry.remove(worker_id)
        self.containment.release(process_key(record))
        self._runs.pop(worker_id, None)
        if not keep_log:  # kept when a successor writes on in it
            await self.logs.discard(worker_id)
            await asyncio.to_thread(forget_workdir, self.config, worker_id)
        await self._persist_if_room(f"worker {worker_id} removed")
        return record

    async def promote(self, successor: str, worker_id: str) -> Worker:
        """The successor takes the id of the worker it replaced (which is forgotten by now);
        its process goes on as it is."""
        record = self.registry.promote(successor, worker_id)
        run = self._runs.pop(successor, None)
        if run is not None:
            run.id = worker_id
            self._runs[worker_id] = run
        await self._persist()
        return record

    async def respec(self, worker_id: str, spec: SpawnRequest) -> Worker:
        """Start a worker whose process is gone again, with a new request, as its next
        generation (a replacement in place). The old process must have ended."""
        self._refuse_if_closing()
        old = self._runs.get(worker_id)
        if old is not None:
            await old.swept()
        if old is not None and old.active:
            raise Conflict(f"worker {worker_id!r} is changing state; try again")
        spec = self.normalized(spec).model_copy(update={"id": worker_id})
        self.check_backend(spec)
        record = self.registry.get(worker_id)
        self.registry.respec(worker_id, spec, record.generation + 1)
        run = WorkerRun(worker_id, self._deps)
        run.begin_attempt(restarts_delta=-record.restarts)
        await self._start(run)
        await self._persist()
        return self.registry.get(worker_id)

    def heartbeat(self, worker_id: str, beat: Heartbeat) -> Worker:
        """Take a worker's report of itself: ready or busy, and how many requests in flight."""
        worker_id = self.registry.resolve(worker_id) or worker_id  # a successor's own key
        record = self.registry.get(worker_id)
        if record.state in DOWN_STATES:
            raise Conflict(f"worker {worker_id!r} is {record.state}", worker=record)
        run = self._runs.get(worker_id)
        if run is None or run.process is None or not run.process.running:
            # Never ready on the word of a process hive is not watching.
            raise Conflict(f"worker {worker_id!r} has no process hive watches", worker=record)
        record = self.registry.heartbeat(worker_id, State(beat.state), beat.in_flight)
        run.heard()
        return record

    @property
    def closing(self) -> bool:
        """True once hive has begun shutting down."""
        return self._deps.closing

    def _refuse_if_closing(self) -> None:
        if self._deps.closing:
            raise Conflict("hive is shutting down")

    def log_ended(self, worker_id: str) -> bool:
        """Nothing more will be written to the worker's log: hive is closing, the worker is
        forgotten, or its process is gone with no restart coming."""
        if self._deps.closing or worker_id not in self.registry:
            return True
        record = self.registry.get(worker_id)
        return record.state in DOWN_STATES and self.is_settled(worker_id)

    def is_settled(self, worker_id: str) -> bool:
        """True when the worker's process is gone and no restart is coming."""
        run = self._runs.get(worker_id)
        return run is None or not run.active

    def leader_pids(self) -> list[int]:
        """The pids of the workers' leaders that hive started and that still run."""
        return [
            run.process.pid
            for run in self._runs.values()
            if run.process is not None and run.process.child and run.process.running
        ]

    def active_ids(self) -> list[str]:
        """The workers whose process runs or whose restart is coming."""
        return [worker_id for worker_id, run in self._runs.items() if run.active]

    def forget_run(self, worker_id: str) -> None:
        """The record is forgotten: so is its lifecycle."""
        self._runs.pop(worker_id, None)

    # -- naming ----------------------------------------------------------------------------------

    def _new_id(self, model: str) -> str:
        stem = "".join(c if c.isalnum() else "-" for c in model.rsplit("/", 1)[-1].lower())
        stem = stem.strip("-")[:40] or "worker"
        while True:
            worker_id = f"{stem}-{secrets.token_hex(3)}"
            if worker_id not in self.registry:
                return worker_id


def _successor_of(worker_id: str, entries: Mapping[str, Entry]) -> bool:
    """True while a successor of ``worker_id`` exists (its id would be taken when it promotes)."""
    prefix = f"{worker_id}~"
    return any(key.startswith(prefix) for key in entries)

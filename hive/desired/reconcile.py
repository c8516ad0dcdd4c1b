"""Changing what runs without a gap: replacing a worker, and applying a declared set.

A replacement starts a *successor* beside the worker (its id ``<id>~<generation>`` until it
takes over), waits until it is ready and every router has registered it, then takes the old
worker out of the routers, drains and stops it, and gives the successor the worker's id. If
the successor fails, or the routers do not take it in time, it is removed and the old worker
goes on untouched. ``in_place`` stops the old worker first (a gap) for a successor that needs
what the old one holds. Applying a declared set is a :func:`hive.desired.declared.plan` carried out:
creates, replacements, and removals of what ``prune`` picks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from hive.config import Config
from hive.desired.declared import (
    APPLY_SOURCE,
    CONFIG_SOURCE,
    DeclarationError,
    Declared,
    check_backends,
    check_complete,
    needs_start,
    plan,
    read_declared,
    workers_dir,
)
from hive.errors import Conflict, HiveError, InvalidRequest, NoCapacity, PortTaken
from hive.models import DOWN_STATES, LIVE_STATES, Entry, PlanItem, SpawnRequest, State, Worker
from hive.state.registry import Registry
from hive.workers.supervisor import Supervisor

log = logging.getLogger("hive.reconcile")

#: How long a replacement carried on after a hive restart waits for its successor (its own
#: ``startup_timeout`` fails it sooner).
RESUME_TIMEOUT = 1800.0


class Reconciler:
    """Replacements (one at a time per worker) and applies, over the supervisor."""

    def __init__(self, supervisor: Supervisor, registry: Registry) -> None:
        self.supervisor = supervisor
        self.registry = registry
        self._replacing: set[str] = set()
        self._applying = asyncio.Lock()  # one apply at a time: config, API and etcd take turns

    # -- replace ---------------------------------------------------------------------------------

    async def replace(
        self, worker_id: str, spec: SpawnRequest, in_place: bool = False, timeout: float = 1800.0
    ) -> Worker:
        """Put a worker running ``spec`` in the place of ``worker_id``; returns its record."""
        registry, supervisor = self.registry, self.supervisor
        old = registry.get(worker_id)
        if old.replacing is not None:
            raise InvalidRequest(
                f"id: {worker_id!r} is a successor; replace {old.replacing!r} instead"
            )
        if worker_id in self._replacing:
            raise Conflict(f"worker {worker_id!r} is being replaced already", worker=old)
        spec = supervisor.normalized(spec).model_copy(update={"id": worker_id})
        supervisor.check_backend(spec)
        self._replacing.add(worker_id)
        try:
            if old.state in DOWN_STATES and supervisor.is_settled(worker_id):
                return await supervisor.respec(worker_id, spec)  # nothing runs to overlap
            if in_place:
                registry.replacement_progress(worker_id, "in place: stopping the old process")
                await supervisor.stop(worker_id, wait=True)
                return await supervisor.respec(worker_id, spec)
            return await self._beside(old, spec, timeout)
        finally:
            self._replacing.discard(worker_id)
            registry.replacement_progress(worker_id, None)

    async def _beside(self, old: Worker, spec: SpawnRequest, timeout: float) -> Worker:
        supervisor = self.supervisor
        worker_id = old.id
        deadline = time.monotonic() + timeout
        try:
            successor = await supervisor.spawn(
                spec, declared=old.declared, successor=(worker_id, old.generation + 1)
            )
        except NoCapacity as exc:  # what the old worker holds (cores, GPUs, ports) is short
            raise NoCapacity(
                f"{exc.message}: the successor does not fit beside {worker_id!r}; replace it in "
                "place (in_place=true, hive replace --in-place) to stop the old one first",
                worker=old,
            ) from None
        except PortTaken as exc:  # by its class: an id clash stays as it is
            raise Conflict(
                f"{exc.message}: the successor cannot have {worker_id!r}'s port while it runs; "
                "leave port out, or replace in place (in_place=true, hive replace --in-place)",
                worker=old,
            ) from None
        log.info("replacing worker %s: successor %s started", worker_id, successor.id)
        return await self._take_over(worker_id, successor.id, spec.register_, deadline, timeout)

    async def _take_over(
        self, worker_id: str, new_id: str, register: bool, deadline: float, timeout: float
    ) -> Worker:
        """Once the successor ``new_id`` is ready and registered, drain and stop the worker and
        give the successor its id; abandon the successor when it does not get there."""
        registry, supervisor = self.registry, self.supervisor
        registry.replacement_progress(worker_id, f"{new_id} starting")
        record = await registry.wait_until(
            new_id, lambda w: w.state != State.STARTING, _left(deadline)
        )
        if record.state == State.STARTING:
            return await self._abandon(worker_id, new_id, f"was not ready within {timeout:g}s")
        if record.state not in LIVE_STATES:
            return await self._abandon(worker_id, new_id, f"{record.state}: {record.error}")
        routers = [r.url for r in supervisor.config.routers] if register else []
        if routers:
            registry.replacement_progress(worker_id, f"{new_id} ready, registering")
            # Every router's status is told as a change of the record: wait for it.
            record = await registry.wait_until(
                new_id,
                lambda w: (
                    w.state not in LIVE_STATES
                    or all(w.routers.get(url) == "registered" for url in routers)
                ),
                _left(deadline),
            )
            missing = [url for url in routers if record.routers.get(url) != "registered"]
            if record.state not in LIVE_STATES:
                return await self._abandon(worker_id, new_id, f"{record.state}: {record.error}")
            if missing:
                why = ", ".join(f"{url}: {record.routers.get(url, 'not sent')}" for url in missing)
                return await self._abandon(worker_id, new_id, f"was not registered ({why})")
        if worker_id not in registry or registry.get(worker_id).desired == "stopped":
            return await self._abandon(worker_id, new_id, "is not wanted: the worker was stopped")
        registry.replacement_progress(worker_id, f"{new_id} serving; draining the old process")
        await supervisor.delete(worker_id, keep_log=True)  # out of the routers, drained, stopped
        record = await supervisor.promote(new_id, worker_id)
        log.info("worker %s replaced: generation %d serves", worker_id, record.generation)
        return record

    async def _abandon(self, worker_id: str, successor: str, why: str) -> Worker:
        log.warning("replacement of %s abandoned: the successor %s %s", worker_id, successor, why)
        if successor in self.registry:
            await self.supervisor.delete(successor)
        record = self.registry.get(worker_id) if worker_id in self.registry else None
        raise Conflict(
            f"replacement of {worker_id!r} abandoned: its successor {why}; "
            f"{worker_id!r} goes on unchanged",
            worker=record,
        )

    async def settle_interrupted(self) -> None:
        """After a hive restart: finish the replacements the last hive left half-way, so that
        one worker serves under each id and nothing is left over. Each is settled by
        :func:`settle_decision`; those that wait for their successor wait together."""
        settling = [
            self._settle(record.replacing, record.id)
            for record in self.registry.list()
            if record.replacing is not None
        ]
        for record in self.registry.list():  # the progress of replacements that are gone
            if record.replacement is not None and not _has_successor(record.id, self.registry):
                self.registry.replacement_progress(record.id, None)
        await asyncio.gather(*settling)

    async def _settle(self, worker_id: str, successor: str) -> None:
        registry, supervisor = self.registry, self.supervisor
        try:
            new = registry.get(successor)
            old = registry.get(worker_id) if worker_id in registry else None
            decision = settle_decision(new, old)
            if decision == "abandon":
                log.warning(
                    "replacement of %s was cut short by a hive restart before its successor "
                    "served: removing %s; %s goes on",
                    worker_id,
                    successor,
                    worker_id,
                )
                await supervisor.delete(successor)
                return
            if decision == "resume":
                log.warning(
                    "replacement of %s was cut short by a hive restart: carrying it on with %s",
                    worker_id,
                    successor,
                )
                self._replacing.add(worker_id)
                try:
                    register = registry.entry(successor).spec.register_
                    deadline = time.monotonic() + RESUME_TIMEOUT
                    await self._take_over(worker_id, successor, register, deadline, RESUME_TIMEOUT)
                finally:
                    self._replacing.discard(worker_id)
                    registry.replacement_progress(worker_id, None)
                return
            if old is not None:
                await supervisor.delete(worker_id, keep_log=True)
            await supervisor.promote(successor, worker_id)
            log.warning(
                "replacement of %s was cut short by a hive restart: %s took over",
                worker_id,
                successor,
            )
        except Conflict as exc:  # abandoned while it was carried on: the old worker goes on
            log.warning("%s", exc.message)
        except HiveError as exc:
            log.error("cannot settle the replacement of %s: %s", worker_id, exc.message)

    async def start_applied(self) -> None:
        """At start: the workers ``hive apply`` declared (their set is not read again, as hive's
        files and etcd's are) that are down though wanted running are started again, as an
        apply of their set would (:func:`~hive.desired.declared.needs_start`)."""
        for record in self.registry.list():
            if (record.declared or "").startswith(APPLY_SOURCE) and needs_start(record):
                try:
                    await self.supervisor.start_again(record.id)
                    log.info("declared worker %s (%s): start: done", record.id, record.declared)
                except HiveError as exc:
                    log.warning("declared worker %s: start: %s", record.id, exc.message)

    # -- apply -----------------------------------------------------------------------------------

    def plan(
        self, declared: Iterable[Declared], prune: Callable[[Entry], bool] | None = None
    ) -> list[PlanItem]:
        with self.registry.locked() as entries:
            return plan(declared, dict(entries), self.supervisor.normalized, prune)

    async def apply(
        self,
        declared: list[Declared],
        prune: Callable[[Entry], bool] | None = None,
        dry_run: bool = False,
        guard: str | None = None,
    ) -> list[PlanItem]:
        """Make what runs match ``declared``; each item's ``result`` says how it went.

        ``guard``: the source of this set (``apply:<source>``); a plan that would prune every
        worker, or a worker declared anywhere else or spawned through the API, is refused
        whole (an InvalidRequest). None: no such check (a set that prunes only its own
        source, or ``force``)."""
        check_backends(declared, self.supervisor.config)
        if dry_run:
            return self.plan(declared, prune)
        async with self._applying:
            items = self.plan(declared, prune)
            if guard is not None:
                self._check_prune(items, guard)
            by_id = {item.spec.id: item for item in declared}
            results = await asyncio.gather(*(self._carry_out(i, by_id.get(i.id)) for i in items))
        return [
            item.model_copy(update={"result": result})
            for item, result in zip(items, results, strict=True)
        ]

    def _check_prune(self, items: list[PlanItem], source: str) -> None:
        pruned = [item.id for item in items if item.action == "prune"]
        if not pruned:
            return
        records = {r.id: r for r in self.registry.list() if "~" not in r.id}
        foreign = [i for i in pruned if i in records and records[i].declared != source]
        if len(pruned) < len(records) and not foreign:
            return
        every = len(pruned) >= len(records)
        shown = ", ".join(
            f"{i} ({_source(records[i].declared)})" for i in (pruned if every else foreign)
        )
        why = (
            f"would remove every worker on this host ({shown})"
            if every
            else f"would remove workers that this set ({source}) did not declare: {shown}"
        )
        raise InvalidRequest(
            f"prune: {why}; nothing was done: send force: true (hive apply --prune --force) "
            "to remove them"
        )

    async def apply_set(self, declared: list[Declared], source: str, what: str) -> list[PlanItem]:
        """Apply a set that owns every worker declared from ``source`` (a prefix of their
        ``declared``: hive's files, or etcd): what it no longer names is pruned, nothing else
        is. Each change and a summary go to the log, as ``what``."""
        items = await self.apply(
            declared, prune=lambda entry: (entry.record.declared or "").startswith(source)
        )
        for item in items:
            if item.action != "unchanged" or item.result != "done":
                log.info("%s %s: %s: %s", what, item.id, item.action, item.result)
        log.info("%s: %d declared, %s", what, len(declared), _summary(items))
        return items

    async def _carry_out(self, item: PlanItem, declared: Declared | None) -> str:
        supervisor = self.supervisor
        try:
            if item.action == "create" and declared is not None:
                await supervisor.spawn(declared.spec, declared=declared.source)
            elif item.action == "replace" and declared is not None:
                self.registry.set_declared(item.id, declared.source)
                await self.replace(item.id, declared.spec)
            elif item.action in ("unchanged", "start") and declared is not None:
                if self.registry.get(item.id).declared != declared.source:
                    self.registry.set_declared(item.id, declared.source)
                    await supervisor.persist()
                if item.action == "start":
                    await supervisor.start_again(item.id)
            elif item.action == "prune":
                await supervisor.delete(item.id)
        except HiveError as exc:
            log.warning("apply: worker %s (%s): %s", item.id, item.action, exc.message)
            return exc.message
        return "done"


def settle_decision(successor: Worker, old: Worker | None) -> str:
    """What a new hive does with a successor the last one left before it took over:

    - ``take over`` at once when the old worker is gone (forgotten, or its process ended: it
      was being drained and stopped, or died while hive was down) and the successor runs, or
      had become ready before it died (its restart policy applies to it then);
    - ``take over`` too when both run, the successor ready and the old worker being stopped
      (``desired: stopped``): the replacement had got to draining it;
    - ``resume`` when both run otherwise: the replacement goes on where it was (the successor
      ready and registered, then the old worker drained and stopped);
    - ``abandon`` otherwise: the successor never served and is gone, so the old worker goes on
      (its restart policy applies). The adoption (:mod:`hive.workers.adoption`) does not
      restart an old worker whose successor will take over."""
    if old is None:
        return "take over"
    successor_live, old_live = successor.state in LIVE_STATES, old.state in LIVE_STATES
    if successor_live and old_live:
        draining = successor.state in (State.READY, State.BUSY) and old.desired == "stopped"
        return "take over" if draining else "resume"
    if not old_live and (successor_live or successor.ready_at is not None):
        return "take over"
    return "abandon"


def _source(declared: str | None) -> str:
    return declared if declared is not None else "spawned through the API"


def _has_successor(worker_id: str, registry: Registry) -> bool:
    return any(record.replacing == worker_id for record in registry.list())


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _summary(items: list[PlanItem]) -> str:
    counts: dict[str, int] = {}
    for item in items:
        key = item.action if item.result == "done" else f"{item.action} failed"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {key}" for key, n in sorted(counts.items())) or "nothing to do"


class DeclaredFiles:
    """hive's own files of declared workers (``[[workers]]``, ``workers_dir``), applied in the
    background at start and after each reload: one pass at a time, and a reload during a pass
    runs another after it. A set that does not load is refused whole, and ``refused`` hears
    why in a line (the daemon puts it in systemd's status line). ``checked`` hears each pass's
    verdict before anything is applied: None (whole and valid, or nothing declared), or the
    refusal whole (``hive status`` shows it)."""

    def __init__(
        self,
        reconciler: Reconciler,
        config: Callable[[], Config],
        config_path: Path | None,
        refused: Callable[[str], None],
        checked: Callable[[str | None], None] = lambda verdict: None,
    ) -> None:
        self.reconciler = reconciler
        self.config = config
        self.config_path = config_path
        self.refused = refused
        self.checked = checked
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def request(self, first: bool = False) -> None:
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.create_task(self._loop(first), name="hive-declared")

    async def close(self) -> None:
        """Stop a pass under way (what it left half-way, the next hive settles)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self, first: bool) -> None:
        if first:
            await self.reconciler.settle_interrupted()
            await self.reconciler.start_applied()
        while True:
            self._again = False
            await self._once()
            if not self._again:
                return

    async def _once(self) -> None:
        config = self.config()
        try:
            # Reads files (bounded: declared.MAX_FILE_BYTES each): in a thread.
            declared = await asyncio.to_thread(read_declared, config, self.config_path)
            held = [
                r
                for r in self.reconciler.registry.list()
                if (r.declared or "").startswith(CONFIG_SOURCE)
            ]
            if not declared and not held:
                self.checked(None)
                return  # nothing declared, now or before: nothing to do
            # Only a complete set changes anything: not one read while its files were rewritten.
            directory = workers_dir(config, self.config_path)
            await asyncio.to_thread(check_complete, declared, held, directory)
            check_backends(declared, config)  # as apply_set does, before saying it is whole
            self.checked(None)
            await self.reconciler.apply_set(declared, CONFIG_SOURCE, "declared workers")
        except DeclarationError as exc:
            log.error("declared workers refused, nothing of them applied: %s", exc)
            self.refused(f"declared workers refused: {str(exc).splitlines()[0]}")
            self.checked(f"declared workers refused, nothing of them applied: {exc}")

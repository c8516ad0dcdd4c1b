"""The registry: the single source of truth about hive's workers.

:class:`Registry` is :class:`~hive.state.records.Records` (the storage, its lock and the ordered
delivery of every change) with the named operations, one for each thing that happens to a
worker, so that every write of a record is found here. Each operation that changed something is
told to subscribers (the state, or a field other than the hot ones); subscribers run on the
event loop, in order.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from hive.models import (
    DOWN_STATES,
    LIVE_STATES,
    Desired,
    Entry,
    SpawnRequest,
    StartupPhase,
    State,
    Worker,
)
from hive.state.records import (
    _ENDED,
    Builder,
    Change,
    DuplicateWorker,
    Figures,
    IllegalTransition,
    Records,
    Subscriber,
    UnknownWorker,
    now,
)

__all__ = [
    "Builder",
    "Change",
    "DuplicateWorker",
    "Entry",
    "Figures",
    "IllegalTransition",
    "Records",
    "Registry",
    "Subscriber",
    "UnknownWorker",
    "now",
]


class Registry(Records):
    """The registry: :class:`Records` and the named operations, one for each thing that
    happens to a worker, so that every write of a record is found here under the one lock.
    """

    # -- named operations: what actually happens to a worker -----------------------------------

    def begin_attempt(self, worker_id: str, reserve: Builder, restarts: int) -> Worker:
        """``stopped``/``failed`` -> ``starting``: a new attempt, its port and devices reserved
        anew by ``reserve`` under the lock, everything the last attempt left cleared."""
        return self.transition(
            worker_id,
            State.STARTING,
            expect=DOWN_STATES,
            build=reserve,
            restarts=restarts,
            desired="running",
            error=None,
            exit_code=None,
            next_restart_at=None,
            ready_at=None,
            stopped_at=None,
            last_heartbeat_at=None,
            startup=[],
            **_ENDED,
        )

    def attempt_started(self, worker_id: str, pid: int) -> Worker:
        """The attempt's process runs, with this pid."""
        return self.update(worker_id, pid=pid, started_at=now())

    def became_ready(self, worker_id: str) -> Worker | None:
        """``starting`` -> ``ready`` (a probe answered 2xx); None if it was not starting.
        What held it up (:meth:`not_ready_because`) no longer holds."""
        with self._lock:
            if self._entry(worker_id).record.state != State.STARTING:
                return None
            return self.transition(worker_id, State.READY, ready_at=now(), error=None)

    def startup_phases(self, worker_id: str, phases: list[StartupPhase]) -> Worker | None:
        """Where the current attempt's start-up went so far; None if the worker is gone."""
        with self._lock:
            if worker_id not in self._entries:
                return None
            record = self._entries[worker_id].record
            return self.update(worker_id, startup=_registered(record, record.routers, phases))

    def not_ready_because(self, worker_id: str, error: str) -> Worker | None:
        """A ``starting`` worker's probe passed, but it is not ready: ``error`` says why
        (another process holds its port). None if it was not starting."""
        with self._lock:
            if self._entry(worker_id).record.state != State.STARTING:
                return None
            return self.update(worker_id, error=error)

    def attempt_ended(
        self, worker_id: str, to: State, *, exit_code: int | None, error: str | None
    ) -> Worker | None:
        """The attempt's process is gone: ``stopped`` or ``failed``, with how it ended.

        None (and nothing changes) when the record was not in a live state any more.
        """
        if to not in DOWN_STATES:
            raise ValueError(f"an attempt ends in stopped or failed, not {to}")
        with self._lock:
            if self._entry(worker_id).record.state not in LIVE_STATES:
                return None
            return self.transition(
                worker_id, to, exit_code=exit_code, error=error, stopped_at=now(), **_ENDED
            )

    def exit_code_known(self, worker_id: str, exit_code: int | None) -> Worker:
        """The exit code of a process that was recorded as failed before it was reaped."""
        return self.update(worker_id, exit_code=exit_code)

    def heartbeat(self, worker_id: str, state: State, in_flight: int | None) -> Worker:
        """A worker's report of itself: ``starting`` becomes ready, then ready/busy as said."""
        fields: dict[str, Any] = {"last_heartbeat_at": now(), "in_flight": in_flight}
        with self._lock:
            record = self._entry(worker_id).record
            if record.state == State.STARTING:
                ready = {"ready_at": now(), "error": None, **fields}
                record = self.transition(worker_id, State.READY, **ready)
            if record.state != state:
                return self.transition(worker_id, state, **fields)
            return self.update(worker_id, **fields)

    def engine_load(self, worker_id: str, in_flight: int) -> Worker | None:
        """The engine's own count of requests it holds: ``busy`` while above zero, ``ready``
        at zero. Only a ``ready`` or ``busy`` worker changes; None (nothing changes) otherwise.
        Subscribers hear of a change of state, not of each new count."""
        with self._lock:
            record = self._entry(worker_id).record
            if record.state not in (State.READY, State.BUSY):
                return None
            state = State.BUSY if in_flight > 0 else State.READY
            if record.state != state:
                return self.transition(worker_id, state, in_flight=in_flight)
            if record.in_flight != in_flight:
                return self.update(worker_id, in_flight=in_flight)
            return record

    def set_desired(self, worker_id: str, desired: Desired) -> Worker:
        """What the operator wants: ``stopped`` also cancels a restart that was due."""
        with self._lock:
            record = self._entry(worker_id).record
            if record.desired == desired:
                return record
            if desired == "stopped":
                return self.update(worker_id, desired=desired, next_restart_at=None)
            return self.update(worker_id, desired=desired)

    def restart_due(self, worker_id: str, at: datetime | None) -> Worker:
        """The next attempt is due at ``at`` (None: none is scheduled any more)."""
        return self.update(worker_id, next_restart_at=at)

    def gave_up(self, worker_id: str, error: str) -> Worker:
        """The restart policy will not try again; ``error`` says why."""
        return self.update(worker_id, error=error)

    def restart_refused(self, worker_id: str, error: str) -> Worker:
        """A due restart could not reserve what it needs; the policy tries again later."""
        return self.update(worker_id, error=error)

    def set_draining(self, worker_id: str, draining: bool) -> Worker:
        return self.update(worker_id, draining=draining)

    def set_declared(self, worker_id: str, declared: str | None) -> Worker:
        """Where the worker is declared now (None: nowhere any more)."""
        return self.update(worker_id, declared=declared)

    def replacement_progress(self, worker_id: str, progress: str | None) -> Worker | None:
        """How far the replacement of ``worker_id`` is; None if the worker is gone."""
        with self._lock:
            if worker_id not in self._entries:
                return None
            return self.update(worker_id, replacement=progress)

    def log_generation(self, worker_id: str) -> int | None:
        """The generation that hive's own lines in ``worker_id``'s log name: a log is shared by
        a worker and its successor while one replaces the other, so there each line says which
        (and after, generation 2 and on); None for a worker never replaced, or one gone."""
        with self._lock:
            entry = self._entries.get(worker_id)
            if entry is None:
                return None
            record = entry.record
            return record.generation if record.generation > 1 or record.replacement else None

    def respec(self, worker_id: str, spec: SpawnRequest, generation: int) -> Worker:
        """A worker whose process is gone takes a new request (an in-place replacement): the
        next attempt runs it, as generation ``generation``."""
        with self._lock:
            entry = self._entry(worker_id)
            if entry.record.state not in DOWN_STATES:
                raise IllegalTransition(worker_id, entry.record.state, State.STARTING)
            record = entry.record.model_copy(
                update={
                    "model": spec.model,
                    "backend": spec.backend or entry.record.backend,
                    "labels": spec.labels,
                    "restart": spec.restart or entry.record.restart,
                    "role": spec.role,
                    "priority": spec.priority,
                    "cost": spec.cost,
                    "generation": generation,
                }
            )
            self._entries[worker_id] = Entry(record, spec, entry.token)
            self.version += 1
            state = record.state
            self._publish(worker_id, state, state, record, before=entry.record)
            return record

    def promote(self, successor: str, worker_id: str) -> Worker:
        """The successor takes its worker's id, once the worker it replaced is forgotten. Its
        process, port and router registration stay as they are: subscribers hear the
        successor's id forgotten (``renamed_to`` set) and the worker's id appear."""
        with self._lock:
            entry = self._entry(successor)
            if worker_id in self._entries:
                raise DuplicateWorker(worker_id)
            del self._entries[successor]
            record = entry.record.model_copy(update={"id": worker_id, "replacing": None})
            self._entries[worker_id] = Entry(record, entry.spec, entry.token)
            self.version += 1
            state = record.state
            self._publish(successor, state, None, entry.record, renamed_to=worker_id)
            self._publish(worker_id, None, state, record)
            return record

    def router_status(self, worker_id: str, router_url: str, status: str) -> Worker | None:
        """Record one router's view of the worker; None if the worker is gone."""
        with self._lock:
            entry = self._entries.get(worker_id)
            if entry is None:
                return None
            routers = {**entry.record.routers, router_url: status}
            startup = _registered(entry.record, routers, entry.record.startup)
            return self.update(worker_id, routers=routers, startup=startup)

    def record_usage(self, figures: Mapping[str, Figures]) -> None:
        """Per-worker figures from one refresh, under one lock; unknown ids are skipped, and
        so is a record whose figures did not change (an idle worker costs no copy)."""
        changes: dict[str, dict[str, Any]] = {}
        with self._lock:
            for worker_id, usage in figures.items():
                entry = self._entries.get(worker_id)
                if entry is None:
                    continue
                r = entry.record
                measured = (usage.rss_bytes, usage.cpu_percent, usage.gpu_memory_used_mib)
                if (r.rss_bytes, r.cpu_percent, r.gpu_memory_used_mib) != measured:
                    changes[worker_id] = {
                        "rss_bytes": usage.rss_bytes,
                        "cpu_percent": usage.cpu_percent,
                        "gpu_memory_used_mib": usage.gpu_memory_used_mib,
                    }
            self.update_many(changes)

    def memory_peaks(self, peaks: Mapping[str, tuple[int | None, int | None]]) -> None:
        """The current attempts' measured peaks (host MiB, GPU MiB), for workers still live:
        hot fields, stored without a change told (:mod:`hive.workers.memory`)."""
        with self._lock:
            self.update_many(
                {
                    worker_id: {"memory_peak_mib": host, "gpu_memory_peak_mib": gpu}
                    for worker_id, (host, gpu) in peaks.items()
                    if worker_id in self._entries
                    and self._entries[worker_id].record.state in LIVE_STATES
                }
            )

    def memory_released(self, worker_id: str) -> Worker | None:
        """The worker's memory is back (or hive stopped waiting): its reservation no longer
        counts. None if the worker is gone or runs again."""
        with self._lock:
            entry = self._entries.get(worker_id)
            if entry is None or entry.record.state in LIVE_STATES:
                return None
            if not entry.record.memory_held:
                return entry.record
            return self.update(worker_id, memory_held=False)


def _registered(
    record: Worker, routers: dict[str, str], phases: list[StartupPhase]
) -> list[StartupPhase]:
    """``phases`` with ``register`` (ready to registered with every router) added, once every
    router registered the worker and its start-up up to ready is known."""
    done = routers and all(status == "registered" for status in routers.values())
    if not done or not phases or record.ready_at is None or phases[-1].phase != "probe":
        return phases
    seconds = max(0.0, (now() - record.ready_at).total_seconds())
    return [*phases, StartupPhase(phase="register", seconds=round(seconds, 3))]

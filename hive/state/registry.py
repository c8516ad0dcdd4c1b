"""The registry: the single source of truth about hive's workers.

Every worker record lives here and changes only through this class. One re-entrant lock guards
all of it, so the event loop and helper threads (device refreshers) may both call in; no method
does I/O or waits while holding it. Records are frozen pydantic models: a change swaps in a new
record, so a record handed out is a consistent snapshot that nobody can alter.

Subscribers hear about every state change, and about records appearing and being forgotten, in
the order they happened, each with a sequence number. They are called with the lock held, so
they must only hand the change on (put it in a queue, schedule a callback), never block.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hive.models import (
    DOWN_STATES,
    LIVE_STATES,
    Desired,
    Entry,
    SpawnRequest,
    State,
    Worker,
    base_id,
    process_key,
)
from hive.timeouts import within

#: The legal state changes; anything else is refused.
TRANSITIONS: Mapping[State, frozenset[State]] = {
    State.STARTING: frozenset({State.READY, State.FAILED, State.STOPPED}),
    State.READY: frozenset({State.BUSY, State.STOPPED, State.FAILED}),
    State.BUSY: frozenset({State.READY, State.STOPPED, State.FAILED}),
    State.FAILED: frozenset({State.STARTING}),
    State.STOPPED: frozenset({State.STARTING}),
}


class RegistryError(Exception):
    """Base of the registry's refusals."""


class UnknownWorker(RegistryError):
    def __init__(self, worker_id: str) -> None:
        super().__init__(f"no worker {worker_id!r}")
        self.worker_id = worker_id


class DuplicateWorker(RegistryError):
    def __init__(self, worker_id: str) -> None:
        super().__init__(f"worker {worker_id!r} already exists")
        self.worker_id = worker_id


class IllegalTransition(RegistryError):
    def __init__(self, worker_id: str, from_: State, to: State) -> None:
        super().__init__(f"worker {worker_id!r} cannot go from {from_} to {to}")
        self.worker_id, self.from_, self.to = worker_id, from_, to


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Change:
    """One change, as subscribers see it. ``to`` is None when the record was forgotten."""

    seq: int
    at: datetime
    id: str
    from_: State | None
    to: State | None
    worker: Worker
    #: A successor taking its worker's id (:meth:`Registry.promote`): on the change that forgets
    #: the successor's own id, the id it now has. Its process is the same and keeps serving.
    renamed_to: str | None = None


Subscriber = Callable[[Change], None]
Builder = Callable[[Mapping[str, Entry]], dict[str, Any]]

#: The fields a write may name; any other key is a mistake at the call, never a silent key.
_FIELDS = frozenset(Worker.model_fields) - {"state"}
#: What a worker whose process is gone shows: no pid, nothing in flight, no usage figures.
_ENDED: dict[str, Any] = {
    "pid": None,
    "in_flight": None,
    "rss_bytes": None,
    "cpu_percent": None,
    "gpu_memory_used_mib": None,
}


def _check_fields(fields: Mapping[str, Any]) -> None:
    if "state" in fields:
        raise ValueError("the state changes only through transition()")
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise ValueError(f"a worker record has no field {', '.join(map(repr, unknown))}")


@dataclass(frozen=True, slots=True)
class Figures:
    """One worker's figures from a usage refresh."""

    rss_bytes: int | None
    cpu_percent: float | None
    gpu_memory_used_mib: int | None


def _matches(
    record: Worker,
    state: State | None,
    model: str | None,
    device: str | None,
    labels: Mapping[str, str],
) -> bool:
    if state is not None and record.state != state:
        return False
    if model is not None and record.model != model:
        return False
    if device is not None and device not in record.device.split(","):
        return False
    return all(record.labels.get(k) == v for k, v in labels.items())


class Records:
    """Worker records, the transition table, filters and ordered change notifications: the
    storage under one lock. :class:`Registry` adds the named operations hive writes through.
    """

    def __init__(self, retention: float = 3600.0) -> None:
        self.retention = retention
        self._lock = threading.RLock()
        self._entries: dict[str, Entry] = {}
        self._subscribers: list[Subscriber] = []
        self._seq = 0
        #: Counts every write to any record: equal versions mean equal contents.
        self.version = 0

    # -- subscribers ---------------------------------------------------------------------------

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber`` with every change from now on; returns a function to stop."""
        with self._lock:
            self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            with self._lock:
                if subscriber in self._subscribers:
                    self._subscribers.remove(subscriber)

        return unsubscribe

    @property
    def seq(self) -> int:
        """The sequence number of the latest change."""
        return self._seq

    def _publish(
        self,
        worker_id: str,
        from_: State | None,
        to: State | None,
        worker: Worker,
        renamed_to: str | None = None,
    ) -> None:
        self._seq += 1
        change = Change(self._seq, now(), worker_id, from_, to, worker, renamed_to)
        for subscriber in list(self._subscribers):
            subscriber(change)

    # -- reading -------------------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[Mapping[str, Entry]]:
        """Hold the lock and look at every entry, for a decision that must not race a change."""
        with self._lock:
            yield self._entries

    def get(self, worker_id: str) -> Worker:
        with self._lock:
            return self._entry(worker_id).record

    def entry(self, worker_id: str) -> Entry:
        with self._lock:
            return self._entry(worker_id)

    def __contains__(self, worker_id: object) -> bool:
        with self._lock:
            return worker_id in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def ids(self) -> frozenset[str]:
        """Every worker id held now."""
        with self._lock:
            return frozenset(self._entries)

    def versioned(self) -> tuple[int, list[Worker]]:
        """Every record, oldest first, and the :attr:`version` they are."""
        with self._lock:
            return self.version, [e.record for e in self._entries.values()]

    def list(
        self,
        *,
        state: State | None = None,
        model: str | None = None,
        device: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[Worker]:
        """Records matching every filter given, oldest first."""
        with self._lock:
            records = [e.record for e in self._entries.values()]
        return [r for r in records if _matches(r, state, model, device, labels or {})]

    def counts(self) -> dict[State, int]:
        counts = dict.fromkeys(State, 0)
        with self._lock:
            for entry in self._entries.values():
                counts[entry.record.state] += 1
        return counts

    def _entry(self, worker_id: str) -> Entry:
        try:
            return self._entries[worker_id]
        except KeyError:
            raise UnknownWorker(worker_id) from None

    def resolve(self, key: str) -> str | None:
        """The id of the record whose id or process key is ``key`` (a successor that took over
        still heartbeats as ``<id>~<generation>``); None when there is none."""
        with self._lock:
            if key in self._entries:
                return key
            entry = self._entries.get(base_id(key))
            if entry is not None and process_key(entry.record) == key:
                return entry.record.id
            return None

    # -- changing ------------------------------------------------------------------------------

    def add(self, spec: SpawnRequest, token: str, build: Builder) -> Worker:
        """Create a record in ``starting``.

        ``build`` runs under the lock with every current entry and returns the record's fields
        (id, port, device...), so that what it reserves cannot be taken by a concurrent call.
        """
        with self._lock:
            fields = build(self._entries)
            worker_id = fields["id"]
            if worker_id in self._entries:
                raise DuplicateWorker(worker_id)
            record = Worker(**{"created_at": now(), **fields, "state": State.STARTING})
            self._entries[worker_id] = Entry(record, spec, token)
            self.version += 1
            self._publish(worker_id, None, State.STARTING, record)
            return record

    def restore(self, spec: SpawnRequest, token: str, record: Worker) -> Worker:
        """Put back a record from the journal as it was (any state), for adoption at start."""
        with self._lock:
            if record.id in self._entries:
                raise DuplicateWorker(record.id)
            self._entries[record.id] = Entry(record, spec, token)
            self._publish(record.id, None, record.state, record)
            return record

    def transition(
        self,
        worker_id: str,
        to: State,
        *,
        expect: State | frozenset[State] | None = None,
        build: Builder | None = None,
        **fields: Any,
    ) -> Worker:
        """Move a worker to ``to``, refusing what the table does not allow.

        ``expect`` refuses the change unless the worker is in that state (or one of them) now;
        ``build`` computes more fields under the lock, like ``add``'s.
        """
        fields.pop("state", None)  # the state is ``to``, whatever else says
        _check_fields(fields)
        with self._lock:
            entry = self._entry(worker_id)
            current = entry.record.state
            allowed = expect if isinstance(expect, frozenset) else {expect}
            if to not in TRANSITIONS[current] or (expect is not None and current not in allowed):
                raise IllegalTransition(worker_id, current, to)
            if build is not None:
                built = build(self._entries)
                built.pop("state", None)
                _check_fields(built)
                fields = {**built, **fields}
            record = entry.record.model_copy(update={**fields, "state": to})
            self._entries[worker_id] = Entry(record, entry.spec, entry.token)
            self.version += 1
            self._publish(worker_id, current, to, record)
            return record

    def update(self, worker_id: str, **fields: Any) -> Worker:
        """Change fields other than the state; subscribers are not told.

        The low-level write under the named operations below; hive's own code uses those.
        """
        _check_fields(fields)
        with self._lock:
            entry = self._entry(worker_id)
            record = entry.record.model_copy(update=fields)
            self._entries[worker_id] = Entry(record, entry.spec, entry.token)
            self.version += 1
            return record

    def update_many(self, changes: Mapping[str, dict[str, Any]]) -> None:
        """Apply several ``update`` calls under one lock; unknown ids are skipped."""
        for fields in changes.values():
            _check_fields(fields)
        with self._lock:
            for worker_id, fields in changes.items():
                if (entry := self._entries.get(worker_id)) is not None:
                    record = entry.record.model_copy(update=fields)
                    self._entries[worker_id] = Entry(record, entry.spec, entry.token)
                    self.version += 1

    def remove(self, worker_id: str) -> Worker:
        """Forget a record; only one whose process is gone may be forgotten."""
        with self._lock:
            entry = self._entry(worker_id)
            if entry.record.state not in DOWN_STATES:
                raise IllegalTransition(worker_id, entry.record.state, State.STOPPED)
            del self._entries[worker_id]
            self.version += 1
            self._publish(worker_id, entry.record.state, None, entry.record)
            return entry.record

    def forget_unstarted(self, worker_id: str) -> Worker:
        """Forget a record whose process never started (its spawn was refused half-way)."""
        with self._lock:
            entry = self._entry(worker_id)
            if entry.record.pid is not None:
                raise IllegalTransition(worker_id, entry.record.state, State.STOPPED)
            del self._entries[worker_id]
            self.version += 1
            self._publish(worker_id, entry.record.state, None, entry.record)
            return entry.record

    def expire(self, at: datetime | None = None) -> list[str]:
        """Forget stopped and failed records older than ``retention`` with no restart pending
        (declared workers are kept: a stopped one stays stopped, not forgotten and re-created)."""
        cutoff = (at or now()) - timedelta(seconds=self.retention)
        gone = []
        with self._lock:
            for worker_id, entry in list(self._entries.items()):
                r = entry.record
                if (
                    r.state in DOWN_STATES
                    and r.declared is None  # a declared worker is kept while it is declared
                    and r.next_restart_at is None
                    and r.stopped_at is not None
                    and r.stopped_at <= cutoff
                ):
                    self.remove(worker_id)
                    gone.append(worker_id)
        return gone

    # -- waiting -------------------------------------------------------------------------------

    def token(self, worker_id: str) -> str | None:
        """The worker's heartbeat token (by id or process key), or None for an unknown worker."""
        with self._lock:
            resolved = self.resolve(worker_id)
            entry = self._entries.get(resolved) if resolved is not None else None
            return entry.token if entry is not None else None

    async def wait_until(
        self, worker_id: str, done: Callable[[Worker], bool], timeout: float
    ) -> Worker:
        """Wait (at most ``timeout`` s) until ``done(record)`` holds, or the record is
        forgotten; returns the record as it then is."""
        loop = asyncio.get_running_loop()
        reached: asyncio.Future[Worker] = loop.create_future()

        def on_change(change: Change) -> None:
            if change.id == worker_id and (change.to is None or done(change.worker)):
                loop.call_soon_threadsafe(_settle, reached, change.worker)

        unsubscribe = self.subscribe(on_change)
        try:
            record = self.get(worker_id)
            if done(record):
                return record
            settled = await within(reached, timeout)
            return settled.result() if settled is not None else self.get(worker_id)
        finally:
            unsubscribe()


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
            **_ENDED,
        )

    def attempt_started(self, worker_id: str, pid: int) -> Worker:
        """The attempt's process runs, with this pid."""
        return self.update(worker_id, pid=pid, started_at=now())

    def became_ready(self, worker_id: str) -> Worker | None:
        """``starting`` -> ``ready`` (a probe answered 2xx); None if it was not starting."""
        with self._lock:
            if self._entry(worker_id).record.state != State.STARTING:
                return None
            return self.transition(worker_id, State.READY, ready_at=now())

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
                record = self.transition(worker_id, State.READY, ready_at=now(), **fields)
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
            return self.update(worker_id, routers={**entry.record.routers, router_url: status})

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


def _settle(future: asyncio.Future[Worker], record: Worker) -> None:
    if not future.done():
        future.set_result(record)

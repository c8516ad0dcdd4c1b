"""The storage under the registry: worker records, the transition table, filters, and the
ordered delivery of every change.

One re-entrant lock guards the records, so the event loop and helper threads (device refreshers)
may both call in; no method does I/O or waits while holding it. Records are frozen pydantic
models: a change swaps in a new record, so a record handed out is a consistent snapshot.

Every change is told: a record appearing, changing state, changing any field but the hot ones
(:data:`HOT_FIELDS`: the heartbeat time, the in-flight count, the usage figures and the memory
peaks, which change often and which nobody waits on), and being forgotten. Changes get a sequence
number under the lock and are delivered in that order, in one place: on the event loop the
registry was bound to (:meth:`Records.bind`), one hop per change whatever the number of
subscribers, so a subscriber runs on the loop, never under the lock, and may act at once. Without
a bound loop (a registry used alone, as in unit tests) they are called at once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hive.errors import DuplicateWorker, IllegalTransition, UnknownWorker
from hive.models import (
    DOWN_STATES,
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


log = logging.getLogger("hive.registry")


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
    #: The record as it was before this change (None for a record that just appeared).
    before: Worker | None = None

    @property
    def fields_only(self) -> bool:
        """A change of fields with the state as it was (``from_ == to``)."""
        return self.from_ is not None and self.from_ == self.to


Subscriber = Callable[[Change], None]
Builder = Callable[[Mapping[str, Entry]], dict[str, Any]]

#: The fields a write may name; any other key is a mistake at the call, never a silent key.
_FIELDS = frozenset(Worker.model_fields) - {"state"}
#: Fields that change often and that nobody waits on: a write that changes only these is not
#: told to subscribers (it is still stored, and read by the list, the record and the metrics).
HOT_FIELDS = frozenset(
    {
        "last_heartbeat_at", "in_flight", "rss_bytes", "cpu_percent", "gpu_memory_used_mib",
        "memory_peak_mib", "gpu_memory_peak_mib",
    }
)  # fmt: skip
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

    About 300 lines: every write under the lock (add, restore, transition, update, remove,
    expire) and the delivery of what it changed read best beside each other, since the order
    of sequence numbers and of delivery is one promise they keep together.
    """

    def __init__(self, retention: float = 3600.0) -> None:
        self.retention = retention
        self._lock = threading.RLock()
        self._entries: dict[str, Entry] = {}
        self._subscribers: list[Subscriber] = []
        self._seq = 0
        #: Counts every write to any record: equal versions mean equal contents.
        self.version = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver every change on ``loop`` from now on (``hive serve`` binds its own loop)."""
        with self._lock:
            self._loop = loop
            self._loop_thread = threading.get_ident()

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
        before: Worker | None = None,
    ) -> None:
        # Under the lock: the sequence number and the order of delivery are the same.
        self._seq += 1
        change = Change(self._seq, now(), worker_id, from_, to, worker, renamed_to, before)
        loop = self._loop
        if loop is None:
            self._deliver(change)
        elif threading.get_ident() == self._loop_thread:
            loop.call_soon(self._deliver, change)
        else:
            # A closed loop: hive is gone and nobody is listening.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._deliver, change)

    def _deliver(self, change: Change) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(change)
            except Exception:
                log.exception("a subscriber failed on the change of %s", change.id)

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
            self._publish(worker_id, current, to, record, before=entry.record)
            return record

    def update(self, worker_id: str, **fields: Any) -> Worker:
        """Change fields other than the state. Subscribers are told when a field other than
        the hot ones changed value; a write that changes nothing is not a change at all.

        The low-level write under the named operations below; hive's own code uses those.
        """
        _check_fields(fields)
        with self._lock:
            return self._update(self._entry(worker_id), fields)

    def update_many(self, changes: Mapping[str, dict[str, Any]]) -> None:
        """Apply several ``update`` calls under one lock; unknown ids are skipped."""
        for fields in changes.values():
            _check_fields(fields)
        with self._lock:
            for worker_id, fields in changes.items():
                if (entry := self._entries.get(worker_id)) is not None:
                    self._update(entry, fields)

    def _update(self, entry: Entry, fields: Mapping[str, Any]) -> Worker:
        old = entry.record
        changed = [name for name, value in fields.items() if getattr(old, name) != value]
        if not changed:
            return old
        record = old.model_copy(update=fields)
        self._entries[old.id] = Entry(record, entry.spec, entry.token)
        self.version += 1
        if not HOT_FIELDS.issuperset(changed):
            self._publish(old.id, old.state, old.state, record, before=old)
        return record

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
                if self._loop is loop:  # delivered on this loop already
                    _settle(reached, change.worker)
                else:
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


def _settle(future: asyncio.Future[Worker], record: Worker) -> None:
    if not future.done():
        future.set_result(record)

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

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hive.models import DOWN_STATES, SpawnRequest, State, Worker

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
class Entry:
    """A record with what hive keeps about it but never shows: the request and its token."""

    record: Worker
    spec: SpawnRequest
    token: str


@dataclass(frozen=True, slots=True)
class Change:
    """One change, as subscribers see it. ``to`` is None when the record was forgotten."""

    seq: int
    at: datetime
    id: str
    from_: State | None
    to: State | None
    worker: Worker


Subscriber = Callable[[Change], None]
Builder = Callable[[Mapping[str, Entry]], dict[str, Any]]


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


class Registry:
    """Worker records, the transition table, filters and ordered change notifications."""

    def __init__(self, retention: float = 3600.0) -> None:
        self.retention = retention
        self._lock = threading.RLock()
        self._entries: dict[str, Entry] = {}
        self._subscribers: list[Subscriber] = []
        self._seq = 0

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
        self, worker_id: str, from_: State | None, to: State | None, worker: Worker
    ) -> None:
        self._seq += 1
        change = Change(self._seq, now(), worker_id, from_, to, worker)
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
        with self._lock:
            entry = self._entry(worker_id)
            current = entry.record.state
            allowed = expect if isinstance(expect, frozenset) else {expect}
            if to not in TRANSITIONS[current] or (expect is not None and current not in allowed):
                raise IllegalTransition(worker_id, current, to)
            if build is not None:
                fields = {**build(self._entries), **fields}
            record = entry.record.model_copy(update={**fields, "state": to})
            self._entries[worker_id] = Entry(record, entry.spec, entry.token)
            self._publish(worker_id, current, to, record)
            return record

    def update(self, worker_id: str, **fields: Any) -> Worker:
        """Change fields other than the state; subscribers are not told."""
        if "state" in fields:
            raise ValueError("the state changes only through transition()")
        with self._lock:
            entry = self._entry(worker_id)
            record = entry.record.model_copy(update=fields)
            self._entries[worker_id] = Entry(record, entry.spec, entry.token)
            return record

    def update_many(self, changes: Mapping[str, dict[str, Any]]) -> None:
        """Apply several ``update`` calls under one lock; unknown ids are skipped."""
        if any("state" in fields for fields in changes.values()):
            raise ValueError("the state changes only through transition()")
        with self._lock:
            for worker_id, fields in changes.items():
                if (entry := self._entries.get(worker_id)) is not None:
                    record = entry.record.model_copy(update=fields)
                    self._entries[worker_id] = Entry(record, entry.spec, entry.token)

    def replace_spec(self, worker_id: str, spec: SpawnRequest) -> None:
        with self._lock:
            entry = self._entry(worker_id)
            self._entries[worker_id] = Entry(entry.record, spec, entry.token)

    def remove(self, worker_id: str) -> Worker:
        """Forget a record; only one whose process is gone may be forgotten."""
        with self._lock:
            entry = self._entry(worker_id)
            if entry.record.state not in DOWN_STATES:
                raise IllegalTransition(worker_id, entry.record.state, State.STOPPED)
            del self._entries[worker_id]
            self._publish(worker_id, entry.record.state, None, entry.record)
            return entry.record

    def expire(self, at: datetime | None = None) -> list[str]:
        """Forget stopped and failed records older than ``retention`` with no restart pending."""
        cutoff = (at or now()) - timedelta(seconds=self.retention)
        gone = []
        with self._lock:
            for worker_id, entry in list(self._entries.items()):
                r = entry.record
                if (
                    r.state in DOWN_STATES
                    and r.next_restart_at is None
                    and r.stopped_at is not None
                    and r.stopped_at <= cutoff
                ):
                    self.remove(worker_id)
                    gone.append(worker_id)
        return gone

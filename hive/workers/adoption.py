"""Adoption: what a new hive makes of the journal the last one left, against live processes.

The journal says what hive knew; the containment (cgroups, or environment tags) says what runs.
:func:`plan` reconciles the two, and the supervisor carries the plan out:

- a worker in a live state whose process is found (pid *and* start time: a recycled pid is
  someone else's, never ours to touch) is adopted as it runs;
- a worker whose record has no pid yet (hive died between writing the intent and the pid) is
  adopted if its attempt's leader is found among its tagged processes, else failed;
- a worker whose process is gone becomes ``failed`` and its restart policy applies;
- stopped and failed records come back as they were; one that the last hive stopped at the
  host's shutdown (``stopped``, a restart due) starts again as its restart policy says, as
  it would had the shutdown ended it;
- any process of this hive's that no live record accounts for (a worker not in the journal, a
  stopped one, a process of an earlier attempt, what a dead leader left) is a *stray*: ended,
  and logged.

When the journal could not be read at all, running workers are not orphaned: each is rebuilt
from its leader's own environment (the id, model, backend, port, device and token hive gave it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psutil
from pydantic import ValidationError

from hive.host.containment import read_tag
from hive.host.process import Process, start_time
from hive.models import LIVE_STATES, SpawnRequest, State, Worker, process_key
from hive.state.journal import Saved
from hive.state.registry import now
from hive.workers.launch import attempt_nonce

log = logging.getLogger("hive.adoption")

GONE_ERROR = "exited while hive was not running (exit status unknown)"
UNSTARTED_ERROR = "hive stopped while starting it, before its process was recorded"
REBUILT_NOTE = "rebuilt from its process: the journal could not be read"


@dataclass(frozen=True, slots=True)
class Adoption:
    """One saved worker, as the new hive takes it back."""

    saved: Saved
    #: The record to restore: the saved one, or ``failed`` when its process is gone.
    record: Worker
    #: The running process, watched again; None when there is none to adopt.
    process: Process | None
    #: A failed record whose restart policy must run now (it was live, or a restart was due).
    resume: bool
    #: The processes of the adopted attempt, as the containment found them.
    members: frozenset[int] = frozenset()
    #: The adopted process's start time (it tells the process from a recycled pid later).
    started: float | None = None


@dataclass(frozen=True, slots=True)
class Stray:
    """Processes of this hive's workers that no record accounts for: to be ended."""

    worker_id: str
    pids: frozenset[int]
    why: str


@dataclass(slots=True)
class Plan:
    adoptions: list[Adoption] = field(default_factory=list)
    strays: list[Stray] = field(default_factory=list)
    adopted: int = 0
    gone: int = 0
    restored: int = 0
    rebuilt: int = 0

    def counts(self) -> dict[str, int]:
        return {
            "adopted": self.adopted,
            "gone": self.gone,
            "restored": self.restored,
            "rebuilt": self.rebuilt,
            "stray": sum(len(s.pids) for s in self.strays),
        }

    def stray(self, worker_id: str, pids: set[int], why: str) -> None:
        if pids:
            self.strays.append(Stray(worker_id, frozenset(pids), why))


Reattach = Callable[[int, float | None], Process | None]


def reattach(pid: int, started: float | None) -> Process | None:
    """Watch ``pid`` if it is still the process the journal knew (same start time)."""
    if started is None:
        return None
    try:
        process = Process.watch(pid, child=False)
    except (ProcessLookupError, OSError):
        return None
    now_started = start_time(pid)
    if now_started is None or abs(now_started - started) > 0.05 or _is_zombie(pid):
        process.detach()  # a recycled pid: someone else's process, never ours to touch
        return None
    return process


def plan(
    saved: list[Saved],
    known: Container[str],
    find: Reattach = reattach,
    inventory: Mapping[str, set[int]] | None = None,
    rebuild: bool = False,
) -> Plan:
    """Decide, for each saved worker not in ``known``, what the new hive takes back.

    ``inventory`` is what the containment finds running, by worker id; ``rebuild`` says the
    journal was unreadable, so running workers it does not list are rebuilt, not ended.
    """
    result = Plan()
    running = {wid: set(pids) for wid, pids in (inventory or {}).items()}
    for item in saved:
        record = item.record
        key = process_key(record)  # what its processes are tagged with
        if record.id in known:
            running.pop(key, None)
            continue
        members = running.pop(key, set())
        process, started = None, None
        if record.state in LIVE_STATES and record.pid is None:
            leader = _leader(members, attempt_nonce(record))
            started = start_time(leader) if leader is not None else None
            if leader is not None:
                process = find(leader, started)
            if process is not None:
                record = record.model_copy(update={"pid": process.pid})
            else:
                result.gone += 1
                record = _failed(record, UNSTARTED_ERROR)
                log.warning("worker %s: %s", record.id, UNSTARTED_ERROR)
        elif record.state in LIVE_STATES and record.pid is not None:
            started = item.start_time
            process = find(record.pid, started)
            if process is None:
                result.gone += 1
                record = _failed(record, GONE_ERROR)
                log.warning("worker %s (pid %s) is gone: failed", record.id, item.record.pid)
        stale: set[int] = set()
        if process is not None:
            result.adopted += 1
            nonce = attempt_nonce(record)
            stale = {pid for pid in members - {process.pid} if _attempt(pid) not in (nonce, None)}
            result.stray(key, stale, "left from an earlier attempt")
        else:
            if record.state not in LIVE_STATES:
                result.restored += 1
            result.stray(key, members, f"the worker is {record.state.value}")
        # Failed; or stopped at the host's shutdown, due to start again (Supervisor.close).
        pending = record.desired == "running" and (
            record.state == State.FAILED
            or (record.state == State.STOPPED and record.next_restart_at is not None)
        )
        resume = (
            process is None
            and pending
            and (record.next_restart_at is not None or item.record.pid is not None)
        )
        current = members - stale if process is not None else set()
        if process is not None:
            current.add(process.pid)
        result.adoptions.append(
            Adoption(item, record, process, resume, frozenset(current), started)
        )
    _leave_replaced(result)
    for worker_id, members in running.items():
        if worker_id in known:
            continue
        rebuilt = _rebuild(worker_id, members, find) if rebuild else None
        if rebuilt is None:
            result.stray(worker_id, members, "not a worker hive knows")
            continue
        result.rebuilt += 1
        result.adopted += 1
        adoption, leader = rebuilt
        result.adoptions.append(adoption)
        result.stray(worker_id, members - {leader}, "left from an earlier attempt")
        log.warning("worker %s (pid %d): %s", worker_id, leader, REBUILT_NOTE)
    return result


def _leave_replaced(result: Plan) -> None:
    """A worker whose process is gone is not restarted when the successor of a replacement the
    last hive left half-way will take its id (it runs, or it had become ready): the new hive
    finishes that replacement (:func:`hive.desired.reconcile.settle_decision`), and a restart
    of the old worker would only be stopped again, after it had loaded its model."""
    index = {adoption.record.id: i for i, adoption in enumerate(result.adoptions)}
    for adoption in list(result.adoptions):
        successor = adoption.record
        i = index.get(successor.replacing or "")
        if i is None:
            continue
        old = result.adoptions[i]
        if old.process is None and (adoption.process is not None or successor.ready_at):
            result.adoptions[i] = dataclasses.replace(old, resume=False)


def _failed(record: Worker, error: str) -> Worker:
    return record.model_copy(
        update={
            "state": State.FAILED,
            "pid": None,
            "exit_code": None,
            "in_flight": None,
            "stopped_at": now(),
            "error": error,
        }
    )


def _attempt(pid: int) -> str | None:
    tag = read_tag(pid)
    return tag.attempt if tag is not None else None


def _leader(members: set[int], nonce: str | None) -> int | None:
    """The attempt's first process: a session leader of that attempt whose parent is not one
    of the worker's own processes."""
    for pid in sorted(members):
        try:
            if os.getsid(pid) != pid or (nonce is not None and _attempt(pid) != nonce):
                continue
            if psutil.Process(pid).ppid() not in members:
                return pid
        except (OSError, psutil.Error):
            continue
    return None


def _rebuild(worker_id: str, members: set[int], find: Reattach) -> tuple[Adoption, int] | None:
    """A running worker the journal lost, rebuilt from its leader's environment."""
    leader = _leader(members, None)
    if leader is None:
        return None
    try:
        env = psutil.Process(leader).environ()
        process = find(leader, start_time(leader))
        if process is None:
            return None
        port = int(env["HIVE_PORT"])
        gpus = [g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
        base, _, generation = worker_id.partition("~")  # a successor that had not taken over
        spec = SpawnRequest(
            model=env["HIVE_MODEL"], id=base, backend=env.get("HIVE_BACKEND"), port=port
        )
        created_at, _, restarts = env.get("HIVE_ATTEMPT", "0.0").rpartition(".")
        record = Worker(
            id=worker_id,
            generation=int(generation or 1),
            replacing=base if generation else None,
            model=spec.model,
            backend=env.get("HIVE_BACKEND", "unknown"),
            device=env.get("HIVE_DEVICE", "auto"),
            gpus=gpus,
            cpus=sorted(os.sched_getaffinity(leader)),
            pid=leader,
            port=port,
            url=f"http://127.0.0.1:{port}",
            state=State.READY,
            created_at=datetime.fromtimestamp(float(created_at or 0), UTC),
            restarts=int(restarts or 0),
            error=REBUILT_NOTE,
        )
    except (KeyError, ValueError, OSError, psutil.Error, ValidationError) as exc:
        log.warning("worker %s: cannot rebuild from pid %d: %s", worker_id, leader, exc)
        return None
    token = env.get("HIVE_WORKER_TOKEN", "")
    saved = Saved(record, spec, token, start_time(leader))
    current = frozenset(pid for pid in members if _attempt(pid) == env.get("HIVE_ATTEMPT"))
    adoption = Adoption(saved, record, process, False, current | {leader}, started=saved.start_time)
    return adoption, leader


def _is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True

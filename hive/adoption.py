"""Adoption: what a new hive makes of the journal the last one left, against live processes.

For each saved worker in a live state, the process is looked for by pid *and* start time (a
recycled pid is someone else's process, never ours to touch): found, it is adopted as it runs;
gone, the record becomes ``failed`` and its restart policy applies. Stopped and failed records
come back as they were. :func:`plan` decides; the supervisor carries the plan out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container
from dataclasses import dataclass, field

import psutil

from hive.journal import Saved
from hive.models import LIVE_STATES, State, Worker
from hive.process import Process, start_time
from hive.registry import now

log = logging.getLogger("hive.adoption")

GONE_ERROR = "exited while hive was not running (exit status unknown)"


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


@dataclass(slots=True)
class Plan:
    adoptions: list[Adoption] = field(default_factory=list)
    adopted: int = 0
    gone: int = 0
    restored: int = 0

    def counts(self) -> dict[str, int]:
        return {"adopted": self.adopted, "gone": self.gone, "restored": self.restored}


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


def plan(saved: list[Saved], known: Container[str], find: Reattach = reattach) -> Plan:
    """Decide, for each saved worker not in ``known``, what the new hive takes back."""
    result = Plan()
    for item in saved:
        record = item.record
        if record.id in known:
            continue
        process = None
        if record.state in LIVE_STATES and record.pid is not None:
            process = find(record.pid, item.start_time)
            if process is None:
                result.gone += 1
                record = record.model_copy(
                    update={
                        "state": State.FAILED,
                        "pid": None,
                        "exit_code": None,
                        "in_flight": None,
                        "stopped_at": now(),
                        "error": GONE_ERROR,
                    }
                )
                log.warning("worker %s (pid %s) is gone: failed", record.id, item.record.pid)
        if process is not None:
            result.adopted += 1
        elif record.state not in LIVE_STATES:
            result.restored += 1
        pending = record.state == State.FAILED and record.desired == "running"
        resume = (
            process is None
            and pending
            and (record.next_restart_at is not None or item.record.pid is not None)
        )
        result.adoptions.append(Adoption(item, record, process, resume))
    return result


def _is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True

"""Taking back what the previous hive left, once, at start-up, before the API listens.

:func:`hive.workers.adoption.plan` decides, touching nothing: each journal record against what
the containment finds running. :class:`Takeover` carries the plan out: each record restored
into the registry, a :class:`~hive.workers.run.WorkerRun` watching its process again (or its
restart due), and every stray process ended.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from hive.host.containment import end_strays
from hive.models import State, process_key
from hive.state.journal import Saved
from hive.workers.adoption import plan

if TYPE_CHECKING:  # the supervisor hands itself over; no import cycle at run time
    from hive.workers.supervisor import Supervisor

log = logging.getLogger("hive.adoption")


class Takeover:
    """Adoption at start: running workers keep running under the new hive."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def run(self, saved: list[Saved], rebuild: bool = False) -> dict[str, int]:
        """Adopt, resume or end what ``saved`` and the containment say; returns the counts
        (adopted, gone, restored, rebuilt, stray). ``rebuild``: the journal was unreadable, so
        running workers are rebuilt from their processes."""
        supervisor = self.supervisor
        registry, containment, journal = (
            supervisor.registry,
            supervisor.containment,
            supervisor.journal,
        )
        decided = plan(saved, registry, inventory=containment.inventory(), rebuild=rebuild)
        for adoption in decided.adoptions:
            record, item = adoption.record, adoption.saved
            registry.restore(item.spec, item.token, record)
            run = supervisor.new_run(record.id)
            if adoption.process is not None:
                for pid in adoption.members:  # hive may have died before it moved them
                    with contextlib.suppress(OSError):
                        containment.enter(process_key(record), pid)
                if journal is not None:
                    journal.remember_start_time(record.id, adoption.process.pid, adoption.started)
                run.adopt(
                    adoption.process,
                    ready=record.state in (State.READY, State.BUSY),
                    heartbeating=record.last_heartbeat_at is not None,
                )
                log.info(
                    "adopted worker %s, pid %d, %s", record.id, adoption.process.pid, record.state
                )
            elif adoption.resume:
                run.resume_failed()
            else:  # its process is gone, and no lifecycle will wait for its memory
                registry.memory_released(record.id)
        for stray in decided.strays:
            log.warning(
                "ending %d stray process(es) of worker %s (%s): %s",
                len(stray.pids),
                stray.worker_id,
                stray.why,
                " ".join(map(str, sorted(stray.pids))),
            )
            end_strays(containment, stray.worker_id, stray.pids)
        return decided.counts()

"""Housekeeping: what hive does for its workers on a clock or a signal rather than on a request.

Once a second, records past ``retention`` are forgotten (their logs and working directories
with them) and the logs' keeper is told which workers run (it caps their logs in its own
thread, :meth:`~hive.workers.logs.Logs.keep_capped`). On SIGCHLD, under tag containment where
hive is the child subreaper, exited descendants of workers that re-parented to hive are reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from hive.host.process import reap_orphans
from hive.workers.launch import forget_workdir

if TYPE_CHECKING:  # the supervisor hands itself over; no import cycle at run time
    from hive.workers.supervisor import Supervisor

log = logging.getLogger("hive.supervisor")


class Housekeeping:
    """Retention, log caps and orphan reaping over the supervisor's runs."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._every_second(), name="hive-housekeeping")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def reap_orphans(self) -> None:
        """Reap exited children that are not a worker's leader (their lifecycle reaps those):
        descendants of workers that re-parented to hive, the child subreaper."""
        reap_orphans(self.supervisor.leader_pids())

    async def _every_second(self) -> None:
        supervisor = self.supervisor
        while True:
            await asyncio.sleep(1.0)
            try:
                for worker_id in supervisor.registry.expire():
                    supervisor.forget_run(worker_id)
                    await supervisor.logs.discard(worker_id)
                    await asyncio.to_thread(forget_workdir, supervisor.config, worker_id)
                supervisor.logs.keep_capped(supervisor.active_ids())
            except OSError:
                log.exception("housekeeping failed")

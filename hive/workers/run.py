"""One worker's lifecycle: the object that owns its process, from each start to its end.

A :class:`WorkerRun` is to a worker what supervisord's ``Subprocess`` is to a program: it starts
the process, watches it, and records the outcome of every attempt through the registry's named
operations. Each attempt waits for the first of:

- the process exiting (noticed through its pidfd the moment it happens),
- the worker becoming ready (its readiness probe answers 2xx, or it heartbeats ``ready``),
- the startup timeout, a hang (no heartbeat for ``heartbeat_timeout``), a failed liveness probe,
- a stop request (out of the routers first, then drained, then SIGTERM and SIGKILL).
Then :func:`hive.workers.restart.next_delay` says whether and when the next attempt starts.
This and the supervisor are the only code that touches worker processes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from asyncio import FIRST_COMPLETED
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from hive.config import BackendConfig
from hive.errors import CapacityError, PortTaken, UnknownBackend
from hive.host.containment import ContainmentError, Group
from hive.host.process import Process, describe_exit, terminate
from hive.models import State, process_key
from hive.state.registry import now
from hive.timeouts import within
from hive.workers import cause
from hive.workers.deps import Deps
from hive.workers.drain import until_drained
from hive.workers.engine_load import Load
from hive.workers.launch import build_launch
from hive.workers.listener import listener_check
from hive.workers.logs import shares_log
from hive.workers.phases import StartupClock
from hive.workers.probes import WorkerProbes
from hive.workers.progress import ProgressWatch, until_stalled
from hive.workers.restart import Backoff, Outcome, next_delay
from hive.workers.stall import HangTimer

log = logging.getLogger("hive.lifecycle")


def _age(at: datetime | None) -> float | None:
    """Seconds since ``at``; None for never."""
    return None if at is None else (now() - at).total_seconds()


#: exec errors that no retry can cure: the command is missing or cannot be executed.
_UNRUNNABLE = frozenset(
    {errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR, errno.EISDIR, errno.ELOOP}
)


class WorkerRun:
    """The lifecycle of one worker: its process, probes, hang timer, drain and stop.

    Over 300 lines on purpose: it is one state machine, and keeping every transition of an
    attempt (started, ready, exited, failed, stopped) in one class is what makes a crash
    followable in one place. Its policies already live outside it (restart, probes, launch).
    """

    def __init__(self, worker_id: str, deps: Deps) -> None:
        #: The worker's id in the registry; a successor's changes once, when it takes over.
        self.id = worker_id
        #: What its processes are known by (:func:`hive.models.process_key`), set per attempt.
        self.key = worker_id
        self.deps = deps
        self.process: Process | None = None
        self.task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._stop_timeout: float | None = None
        self._ready = asyncio.Event()
        self._hung = asyncio.Event()
        self._hang_timer = HangTimer(deps.watch, self._hung)
        self._backoff = Backoff()
        self._sweeps: set[asyncio.Task[bool]] = set()
        self._unrunnable = False
        self._attempt: cause.Attempt | None = None  # what hive knew when it started
        registry = deps.registry
        self._probes = WorkerProbes(
            deps.prober,
            lambda: registry.get(self.id).port,
            lambda: _age(registry.get(self.id).last_heartbeat_at),
            deps.watch.away_since,
            ProgressWatch(deps.watch),
        )
        self._startup = StartupClock(lambda phases: registry.startup_phases(self.id, phases))

    # -- what the supervisor asks of a run ------------------------------------------------------

    def begin_attempt(self, restarts_delta: int) -> None:
        """``stopped``/``failed`` -> ``starting``, reserving port and devices anew."""
        deps = self.deps
        entry = deps.registry.entry(self.id)
        spec = entry.spec
        backend_name = deps.config.backend_name(spec)
        backend = deps.config.backend(backend_name)

        def reserve(entries: Any) -> dict[str, Any]:
            reserved = deps.reservations.reserve(
                spec,
                backend_name,
                backend,
                entries,
                self.id,
                entry.record.port,
                entry.record.bootstrap_port,
            )
            return {**reserved, "containment": deps.containment.kind}

        deps.registry.begin_attempt(self.id, reserve, entry.record.restarts + restarts_delta)
        self._startup.begin()

    async def start(self) -> None:
        """Start the process of a record in ``starting``, and the task that watches it."""
        await self._launch()
        self._watch()

    def adopt(self, process: Process, ready: bool, heartbeating: bool) -> None:
        """Watch a process a previous hive started, as it runs now."""
        self.key = process_key(self.deps.registry.get(self.id))
        self.process = process
        if ready:
            self._ready.set()
        if heartbeating:
            self.arm_hang_timer()
        self._watch()

    def resume_failed(self) -> None:
        """A record restored as ``failed``: apply its restart policy now."""
        self._watch(Outcome.FAILED)

    def request_stop(self, timeout: float | None) -> None:
        self._stop_timeout = timeout
        self._stop.set()

    def detach(self) -> None:
        """Stop watching, leave the process running (``on_exit = "detach"``)."""
        if self.task is not None:
            self.task.cancel()
        if self.process is not None:
            self.process.detach()

    @property
    def active(self) -> bool:
        """True while the lifecycle task runs (a process, or a restart to come)."""
        return self.task is not None and not self.task.done()

    def heard(self) -> None:
        """A heartbeat arrived: the worker lives and serves (the registry made it ready)."""
        if not self._ready.is_set():
            self._startup.ready()
        self._ready.set()
        self.arm_hang_timer()

    # -- the lifecycle --------------------------------------------------------------------------

    def _watch(self, first: Outcome | None = None) -> None:
        self.task = asyncio.create_task(self._lifecycle(first), name=f"worker-{self.id}")

    async def _lifecycle(self, first: Outcome | None) -> None:
        deps, outcome = self.deps, first
        while True:
            if outcome is None:
                if self.process is not None:
                    outcome = await self._supervise()
                else:
                    outcome = Outcome.UNRUNNABLE if self._unrunnable else Outcome.FAILED
            await self._attempt_over()
            decision = next_delay(
                outcome, deps.registry.get(self.id), deps.config, self._backoff, time.monotonic()
            )
            self._backoff = decision.backoff
            outcome = None
            if decision.gave_up is not None:
                deps.registry.gave_up(self.id, decision.gave_up)
            if decision.delay is None or deps.closing:
                return
            deps.registry.restart_due(self.id, now() + timedelta(seconds=decision.delay))
            await within(self._stop.wait(), decision.delay)
            if not self._stop.is_set():
                await self.swept()
            if self._stop.is_set() or deps.closing:
                deps.registry.restart_due(self.id, None)
                return
            self._reset_attempt()
            try:
                self.begin_attempt(restarts_delta=1)
            except (CapacityError, PortTaken, UnknownBackend) as exc:  # no room, no backend
                message = exc.message
                deps.registry.restart_refused(self.id, f"cannot restart: {message}")
                log.warning("worker %s cannot restart: %s", self.id, message)
                outcome = Outcome.FAILED
                continue
            await self._launch()

    async def _attempt_over(self) -> None:
        """Learn the attempt's memory (if it became ready), and hold its reservation until the
        memory is back (:mod:`hive.workers.memory`), bounded by ``stop_timeout``."""
        deps = self.deps
        if deps.memory is None:
            return
        await self.swept()
        leader = self.process.pid if self.process is not None else None
        backend = deps.backend(deps.registry.get(self.id).backend)
        bound = None if deps.closing else deps.config.stop_timeout
        ready = self._ready.is_set()
        if note := await deps.memory.attempt_over(self.id, self.key, leader, ready, backend, bound):
            deps.logs.mark(self.id, note)
            log.warning("worker %s: %s", self.id, note)

    def _reset_attempt(self) -> None:
        self.process = None
        self._ready.clear()
        self._hung.clear()
        self.disarm_hang_timer()
        self._probes.reset()

    async def _launch(self) -> None:
        """Start the process of a record in ``starting``; a failure to exec makes it failed."""
        deps = self.deps
        entry = deps.registry.entry(self.id)
        self.key = process_key(entry.record)
        backend = deps.backend(entry.record.backend)
        if backend is None:
            self._fail(f"backend {entry.record.backend!r} is no longer configured", None)
            return
        launch = build_launch(
            entry,
            backend,
            deps.config,
            deps.api_url,
            deps.logs.path(self.id),
            instance=deps.containment.instance,
            gpu_total_mib=deps.reservations.placer.memory_total_mib(entry.record.gpus),
        )
        attempt = entry.record.restarts + 1
        deps.logs.mark(self.id, f"attempt {attempt}: {' '.join(launch.argv)}")
        age, path = _age(entry.record.created_at) or 0.0, deps.logs.path(self.id)
        self._startup.launch(
            age, path, backend.startup_phases, shared=shares_log(self.id, deps.registry.ids())
        )
        try:
            deps.containment.prepare(self.key)
        except OSError as exc:
            error = f"cannot create the worker's {deps.containment.kind}: {exc.strerror or exc}"
            deps.logs.mark(self.id, error)
            self._fail(error, None)
            return
        try:
            if (launch.user or launch.group) and os.geteuid() != 0:
                raise PermissionError(
                    errno.EPERM,
                    f"backend {entry.record.backend!r} sets user or group, "
                    "and only a hive running as root can switch to them",
                )
            self.process = await deps.spawner.start(launch, self._entered)
        except KeyError as exc:
            error = f"cannot start {launch.argv[0]!r}: this host has no {exc.args[0]}"
            deps.logs.mark(self.id, error)
            self._fail(error, None)
            return
        except ContainmentError as exc:  # it ran, uncontained: killed rather than lost track of
            deps.logs.mark(self.id, str(exc))
            self._fail(str(exc), None)
            return
        except OSError as exc:
            reason = exc.strerror or str(exc)
            error = f"cannot start {launch.argv[0]!r}: {reason}"
            deps.logs.mark(self.id, error)
            self._fail(error, None)
            self._unrunnable = exc.errno in _UNRUNNABLE
            return
        # A change like any other: the journal hears it and writes the pid soon.
        deps.registry.attempt_started(self.id, self.process.pid)
        log.info("worker %s started, pid %d", self.id, self.process.pid)

    async def _supervise(self) -> Outcome:
        """Watch one running process until it ends; record how it ended."""
        assert self.process is not None
        deps, process = self.deps, self.process
        entry = deps.registry.entry(self.id)
        backend = deps.backend(entry.record.backend)
        if backend is None:
            return await self._fail_and_kill(
                f"backend {entry.record.backend!r} is no longer configured"
            )
        exited = asyncio.shield(process.exited)
        stop = asyncio.ensure_future(self._stop.wait())
        waits: list[asyncio.Future[Any]] = [exited, stop]
        try:
            if not self._ready.is_set():
                ready = asyncio.ensure_future(self._ready.wait())
                probe = asyncio.ensure_future(self._probe_until_ready(backend))
                phases = asyncio.ensure_future(self._startup.follow())
                done = await deps.watch.first([*waits, ready], backend.startup_timeout)
                probe.cancel()
                phases.cancel()
                ready.cancel()
                if not done:
                    error = f"not ready after {backend.startup_timeout:g}s (startup_timeout)"
                    if self._probes.last is not None:
                        error += (
                            f"; its {backend.health_path} last answered {self._probes.last.detail}"
                        )
                    return await self._fail_and_kill(error)
            if not exited.done() and not stop.done():
                self._backoff = Backoff(self._backoff.delay, ready_since=time.monotonic())
                hung = asyncio.ensure_future(self._hung.wait())
                live = asyncio.ensure_future(self._probes.until_unhealthy(backend))
                load = asyncio.ensure_future(
                    self._probes.follow_load(backend, self._heartbeating, self._report_load)
                )
                model = entry.record.model
                stalled = asyncio.ensure_future(
                    until_stalled(self._probes, backend, self._heartbeating, lambda: model)
                )
                await asyncio.wait([*waits, hung, live, stalled], return_when=FIRST_COMPLETED)
                for task in (hung, live, load, stalled):
                    task.cancel()
                if not exited.done() and not stop.done():
                    if hung.done():
                        timeout = deps.config.heartbeat_timeout
                        return await self._fail_and_kill(f"hung: no heartbeat for {timeout:g}s")
                    for check in (live, stalled):
                        if check.done() and not check.cancelled() and check.result():
                            return await self._fail_and_kill(check.result())
            if stop.done():
                return await self._stop_process()
            return await self._exited()
        finally:
            stop.cancel()
            exited.cancel()
            self.disarm_hang_timer()

    # -- probes ---------------------------------------------------------------------------------

    def _heartbeating(self) -> bool:
        """The worker heartbeats in this attempt: its own word on busy beats the engine's."""
        return self._hang_timer.armed

    def _report_load(self, load: Load) -> None:
        self.deps.registry.engine_load(self.id, load.in_flight)

    async def _probe_until_ready(self, backend: BackendConfig) -> None:
        """Poll the health path until it answers 2xx, from a listener of the worker's own
        (:mod:`hive.workers.listener`); then the worker is ready."""
        check = listener_check(self) if backend.listener_check else None
        if await self._probes.until_ready(backend, check):
            self._startup.ready()
            self.deps.registry.became_ready(self.id)
            self._ready.set()

    # -- outcomes -------------------------------------------------------------------------------

    def _entered(self, pid: int) -> None:
        """On the spawning thread, the instant the process exists: into its containment, and
        the OOM kills its cgroup counted so far (what this attempt adds is its own)."""
        self._startup.exec()
        self.deps.containment.enter(self.key, pid)
        self._attempt = cause.Attempt(
            pid, time.monotonic(), self.deps.containment.oom_kills(self.key)
        )

    async def _exited(self) -> Outcome:
        """The process ended on its own: failed, whatever its code, while hive wants it running
        (a server that exits unasked is down); stopped when it exited cleanly otherwise."""
        assert self.process is not None
        deps, process = self.deps, self.process
        code = process.returncode
        path, kills = deps.logs.path(self.id), partial(deps.containment.oom_kills, self.key)
        oom, last = await asyncio.to_thread(cause.explain, self._attempt, code, path, kills)
        if shares_log(self.id, deps.registry.ids()):  # its last lines may be another's: none quoted
            last = None
        wanted = deps.registry.get(self.id).desired == "running" and not self._stop.is_set()
        error = cause.error_of_exit(code, wanted, oom, last)
        deps.logs.mark(self.id, describe_exit(code))
        if code == 0 and not wanted:
            deps.registry.attempt_ended(self.id, State.STOPPED, exit_code=0, error=error)
            log.info("worker %s exited by itself with code 0", self.id)
            self._sweep()
            return Outcome.EXITED
        self._fail(error, code)
        if deps.metrics is not None and process.exited_at is not None:
            deps.metrics.crash_detection.observe(time.monotonic() - process.exited_at)
        self._sweep()
        return Outcome.FAILED

    async def swept(self) -> None:
        """Until the last attempt's sweep is over (bounded: SIGTERM, 1 s, SIGKILL, 1 s) or a
        stop is asked for: no signal of an attempt can reach the next one."""
        if self._sweeps:
            swept = asyncio.ensure_future(asyncio.wait(set(self._sweeps)))  # never cancels them
            stop = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait([swept, stop], return_when=asyncio.FIRST_COMPLETED)
            swept.cancel()
            stop.cancel()

    def _sweep(self) -> None:
        """After the leader exits, end whatever it left behind in its session."""
        if self.process is not None:
            task = asyncio.create_task(self._end_tree(1.0, 1.0))
            self._sweeps.add(task)
            task.add_done_callback(self._sweeps.discard)

    async def _end_tree(self, timeout: float, kill_timeout: float = 5.0) -> bool:
        """End every process of the worker (SIGTERM, then SIGKILL after ``timeout``) and
        release its containment once empty; True when nothing of it is left."""
        assert self.process is not None
        containment = self.deps.containment
        gone = await terminate(self.process, timeout, kill_timeout, Group(containment, self.key))
        if gone:
            containment.release(self.key)
        else:
            log.error(
                "worker %s: processes %s outlived SIGKILL", self.id, containment.members(self.key)
            )
        return gone

    def _fail(self, error: str, code: int | None) -> None:
        self.deps.registry.attempt_ended(self.id, State.FAILED, exit_code=code, error=error)
        log.warning("worker %s failed: %s", self.id, error)

    async def _fail_and_kill(self, error: str) -> Outcome:
        """Record the failure first (routers hear at once), then end the tree."""
        assert self.process is not None
        deps = self.deps
        self._fail(error, None)
        deps.logs.mark(self.id, error)
        await self._end_tree(min(deps.config.stop_timeout, 5.0))
        deps.registry.exit_code_known(self.id, self.process.returncode)
        return Outcome.FAILED

    async def _drain(self) -> None:
        """Out of the routers first, then wait for in-flight requests to end
        (:func:`hive.workers.drain.until_drained`)."""
        assert self.process is not None
        deps, process, registry = self.deps, self.process, self.deps.registry
        if deps.upstream is not None:
            await deps.upstream.withdraw(self.id)
        if deps.config.drain_timeout <= 0:
            return
        engine = self._load_reported_by_engine()
        await until_drained(
            self.id,
            lambda: registry.get(self.id).in_flight,
            None if engine is None else partial(self._read_load, engine),
            lambda: process.running,
            deps.config.drain_timeout,
            partial(registry.set_draining, self.id),
        )

    def _load_reported_by_engine(self) -> BackendConfig | None:
        """The backend, when its engine's load endpoint (not heartbeats) says how busy it is."""
        backend = self.deps.backend(self.deps.registry.get(self.id).backend)
        if backend is None or backend.load is None or not self._ready.is_set():
            return None
        return None if self._heartbeating() else backend

    async def _read_load(self, backend: BackendConfig) -> bool:
        """Read the engine's load once and report it; whether the engine answered."""
        if (load := await self._probes.read_load(backend)) is None:
            return False
        self._report_load(load)
        return True

    async def _stop_process(self) -> Outcome:
        assert self.process is not None
        deps = self.deps
        await self._drain()
        timeout = self._stop_timeout if self._stop_timeout is not None else deps.config.stop_timeout
        if deps.memory is not None:  # its last peak, before it is signalled
            await deps.memory.sample(self.id)
        gone = await self._end_tree(timeout)
        code = self.process.returncode
        deps.logs.mark(self.id, f"stopped: {describe_exit(code)}")
        error = None if gone else "some processes of the worker could not be killed"
        deps.registry.attempt_ended(self.id, State.STOPPED, exit_code=code, error=error)
        log.info("worker %s stopped (%s)", self.id, describe_exit(code))
        return Outcome.STOPPED

    # -- liveness by heartbeat ------------------------------------------------------------------

    def arm_hang_timer(self) -> None:
        """A heartbeat came: the worker hangs if none follows within ``heartbeat_timeout`` (of
        hive's own running time: :class:`hive.workers.stall.HangTimer`)."""
        self._hang_timer.arm(self.deps.config.heartbeat_timeout)

    def disarm_hang_timer(self) -> None:
        self._hang_timer.disarm()

"""The supervisor: the only code that starts, watches, restarts and stops worker processes.

Each worker has one lifecycle task. It starts the process, waits for the first of: the process
exiting (noticed through its pidfd the moment it happens), the worker becoming ready (its health
probe answers 2xx or it heartbeats ``ready``), the startup timeout, a hang (heartbeats stopped
for ``heartbeat_timeout``) or a stop request; records each outcome in the registry; and applies
the restart policy with a doubling back-off. Every state change goes through the registry,
which tells its subscribers in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from enum import Enum
from typing import Any

import aiohttp
import psutil

from hive.config import BackendConfig, Config
from hive.devices.placement import Placer
from hive.errors import Conflict, Invalid
from hive.journal import Journal, Saved
from hive.logs import Logs
from hive.metrics import Metrics
from hive.models import DOWN_STATES, LIVE_STATES, Heartbeat, SpawnRequest, State, Worker
from hive.ports import PortPool
from hive.process import Launch, Process, Spawner, describe_exit, start_time, terminate
from hive.registry import Change, Entry, Registry, UnknownWorker, now
from hive.routers import RouterSync
from hive.timeouts import within

log = logging.getLogger("hive.supervisor")

#: hive's own variables that a worker must not inherit.
_SCRUBBED_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "HIVE_TOKEN",
    "HIVE_CONFIG",
)
_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=2.0)
#: A worker whose process is gone uses nothing.
_NO_USAGE: dict[str, Any] = {"rss_bytes": None, "cpu_percent": None, "gpu_memory_used_mib": None}


class Outcome(Enum):
    STOPPED = "stopped"  # asked to stop, and it did
    EXITED = "exited"  # exited with code 0 on its own
    FAILED = "failed"  # crashed, hung, never became ready, or could not start


@dataclass(eq=False)
class _Run:
    """What the supervisor holds about a worker's process while its lifecycle runs."""

    id: str
    process: Process | None = None
    task: asyncio.Task[None] | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stop_timeout: float | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    hung: asyncio.Event = field(default_factory=asyncio.Event)
    hang_timer: asyncio.TimerHandle | None = None
    delay: float = 0.0
    ready_since: float | None = None


class Supervisor:
    """Starts, watches, restarts and stops workers; tells the registry everything."""

    def __init__(
        self,
        config: Config,
        registry: Registry,
        placer: Placer,
        logs: Logs,
        api_url: str,
        metrics: Metrics | None = None,
        journal: Journal | None = None,
        upstream: RouterSync | None = None,
    ) -> None:
        self.config = config
        self.upstream = upstream
        self.metrics = metrics
        self.journal = journal
        self.registry = registry
        self.placer = placer
        self.logs = logs
        self.api_url = api_url
        self.ports = PortPool(*config.port_range)
        self._spawner = Spawner()
        self._runs: dict[str, _Run] = {}
        self._http: aiohttp.ClientSession | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._closing = False

    # -- life of the supervisor itself ---------------------------------------------------------

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=_PROBE_TIMEOUT)
        self._housekeeping = asyncio.create_task(self._housekeep(), name="hive-housekeeping")

    async def close(self, detach: bool | None = None) -> None:
        """Stop every worker (``on_exit = "stop"``) or leave them running (``"detach"``)."""
        self._closing = True
        if detach is None:
            detach = self.config.on_exit == "detach"
        if self._housekeeping:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        runs = [r for r in self._runs.values() if r.task and not r.task.done()]
        if not detach:
            for run in runs:
                self._request_stop(run, None)
            await asyncio.gather(*(r.task for r in runs if r.task), return_exceptions=True)
        else:
            for run in runs:
                if run.task:
                    run.task.cancel()
                if run.process:
                    run.process.detach()
            await asyncio.gather(*(r.task for r in runs if r.task), return_exceptions=True)
        if self._http:
            await self._http.close()
        self._spawner.close()

    # -- adoption ------------------------------------------------------------------------------

    def adopt(self, saved: list[Saved]) -> dict[str, int]:
        """Take back what the previous hive left: running workers keep running.

        A process still alive with the same pid and start time is adopted as it is, its exit
        watched through a pidfd. One that is gone is recorded as failed and its restart policy
        applies. Stopped and failed records come back as they were.
        """
        counts = {"adopted": 0, "gone": 0, "restored": 0}
        for item in saved:
            record = item.record
            if record.id in self.registry:
                continue
            process = None
            if record.state in LIVE_STATES and record.pid is not None:
                process = _reattach(record.pid, item.start_time)
                if process is None:
                    counts["gone"] += 1
                    record = record.model_copy(
                        update={
                            "state": State.FAILED,
                            "pid": None,
                            "exit_code": None,
                            "in_flight": None,
                            "stopped_at": now(),
                            "error": "exited while hive was not running (exit status unknown)",
                        }
                    )
                    log.warning("worker %s (pid %s) is gone: failed", record.id, item.record.pid)
            self.registry.restore(item.spec, item.token, record)
            run = _Run(record.id)
            self._runs[record.id] = run
            if process is not None:
                counts["adopted"] += 1
                run.process = process
                if self.journal is not None and record.pid is not None:
                    self.journal.remember_start_time(record.id, record.pid, item.start_time)
                if record.state in (State.READY, State.BUSY):
                    run.ready.set()
                if record.last_heartbeat_at is not None:
                    self._arm_hang_timer(run)
                run.task = asyncio.create_task(self._lifecycle(run), name=f"worker-{run.id}")
                log.info("adopted worker %s, pid %d, %s", record.id, process.pid, record.state)
                continue
            if record.state not in LIVE_STATES:
                counts["restored"] += 1
            pending = record.state == State.FAILED and record.desired == "running"
            if pending and (record.next_restart_at is not None or item.record.pid is not None):
                run.task = asyncio.create_task(
                    self._lifecycle(run, Outcome.FAILED), name=f"worker-{run.id}"
                )
        return counts

    # -- requests ------------------------------------------------------------------------------

    async def spawn(self, spec: SpawnRequest) -> Worker:
        """Place, reserve and start a new worker; returns its record once it has a pid."""
        self._refuse_if_closing()
        backend_name = spec.backend or self.config.default_backend
        backend = self._backend(backend_name)
        worker_id = spec.id or self._new_id(spec.model)
        restart = spec.restart or self.config.default_restart
        spec = spec.model_copy(
            update={"backend": backend_name, "id": worker_id, "restart": restart}
        )

        def build(entries: Mapping[str, Entry]) -> dict[str, Any]:
            if worker_id in entries:
                raise Conflict(f"id: worker {worker_id!r} already exists")
            return {
                "id": worker_id,
                "model": spec.model,
                "backend": backend_name,
                "labels": spec.labels,
                "restart": restart,
                "desired": "running",
                **self._reserve(spec, backend_name, backend, entries, worker_id, None),
            }

        self.registry.add(spec, secrets.token_urlsafe(24), build)
        await self._start(worker_id)
        await self._persist()
        return self.registry.get(worker_id)

    async def _start(self, worker_id: str) -> None:
        """Start the process of a record in ``starting``, and the task that watches it."""
        run = _Run(worker_id)
        self._runs[worker_id] = run
        await self._launch(run)
        run.task = asyncio.create_task(self._lifecycle(run), name=f"worker-{worker_id}")

    async def _persist(self) -> None:
        """Answer only once the journal holds the change: a hive crash right after a reply
        must not forget a worker it just started, or restart one it was told to stop."""
        if self.journal is not None:
            self.journal.mark()  # fields changed without a state change count too (desired)
            await self.journal.flush()

    async def stop(
        self, worker_id: str, timeout: float | None = None, wait: bool = False
    ) -> Worker:
        """Stop gracefully; the record stays, ``stopped``. Idempotent."""
        record = self.registry.get(worker_id)
        run = self._runs.get(worker_id)
        if record.desired != "stopped":
            record = self.registry.update(worker_id, desired="stopped", next_restart_at=None)
        if run is not None and run.task is not None and not run.task.done():
            self._request_stop(run, timeout)
            if wait:
                await asyncio.shield(run.task)
                record = self.registry.get(worker_id)
        await self._persist()
        return record

    async def restart(self, worker_id: str) -> Worker:
        """Stop the worker if it runs, then start it again (the same id, port when free)."""
        self._refuse_if_closing()
        await self.stop(worker_id, wait=True)
        run = self._runs.get(worker_id)
        if run is not None and run.task is not None and not run.task.done():
            raise Conflict(f"worker {worker_id!r} is changing state; try again")
        self._begin_attempt(worker_id, restarts_delta=1)
        await self._start(worker_id)
        await self._persist()
        return self.registry.get(worker_id)

    async def delete(self, worker_id: str) -> Worker:
        """Stop the worker if it runs, then forget it and its log."""
        await self.stop(worker_id, wait=True)
        record = self.registry.remove(worker_id)
        self._runs.pop(worker_id, None)
        self.logs.remove(worker_id)
        await self._persist()
        return record

    def heartbeat(self, worker_id: str, beat: Heartbeat) -> Worker:
        """Take a worker's report of itself: ready or busy, and how many requests in flight."""
        record = self.registry.get(worker_id)
        if record.state in DOWN_STATES:
            raise Conflict(f"worker {worker_id!r} is {record.state}", worker=record)
        fields: dict[str, Any] = {"last_heartbeat_at": now(), "in_flight": beat.in_flight}
        run = self._runs.get(worker_id)
        if record.state == State.STARTING:
            record = self.registry.transition(worker_id, State.READY, ready_at=now(), **fields)
            if run is not None:
                run.ready.set()
        target = State(beat.state)
        if record.state != target:
            record = self.registry.transition(worker_id, target, **fields)
        else:
            record = self.registry.update(worker_id, **fields)
        if run is not None:
            self._arm_hang_timer(run)
        return record

    async def wait_until(
        self, worker_id: str, done: Callable[[Worker], bool], timeout: float
    ) -> Worker:
        """Wait (at most ``timeout`` s) until ``done(record)`` holds; returns the record."""
        loop = asyncio.get_running_loop()
        reached: asyncio.Future[Worker] = loop.create_future()

        def on_change(change: Change) -> None:
            if change.id == worker_id and (change.to is None or done(change.worker)):
                loop.call_soon_threadsafe(_settle, reached, change.worker)

        unsubscribe = self.registry.subscribe(on_change)
        try:
            record = self.registry.get(worker_id)
            if done(record):
                return record
            settled = await within(reached, timeout)
            return settled.result() if settled is not None else self.registry.get(worker_id)
        finally:
            unsubscribe()

    @property
    def closing(self) -> bool:
        """True once hive has begun shutting down."""
        return self._closing

    def _refuse_if_closing(self) -> None:
        if self._closing:
            raise Conflict("hive is shutting down")

    def worker_token(self, worker_id: str) -> str | None:
        try:
            return self.registry.entry(worker_id).token
        except UnknownWorker:
            return None

    def is_settled(self, worker_id: str) -> bool:
        """True when the worker's process is gone and no restart is coming."""
        run = self._runs.get(worker_id)
        return run is None or run.task is None or run.task.done()

    # -- placement -----------------------------------------------------------------------------

    def _backend(self, name: str) -> BackendConfig:
        try:
            return self.config.backends[name]
        except KeyError:
            known = ", ".join(sorted(self.config.backends))
            raise Invalid(f"backend: no backend {name!r} (configured: {known})") from None

    def _new_id(self, model: str) -> str:
        stem = "".join(c if c.isalnum() else "-" for c in model.rsplit("/", 1)[-1].lower())
        stem = stem.strip("-")[:40] or "worker"
        while True:
            worker_id = f"{stem}-{secrets.token_hex(3)}"
            if worker_id not in self.registry:
                return worker_id

    def _reserve(
        self,
        spec: SpawnRequest,
        backend_name: str,
        backend: BackendConfig,
        entries: Mapping[str, Entry],
        worker_id: str,
        previous_port: int | None,
    ) -> dict[str, Any]:
        placement = self.placer.place(spec, backend_name, backend, entries, worker_id)
        port = self.ports.allocate(entries, worker_id, wanted=spec.port, previous=previous_port)
        host = self.config.worker_host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return {
            "device": placement.device,
            "cpus": placement.cpus,
            "gpus": placement.gpus,
            "port": port,
            "url": f"http://{host}:{port}",
        }

    def _begin_attempt(self, worker_id: str, restarts_delta: int) -> Worker:
        """``stopped``/``failed`` -> ``starting``, reserving port and devices anew."""
        entry = self.registry.entry(worker_id)
        spec = entry.spec
        backend_name = spec.backend or self.config.default_backend
        backend = self._backend(backend_name)

        def build(entries: Mapping[str, Entry]) -> dict[str, Any]:
            return self._reserve(spec, backend_name, backend, entries, worker_id, entry.record.port)

        return self.registry.transition(
            worker_id,
            State.STARTING,
            expect=DOWN_STATES,
            build=build,  # type: ignore[arg-type]
            restarts=entry.record.restarts + restarts_delta,
            desired="running",
            error=None,
            exit_code=None,
            pid=None,
            next_restart_at=None,
            ready_at=None,
            stopped_at=None,
            in_flight=None,
            last_heartbeat_at=None,
        )

    # -- one attempt ---------------------------------------------------------------------------

    def _launch_for(self, entry: Entry) -> Launch:
        record, spec = entry.record, entry.spec
        backend = self._backend(record.backend)
        values = {
            "model": spec.model,
            "port": str(record.port),
            "host": self.config.worker_host,
            "python": sys.executable,
            "id": record.id,
            "device": record.device,
            "gpus": str(len(record.gpus)),
            "ncpus": str(len(record.cpus)),
            "state_dir": str(self.config.state_path),
        }
        argv = [arg.format_map(values) for arg in backend.command] + list(spec.args)
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        env.update(backend.env)
        env.update(spec.env)
        env.update(
            {
                "HIVE_WORKER_ID": record.id,
                "HIVE_MODEL": spec.model,
                "HIVE_PORT": str(record.port),
                "HIVE_DEVICE": record.device,
                "HIVE_URL": self.api_url,
                "HIVE_WORKER_TOKEN": entry.token,
                "HIVE_HEARTBEAT_INTERVAL": f"{self.config.heartbeat_timeout / 3:g}",
                "CUDA_VISIBLE_DEVICES": ",".join(record.gpus),
                "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            }
        )
        if spec.cpus is not None:
            env["OMP_NUM_THREADS"] = str(len(record.cpus))
        cpus = frozenset(record.cpus) if record.cpus else None
        return Launch(argv, env, self.logs.path(record.id), cpus)

    async def _launch(self, run: _Run) -> None:
        """Start the process of a record in ``starting``; a failure to exec makes it failed."""
        entry = self.registry.entry(run.id)
        launch = self._launch_for(entry)
        attempt = entry.record.restarts + 1
        self.logs.mark(run.id, f"attempt {attempt}: {' '.join(launch.argv)}")
        try:
            run.process = await self._spawner.start(launch)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            error = f"cannot start {launch.argv[0]!r}: {reason}"
            self.logs.mark(run.id, error)
            self._fail(run.id, error, None)
            return
        self.registry.update(run.id, pid=run.process.pid, started_at=now())
        if self.journal is not None:
            self.journal.mark()  # the pid must reach the disk before anything else can happen
        log.info("worker %s started, pid %d", run.id, run.process.pid)

    async def _lifecycle(self, run: _Run, first: Outcome | None = None) -> None:
        outcome = first
        while True:
            if outcome is None:
                outcome = await self._supervise(run) if run.process else Outcome.FAILED
            delay = self._restart_delay(run, outcome)
            outcome = None
            if delay is None or self._closing:
                return
            due = now() + timedelta(seconds=delay)
            self.registry.update(run.id, next_restart_at=due)
            await within(run.stop.wait(), delay)
            if run.stop.is_set() or self._closing:
                self.registry.update(run.id, next_restart_at=None)
                return
            self._reset_attempt(run)
            self._begin_attempt(run.id, restarts_delta=1)
            await self._launch(run)

    def _reset_attempt(self, run: _Run) -> None:
        run.process = None
        run.ready.clear()
        run.hung.clear()
        run.ready_since = None
        self._disarm_hang_timer(run)

    def _restart_delay(self, run: _Run, outcome: Outcome) -> float | None:
        """Seconds until the next attempt, or None when the policy says no more."""
        record = self.registry.get(run.id)
        if outcome is Outcome.STOPPED or record.desired == "stopped":
            return None
        if record.restart == "no" or (record.restart == "on-failure" and outcome is Outcome.EXITED):
            return None
        limit = self.config.max_restarts
        if limit is not None and record.restarts >= limit:
            error = f"{record.error or 'exited'}; gave up after {limit} restarts"
            self.registry.update(run.id, error=error)
            return None
        stable = run.ready_since is not None and (
            time.monotonic() - run.ready_since >= self.config.restart_reset_after
        )
        if stable or run.delay == 0:
            run.delay = self.config.restart_delay
        else:
            run.delay = min(run.delay * 2, self.config.restart_delay_max)
        return run.delay

    async def _supervise(self, run: _Run) -> Outcome:
        """Watch one running process until it ends; record how it ended."""
        assert run.process is not None
        process = run.process
        backend = self._backend(self.registry.get(run.id).backend)
        exited = asyncio.shield(process.exited)
        stop = asyncio.ensure_future(run.stop.wait())
        waits: list[asyncio.Future[Any]] = [exited, stop]
        try:
            if not run.ready.is_set():
                ready = asyncio.ensure_future(run.ready.wait())
                probe = asyncio.ensure_future(self._probe_until_ready(run, backend))
                done, _ = await asyncio.wait(
                    [*waits, ready],
                    timeout=backend.startup_timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                probe.cancel()
                ready.cancel()
                if not done:
                    error = f"not ready after {backend.startup_timeout:g}s (startup_timeout)"
                    return await self._fail_and_kill(run, error)
            if not exited.done() and not stop.done():
                run.ready_since = time.monotonic()
                hung = asyncio.ensure_future(run.hung.wait())
                live = asyncio.ensure_future(self._probe_liveness(run, backend))
                await asyncio.wait([*waits, hung, live], return_when=asyncio.FIRST_COMPLETED)
                hung.cancel()
                live.cancel()
                if not exited.done() and not stop.done():
                    if hung.done():
                        timeout = self.config.heartbeat_timeout
                        error = f"hung: no heartbeat for {timeout:g}s"
                        return await self._fail_and_kill(run, error)
                    if live.done() and not live.cancelled() and live.result():
                        return await self._fail_and_kill(run, live.result())
            if stop.done():
                return await self._stop_process(run)
            return self._exited(run)
        finally:
            stop.cancel()
            exited.cancel()
            self._disarm_hang_timer(run)

    async def _probe_until_ready(self, run: _Run, backend: BackendConfig) -> None:
        """Poll the health path until it answers 2xx; then the worker is ready."""
        if backend.health_path is None or self._http is None:
            return
        port = self.registry.get(run.id).port
        url = f"http://127.0.0.1:{port}{backend.health_path}"
        started = time.monotonic()
        while True:
            try:
                async with self._http.get(url) as response:
                    if 200 <= response.status < 300:
                        self._mark_ready(run)
                        return
            except (aiohttp.ClientError, TimeoutError, OSError):
                pass
            await asyncio.sleep(0.05 if time.monotonic() - started < 10 else 0.5)

    async def _probe_liveness(self, run: _Run, backend: BackendConfig) -> str | None:
        """Probe a ready worker's health path; the error once it failed too often in a row."""
        if backend.health_path is None or self._http is None:
            await asyncio.Event().wait()  # nothing to probe: wait to be cancelled
            return None
        url = f"http://127.0.0.1:{self.registry.get(run.id).port}{backend.health_path}"
        failures = 0
        period = timedelta(seconds=backend.liveness_period)
        while True:
            await asyncio.sleep(backend.liveness_period)
            beat = self.registry.get(run.id).last_heartbeat_at
            if beat is not None and now() - beat < period:
                failures = 0  # it heartbeated within the period: that is proof enough of life
                continue
            try:
                async with self._http.get(url) as response:
                    problem = None if 200 <= response.status < 300 else f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                problem = str(exc) or type(exc).__name__
            failures = failures + 1 if problem else 0
            if failures >= backend.liveness_failures:
                return (
                    f"unhealthy: {backend.health_path} failed {failures} times in a row "
                    f"(last: {problem})"
                )

    def _mark_ready(self, run: _Run) -> None:
        with contextlib.suppress(Exception):
            record = self.registry.get(run.id)
            if record.state == State.STARTING:
                self.registry.transition(run.id, State.READY, expect=State.STARTING, ready_at=now())
        run.ready.set()

    def _exited(self, run: _Run) -> Outcome:
        """The process ended on its own: failed, or stopped when it exited cleanly."""
        assert run.process is not None
        code = run.process.returncode
        last = self.logs.last_line(run.id)
        error = describe_exit(code) + (f": {last}" if last else "")
        self.logs.mark(run.id, describe_exit(code))
        if code == 0:
            self.registry.transition(
                run.id,
                State.STOPPED,
                pid=None,
                exit_code=0,
                error=error,
                stopped_at=now(),
                in_flight=None,
                **_NO_USAGE,
            )
            log.info("worker %s exited by itself with code 0", run.id)
            self._sweep(run)
            return Outcome.EXITED
        self._fail(run.id, error, code)
        if self.metrics is not None and run.process.exited_at is not None:
            self.metrics.crash_detection.observe(time.monotonic() - run.process.exited_at)
        self._sweep(run)
        return Outcome.FAILED

    def _sweep(self, run: _Run) -> None:
        """After the leader exits, end whatever it left behind in its session."""
        if run.process is not None:
            task = asyncio.create_task(terminate(run.process, 1.0, 1.0))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    def _fail(self, worker_id: str, error: str, code: int | None) -> None:
        record = self.registry.get(worker_id)
        if record.state in LIVE_STATES:
            self.registry.transition(
                worker_id,
                State.FAILED,
                pid=None,
                exit_code=code,
                error=error,
                stopped_at=now(),
                in_flight=None,
                **_NO_USAGE,
            )
        log.warning("worker %s failed: %s", worker_id, error)

    async def _fail_and_kill(self, run: _Run, error: str) -> Outcome:
        """Record the failure first (routers hear at once), then end the tree."""
        assert run.process is not None
        self._fail(run.id, error, None)
        self.logs.mark(run.id, error)
        await terminate(run.process, min(self.config.stop_timeout, 5.0))
        self.registry.update(run.id, exit_code=run.process.returncode)
        return Outcome.FAILED

    async def _drain(self, run: _Run) -> None:
        """Out of the routers first, then wait for in-flight requests (from heartbeats) to end."""
        assert run.process is not None
        if self.upstream is not None:
            await self.upstream.withdraw(run.id)
        record = self.registry.get(run.id)
        if not record.in_flight or self.config.drain_timeout <= 0:
            return
        self.registry.update(run.id, draining=True)
        log.info("worker %s draining %d request(s)", run.id, record.in_flight)
        deadline = time.monotonic() + self.config.drain_timeout
        try:
            while time.monotonic() < deadline and run.process.running:
                if not self.registry.get(run.id).in_flight:
                    break
                await asyncio.sleep(0.05)
        finally:
            self.registry.update(run.id, draining=False)

    async def _stop_process(self, run: _Run) -> Outcome:
        assert run.process is not None
        await self._drain(run)
        timeout = run.stop_timeout if run.stop_timeout is not None else self.config.stop_timeout
        gone = await terminate(run.process, timeout)
        code = run.process.returncode
        self.logs.mark(run.id, f"stopped: {describe_exit(code)}")
        error = None if gone else "some processes of the worker could not be killed"
        self.registry.transition(
            run.id,
            State.STOPPED,
            pid=None,
            exit_code=code,
            error=error,
            stopped_at=now(),
            in_flight=None,
            **_NO_USAGE,
        )
        log.info("worker %s stopped (%s)", run.id, describe_exit(code))
        return Outcome.STOPPED

    def _request_stop(self, run: _Run, timeout: float | None) -> None:
        run.stop_timeout = timeout
        run.stop.set()

    # -- liveness by heartbeat -----------------------------------------------------------------

    def _arm_hang_timer(self, run: _Run) -> None:
        self._disarm_hang_timer(run)
        loop = asyncio.get_running_loop()
        run.hang_timer = loop.call_later(self.config.heartbeat_timeout, run.hung.set)

    def _disarm_hang_timer(self, run: _Run) -> None:
        if run.hang_timer is not None:
            run.hang_timer.cancel()
            run.hang_timer = None

    # -- housekeeping --------------------------------------------------------------------------

    async def _housekeep(self) -> None:
        """Once a second: cap log files and forget records past ``retention``."""
        while True:
            await asyncio.sleep(1.0)
            try:
                for worker_id in self.registry.expire():
                    self._runs.pop(worker_id, None)
                    self.logs.remove(worker_id)
                for record in self.registry.list():
                    if record.state in LIVE_STATES:
                        self.logs.cap(record.id)
            except Exception:
                log.exception("housekeeping failed")


def _reattach(pid: int, started: float | None) -> Process | None:
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


def _is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _settle(future: asyncio.Future[Worker], record: Worker) -> None:
    if not future.done():
        future.set_result(record)

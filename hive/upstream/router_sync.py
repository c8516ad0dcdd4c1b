"""Router sync: keep every configured upstream router in step with this hive's workers.

hive is the single source of truth for its workers and pushes each change upstream the moment
it happens: a worker that becomes ready is registered; one that fails is removed the moment the
failure is noticed; one being stopped is removed *before* it is signalled (and then drained), so
no further request reaches it. A reconcile loop per router repairs the rest: it re-registers
what a restarted router forgot, removes what the router still holds of this hive's dead workers,
and retries with back-off while the router is down. It only ever touches entries whose URL
belongs to this hive (the advertised host and a port in this hive's ``port_range``), so several
hives can share one router.

Registration and removal are jobs in the router (see :mod:`hive.upstream.sglang_router`): hive
follows each until the worker is listed (or gone), records the router's view in the worker's sync
status (``pending``, ``registered``, ``failed: <why>``, ``removal pending``, ``removed``), never
sends the same worker again while a job for it is pending, and after a failed job waits before
trying again, per worker, from 2 s doubling to 5 minutes. One misconfigured backend can so
never fill the router's ten job slots.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp

from hive.config import BackendConfig, Config, RouterConfig
from hive.errors import RouterError, UnknownBackend
from hive.models import State, Worker
from hive.state.metrics import Metrics
from hive.state.registry import Change, Registry, UnknownWorker
from hive.timeouts import within
from hive.upstream.sglang_router import JobState, SglangRouter, registration

log = logging.getLogger("hive.router_sync")

_TIMEOUT = aiohttp.ClientTimeout(total=5)
#: A failed job is tried again after 2 s, then 4 s, 8 s... at most 5 minutes.
_RETRY_FIRST, _RETRY_MAX = 2.0, 300.0
#: A pending job is looked at after 50 ms, then less and less often, at most every 2 s.
_POLL_FIRST, _POLL_MAX = 0.05, 2.0


@dataclass
class _Job:
    """A job of the router's for one worker URL that hive follows."""

    kind: Literal["add", "remove"]
    router_id: str
    worker_id: str
    task: asyncio.Task[None] | None = None


@dataclass
class _Router:
    config: RouterConfig
    client: SglangRouter
    known: dict[str, str] = field(default_factory=dict)  # worker url -> the router's id
    jobs: dict[str, _Job] = field(default_factory=dict)  # worker url -> its pending job
    failures: dict[str, int] = field(default_factory=dict)  # worker url -> failed jobs in a row
    not_before: dict[str, float] = field(default_factory=dict)  # worker url -> next try
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class RouterSync:
    """One reconcile loop per router, plus immediate register/remove on registry changes.

    About 340 lines: registration, removal, the jobs that follow both and the reconcile loop
    share one per-router state, kept in one class so that no two paths can post the same job.
    """

    def __init__(
        self,
        config: Config,
        registry: Registry,
        metrics: Metrics | None = None,
        interval: float | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.registry = registry
        self.interval = interval or config.router_reconcile
        self._session: aiohttp.ClientSession | None = None
        self._routers: list[_Router] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._pending: set[asyncio.Task[Any]] = set()

    @property
    def enabled(self) -> bool:
        return bool(self.config.routers)

    def start(self) -> None:
        if not self.enabled:
            return
        self._begin(self.config)

    def _begin(self, config: Config) -> None:
        self._loop = asyncio.get_running_loop()
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=_TIMEOUT)
        for router_config in config.routers:
            router = _Router(router_config, SglangRouter(router_config, self._session))
            router.task = asyncio.create_task(self._reconcile_loop(router), name="hive-router")
            self._routers.append(router)
        self._unsubscribe = self.registry.subscribe(self._on_change)

    def reload(self, config: Config) -> None:
        """A new configuration (SIGHUP): routers added or removed start or stop syncing."""
        old = self.config
        self.config = config
        if config.routers == old.routers:
            return
        for router in self._routers:
            self._cancel(router)
        self._routers = []
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if config.routers:
            self._begin(config)
        log.info("routers now: %s", ", ".join(r.url for r in config.routers) or "none")

    def _cancel(self, router: _Router) -> None:
        if router.task is not None:
            router.task.cancel()
        for job in router.jobs.values():
            if job.task is not None:
                job.task.cancel()

    async def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        for router in self._routers:
            self._cancel(router)
        tasks = [r.task for r in self._routers if r.task is not None] + list(self._pending)
        tasks += [j.task for r in self._routers for j in r.jobs.values() if j.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # -- which URLs are ours -------------------------------------------------------------------

    def url_of(self, router: _Router, worker: Worker) -> str:
        return f"http://{router.config.advertise_host}:{worker.port}"

    def _ours(self, router: _Router, url: str) -> bool:
        parts = urlsplit(url)
        low, high = self.config.port_range
        return (
            parts.hostname == router.config.advertise_host
            and parts.port is not None
            and low <= parts.port <= high
        )

    def _wanted(self, router: _Router) -> dict[str, Worker]:
        return {
            self.url_of(router, w): w
            for w in self.registry.list()
            if w.state in (State.READY, State.BUSY)
            and w.desired == "running"
            and self._registers(w.id)
        }

    def _registers(self, worker_id: str) -> bool:
        try:
            return self.registry.entry(worker_id).spec.register_
        except UnknownWorker:
            return False

    def _backend(self, worker: Worker) -> BackendConfig | None:
        """The worker's backend; None once a reload took it out of the configuration."""
        try:
            return self.config.backend(worker.backend)
        except UnknownBackend:
            return None

    def _api_key(self, worker: Worker) -> str | None:
        """The key the router must use for this worker: its backend's ``api_key``, or the
        contents of ``api_key_file``. Never logged, never in a record."""
        backend = self._backend(worker)
        if backend is None:
            return None
        try:
            return backend.read_api_key()
        except OSError as exc:
            log.error("backend %s: cannot read api_key_file: %s", worker.backend, exc)
            return None

    # -- immediate reactions -------------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        # On the loop (the registry delivers there): start the job, never wait for it here.
        if self._loop is None or change.renamed_to is not None:
            return  # a successor taking its worker's id: the same process, still registered
        worker = change.worker
        if change.fields_only:
            # Of the changes of fields, only an operator's stop matters here (the router
            # statuses this class records are changes too, and must not start a job).
            before = change.before
            if worker.desired == "stopped" and before is not None and before.desired != "stopped":
                self._spawn_task(self._withdraw(worker))
            return
        if change.to in (State.READY, State.BUSY) and change.from_ == State.STARTING:
            self._spawn_task(self._register(worker))
        elif change.to in (State.FAILED, State.STOPPED, None) or worker.desired == "stopped":
            self._spawn_task(self._withdraw(worker))

    def _spawn_task(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _register(self, worker: Worker) -> None:
        if not self._registers(worker.id):
            return
        for router in self._routers:
            await self._add(router, worker)

    async def _add(self, router: _Router, worker: Worker) -> None:
        """Send the registration, unless one is pending or the last failed too recently."""
        url = self.url_of(router, worker)
        if url in router.jobs or time.monotonic() < router.not_before.get(url, 0.0):
            return  # never twice while pending; a failed one waits its turn
        body = registration(url, worker, self._backend(worker), self._api_key(worker))
        self._count_request(router, "add")
        try:
            router_id = await router.client.add(body)
        except RouterError as exc:
            if exc.status is None:
                self._status(worker.id, router, f"pending: {exc}")
                router.wake.set()  # unreachable: the reconcile loop retries with back-off
            else:
                self._failed(router, worker.id, url, str(exc))  # refused: back off, then retry
            return
        router.known[url] = router_id
        self._status(worker.id, router, "pending")
        self._follow(router, url, _Job("add", router_id, worker.id))

    def _follow(self, router: _Router, url: str, job: _Job) -> None:
        router.jobs[url] = job
        job.task = asyncio.create_task(self._watch(router, url, job), name="hive-router-job")

    async def _watch(self, router: _Router, url: str, job: _Job) -> None:
        """Follow one job until the router has finished it (or lost it)."""
        delay = _POLL_FIRST
        try:
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, _POLL_MAX)
                try:
                    state = await router.client.job(job.router_id)
                except RouterError:
                    continue  # unreachable for now: the job goes on in the router
                finished = state.state != "pending" or job.kind == "remove"
                if finished and self._done(router, url, job, state):
                    return
        finally:
            if router.jobs.get(url) is job:
                del router.jobs[url]

    def _done(self, router: _Router, url: str, job: _Job, state: JobState) -> bool:
        """Record how a job ended; False while a removal is still under way."""
        if job.kind == "remove":
            if state.state != "gone":
                self._status(job.worker_id, router, "removal pending")
                return False
            self._removed(router, url, job.worker_id)
            return True
        if state.state == "registered":
            router.failures.pop(url, None)
            router.not_before.pop(url, None)
            self._status(job.worker_id, router, "registered")
            self._count_job(router, "registered")
            log.info("worker %s registered with %s", job.worker_id, router.config.url)
            return True
        reason = state.message if state.state == "failed" else "the router lost the job"
        self._failed(router, job.worker_id, url, reason)
        return True

    def _removed(self, router: _Router, url: str, worker_id: str) -> None:
        router.known.pop(url, None)
        self._status(worker_id, router, "removed")
        self._count_job(router, "removed")
        log.info("worker %s removed from %s", worker_id, router.config.url)

    def _failed(self, router: _Router, worker_id: str, url: str, reason: str) -> None:
        failures = router.failures.get(url, 0) + 1
        router.failures[url] = failures
        delay = min(_RETRY_FIRST * 2 ** (failures - 1), _RETRY_MAX)
        router.not_before[url] = time.monotonic() + delay
        self._status(worker_id, router, f"failed: {reason}")
        self._count_job(router, "failed")
        if failures == 1:
            log.warning(
                "worker %s: %s did not register it: %s", worker_id, router.config.url, reason
            )
        if self._loop is not None:
            self._loop.call_later(delay, router.wake.set)

    async def _withdraw(self, worker: Worker) -> None:
        await asyncio.gather(*(self._remove(router, worker) for router in self._routers))

    async def _remove(self, router: _Router, worker: Worker) -> None:
        url = self.url_of(router, worker)
        pending = router.jobs.get(url)
        if pending is not None and pending.kind == "remove":
            return  # already on its way out
        if pending is not None and pending.task is not None:
            pending.task.cancel()  # its registration no longer matters
        router.failures.pop(url, None)
        router.not_before.pop(url, None)
        router_id = router.known.get(url)
        if router_id is None:
            router.wake.set()  # not known: the next reconcile finds and removes it
            return
        self._count_request(router, "remove")
        try:
            await router.client.remove(router_id)
        except RouterError as exc:
            if exc.status == 404:  # WORKER_NOT_FOUND: the router no longer has it
                self._removed(router, url, worker.id)
                return
            self._status(worker.id, router, f"removal pending: {exc}")
            router.wake.set()
            return
        self._status(worker.id, router, "removal pending")
        self._follow(router, url, _Job("remove", router_id, worker.id))

    async def withdraw(self, worker_id: str, timeout: float = 5.0) -> None:
        """Take a worker out of every router now (before it is stopped); bounded in time."""
        if not self._routers or worker_id not in self.registry:
            return
        worker = self.registry.get(worker_id)
        await within(self._withdraw(worker), timeout)

    def _status(self, worker_id: str, router: _Router, status: str) -> None:
        self.registry.router_status(worker_id, router.config.url, status)

    def _count_request(self, router: _Router, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.router_requests.labels(router.config.url, kind).inc()

    def _count_job(self, router: _Router, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.router_jobs.labels(router.config.url, outcome).inc()

    # -- reconcile -----------------------------------------------------------------------------

    async def _reconcile_loop(self, router: _Router) -> None:
        failures = 0
        while True:
            try:
                await self.reconcile(router)
                if self.metrics is not None:
                    self.metrics.router_reconciles.labels(router.config.url).inc()
                if failures:
                    log.info("router %s is reachable again", router.config.url)
                failures, delay = 0, self.interval
            except RouterError as exc:
                if not failures:
                    log.warning("router %s unreachable: %s", router.config.url, exc)
                failures += 1
                delay = min(0.25 * 2**failures, 30.0)  # 0.5 s, 1 s, 2 s... up to 30 s
            router.wake.clear()
            await within(router.wake.wait(), delay)

    def _settle_removals(self, router: _Router, present: dict[str, str]) -> None:
        """A removal that was refused or unanswered is done once the router no longer lists
        the worker (and no job for its URL is under way)."""
        for worker in self.registry.list():
            status = worker.routers.get(router.config.url, "")
            url = self.url_of(router, worker)
            gone = url not in present and url not in router.jobs
            if gone and status.startswith("removal pending"):
                self._removed(router, url, worker.id)

    async def reconcile(self, router: _Router) -> None:
        """Make the router hold exactly this hive's ready workers (leaving others' alone)."""
        listed = await router.client.list()
        present = {item.url.rstrip("/"): item.id for item in listed if self._ours(router, item.url)}
        router.known.update(present)
        wanted = self._wanted(router)
        for url, router_id in present.items():
            if url not in wanted and url not in router.jobs:
                self._count_request(router, "remove")
                try:
                    await router.client.remove(router_id)
                except RouterError as exc:
                    if exc.status != 404:  # 404: gone since the list, nothing to remove
                        raise
                log.info("reconcile: removing %s from %s", url, router.config.url)
        self._settle_removals(router, present)
        for url, worker in wanted.items():
            if url in present:
                if url not in router.jobs and worker.routers.get(router.config.url) != "registered":
                    router.failures.pop(url, None)
                    router.not_before.pop(url, None)
                    self._status(worker.id, router, "registered")
            else:
                await self._add(router, worker)

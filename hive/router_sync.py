"""Router sync: keep every configured upstream router in step with this hive's workers.

hive is the single source of truth for its workers and pushes each change upstream the moment
it happens: a worker that becomes ready is registered; one that fails is removed the moment the
failure is noticed; one being stopped is removed *before* it is signalled (and then drained), so
no further request reaches it. A reconcile loop per router repairs the rest: it re-registers
what a restarted router forgot, removes what the router still holds of this hive's dead workers,
and retries with back-off while the router is down. It only ever touches entries whose URL
belongs to this hive (the advertised host and a port in this hive's ``port_range``), so several
hives can share one router.

Routers are reached through a small client per kind (:class:`SglangRouter` today); another
kind only has to offer the same three calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp

from hive.config import Config, RouterConfig
from hive.metrics import Metrics
from hive.models import State, Worker
from hive.registry import Change, Registry, UnknownWorker
from hive.timeouts import within

log = logging.getLogger("hive.router_sync")

_TIMEOUT = aiohttp.ClientTimeout(total=5)


class RouterError(Exception):
    """The router could not be reached or refused."""


@dataclass(frozen=True, slots=True)
class Listed:
    id: str
    url: str


class RouterClient(Protocol):
    """What hive needs of a router of any kind."""

    async def list(self) -> list[Listed]: ...
    async def add(self, url: str, worker: Worker) -> str | None: ...
    async def remove(self, router_id: str) -> None: ...


class SglangRouter:
    """sglang-router's worker API: ``POST /workers``, ``GET /workers``, ``DELETE /workers/{id}``."""

    def __init__(self, config: RouterConfig, session: aiohttp.ClientSession) -> None:
        self.base = config.url.rstrip("/")
        self.session = session
        self.headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            async with self.session.request(
                method, self.base + path, json=body, headers=self.headers
            ) as response:
                text = await response.text()
                if response.status >= 400:
                    raise RouterError(f"{method} {path}: HTTP {response.status}: {text[:200]}")
                return await response.json(content_type=None) if text else None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise RouterError(f"{method} {path}: {exc or type(exc).__name__}") from None

    async def list(self) -> list[Listed]:
        body = await self._call("GET", "/workers")
        return [Listed(str(w["id"]), str(w["url"])) for w in (body or {}).get("workers", [])]

    async def add(self, url: str, worker: Worker) -> str | None:
        body = {
            "url": url,
            "model_id": worker.model,
            "labels": {**worker.labels, "hive_worker": worker.id},
            # The router's first health check of the worker: the worker is ready already.
            "health_check_timeout_secs": 5,
        }
        answer = await self._call("POST", "/workers", body)
        return (
            str(answer["worker_id"]) if isinstance(answer, dict) and "worker_id" in answer else None
        )

    async def remove(self, router_id: str) -> None:
        await self._call("DELETE", f"/workers/{router_id}")


@dataclass
class _Router:
    config: RouterConfig
    client: RouterClient
    known: dict[str, str] = field(default_factory=dict)  # worker url -> the router's id
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class RouterSync:
    """One reconcile loop per router, plus immediate register/remove on registry changes."""

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
            if router.task is not None:
                router.task.cancel()
        self._routers = []
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if config.routers:
            self._begin(config)
        log.info("routers now: %s", ", ".join(r.url for r in config.routers) or "none")

    async def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        for router in self._routers:
            if router.task is not None:
                router.task.cancel()
        tasks = [r.task for r in self._routers if r.task is not None] + list(self._pending)
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

    # -- immediate reactions -------------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        # Called with the registry's lock held, maybe off the loop: only schedule.
        if self._loop is None:
            return
        worker = change.worker
        if change.to in (State.READY, State.BUSY) and change.from_ == State.STARTING:
            self._loop.call_soon_threadsafe(self._spawn_task, self._register(worker))
        elif change.to in (State.FAILED, State.STOPPED, None) or worker.desired == "stopped":
            self._loop.call_soon_threadsafe(self._spawn_task, self._withdraw(worker))

    def _spawn_task(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _register(self, worker: Worker) -> None:
        if not self._registers(worker.id):
            return
        for router in self._routers:
            url = self.url_of(router, worker)
            try:
                router_id = await router.client.add(url, worker)
                if router_id:
                    router.known[url] = router_id
                self._status(worker.id, router, "registered")
                log.info("worker %s registered with %s", worker.id, router.config.url)
            except RouterError as exc:
                self._status(worker.id, router, f"pending: {exc}")
                router.wake.set()  # the reconcile loop retries with back-off

    async def _withdraw(self, worker: Worker) -> None:
        await asyncio.gather(*(self._remove(router, worker) for router in self._routers))

    async def _remove(self, router: _Router, worker: Worker) -> None:
        url = self.url_of(router, worker)
        router_id = router.known.get(url)
        if router_id is None:
            router.wake.set()  # not known: the next reconcile finds and removes it
            return
        try:
            await router.client.remove(router_id)
            router.known.pop(url, None)
            self._status(worker.id, router, "removed")
            log.info("worker %s removed from %s", worker.id, router.config.url)
        except RouterError as exc:
            self._status(worker.id, router, f"removal pending: {exc}")
            router.wake.set()

    async def withdraw(self, worker_id: str, timeout: float = 5.0) -> None:
        """Take a worker out of every router now (before it is stopped); bounded in time."""
        if not self._routers or worker_id not in self.registry:
            return
        worker = self.registry.get(worker_id)
        await within(self._withdraw(worker), timeout)

    def _status(self, worker_id: str, router: _Router, status: str) -> None:
        self.registry.router_status(worker_id, router.config.url, status)

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

    async def reconcile(self, router: _Router) -> None:
        """Make the router hold exactly this hive's ready workers (leaving others' alone)."""
        listed = await router.client.list()
        present = {item.url.rstrip("/"): item.id for item in listed if self._ours(router, item.url)}
        router.known = dict(present)
        wanted = self._wanted(router)
        for url, router_id in present.items():
            if url not in wanted:
                await router.client.remove(router_id)
                router.known.pop(url, None)
                log.info("reconcile: removed %s from %s", url, router.config.url)
        for url, worker in wanted.items():
            if url not in present:
                router_id = await router.client.add(url, worker)
                if router_id:
                    router.known[url] = router_id
                log.info("reconcile: registered %s with %s", worker.id, router.config.url)
            if worker.routers.get(router.config.url) != "registered":
                self._status(worker.id, router, "registered")

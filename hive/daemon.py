"""``hive serve``: build the context, serve the API, and shut down in order.

Start-up: configuration, token, the state_dir's lock, the TLS files, the TCP port and the unix
socket's path (what can fail, before hive makes anything: its cgroup), registry, devices,
supervisor, then the API on TCP and on the unix socket (mode 0600). A start that fails closes
what it opened and removes what it made. Shut-down on SIGTERM or SIGINT: refuse new spawns,
stop every worker (``on_exit = "stop"``) or leave them running (``"detach"``), close the API,
remove the socket, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import fcntl
import io
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from hive.api import create_app, listeners, views
from hive.api.guard import ConnectionGuard
from hive.api.keys import CONTEXT
from hive.config import Config, ConfigError
from hive.context import Context
from hive.desired.fleet import Fleet
from hive.desired.reconcile import DeclaredFiles, Reconciler
from hive.devices import cpu
from hive.devices.gpu import GpuMonitor
from hive.devices.placement import Placer
from hive.host.containment import Cgroups, Containment
from hive.host.containment import choose as choose_containment
from hive.host.descriptors import raise_limit
from hive.host.notify import Notifier
from hive.host.shutdown import stop_for_shutdown
from hive.models import State
from hive.startup import StartupError, load_token, warn_root_workers
from hive.state.events import EventHub
from hive.state.journal import Journal
from hive.state.metrics import Metrics
from hive.state.registry import Change, Registry
from hive.upstream.router_sync import RouterSync
from hive.workers.logs import Logs
from hive.workers.supervisor import Supervisor
from hive.workers.takeover import Takeover
from hive.workers.usage import Usage

log = logging.getLogger("hive")


#: Settings a running hive cannot change: a SIGHUP keeps their old values and says so.
RESTART_ONLY = frozenset(
    {
        "listen", "token", "token_file", "socket", "state_dir", "port_range", "worker_host",
        "tls_cert_file", "tls_key_file", "tls_client_ca_file",
        "events_buffer", "events_queue", "device_refresh", "usage_refresh", "containment",
        "http_header_timeout", "http_max_connections", "fleet",
    }
)  # fmt: skip


def status_line(registry: Registry) -> str:
    counts = registry.counts()
    return "workers: " + ", ".join(f"{counts[state]} {state.value}" for state in State)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class Daemon:
    """One running ``hive serve``.

    About 330 lines: the phases of ``run`` (build, adopt, listen, start, shut down), the
    reload and the fleet's join share the parts built in the first phase; one object holds them
    so that the shutdown closes exactly what the start opened, in reverse.
    """

    def __init__(
        self,
        config: Config,
        loader: Callable[[], Config] | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.loader = loader
        self.config_path = config_path
        self._declared: DeclaredFiles | None = None
        self.notifier = Notifier()
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._lock_fd: int | None = None
        self._ports = listeners.Ports(config, self._handshake_failed)
        self._containment: Containment | None = None
        self._upstream: RouterSync | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._background: list[asyncio.Task[None]] = []
        self.context: Context | None = None

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """``hive serve``, in named phases: build the context, adopt what the last hive left
        running, listen, serve until asked to stop, shut down."""
        started = False
        try:
            context, journal = await self._build()
            self._adopt(context, journal)
            await self._listen(create_app(context))
            self._start(context, journal)
            started = True
            await self._stopping.wait()
        finally:
            if started:
                await self._shut_down(context, journal)
            else:
                await self._abandon()
        log.info("hive stopped")

    async def _build(self) -> tuple[Context, Journal]:
        """Every part of hive, wired together; nothing listens and no worker is touched yet.
        What can stop a start is checked first, before hive makes anything (its cgroup)."""
        config = self.config
        token = load_token(config)
        warn_root_workers(config)
        self._lock_state_dir()
        self._ports.claim()  # the TLS files, the TCP port, the unix socket's path
        registry = Registry(config.retention)
        registry.bind(asyncio.get_running_loop())  # every change is heard on this loop
        nodes = cpu.discover()
        gpus = GpuMonitor(config.device_refresh)
        await asyncio.to_thread(gpus.start)
        if gpus.error:
            log.info("GPUs: none (%s)", gpus.error)
        else:
            log.info("GPUs: %s", ", ".join(f"{g.id} {g.name}" for g in gpus.gpus))
        placer = Placer(nodes, gpus.snapshot)
        usage = Usage(registry, placer, gpus.snapshot, config.usage_refresh)
        try:
            logs = Logs(config.logs_path, config.max_log_bytes, registry.log_generation)
        except OSError as exc:
            raise StartupError(f"cannot use state_dir {config.state_path}: {exc}") from None
        journal = Journal(config.state_path / "journal.json", registry)
        metrics = Metrics(registry)
        upstream = RouterSync(config, registry, metrics)
        self._upstream = upstream
        try:
            containment, how = choose_containment(config.containment, config.state_path)
        except RuntimeError as exc:
            raise StartupError(str(exc)) from None
        self._containment = containment
        log.info("%s", how)
        if isinstance(containment, Cgroups):
            usage.cgroups = containment
        # Workers heartbeat over TCP, or over the unix socket when TCP speaks TLS (a worker has
        # no CA to check hive's certificate with; the socket needs none).
        worker_api = f"unix://{config.socket_path}" if config.tls else config.api_url
        supervisor = Supervisor(
            config,
            registry,
            placer,
            logs,
            worker_api,
            metrics,
            journal,
            upstream,
            containment=containment,
        )
        if containment.kind == "tags":  # the child subreaper reaps what re-parents to it
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGCHLD, supervisor.housekeeping.reap_orphans
            )
        events = EventHub(registry, config.events_buffer, config.events_queue)
        events.start()
        metrics.event_clients.set_function(lambda: events.clients)
        self.context = Context(
            config,
            registry,
            supervisor,
            logs,
            placer,
            nodes,
            gpus,
            token,
            events,
            metrics,
            Reconciler(supervisor, registry),
            self.config_path,
            usage=usage,
        )
        await supervisor.start()
        return self.context, journal

    def _adopt(self, context: Context, journal: Journal) -> None:
        """The journal's workers back in the registry, each watched again, before the API
        listens: no request ever sees a registry without the old workers."""
        saved = journal.load()
        counts = Takeover(context.supervisor).run(saved, rebuild=journal.lost)
        if saved:
            log.info(
                "journal: adopted %d running worker(s), %d gone while hive was down, "
                "%d stopped or failed record(s) restored (from %s)",
                counts["adopted"],
                counts["gone"],
                counts["restored"],
                journal.loaded_from,
            )
        if counts["rebuilt"]:
            log.warning(
                "journal: rebuilt %d running worker(s) from their processes", counts["rebuilt"]
            )
        if counts["stray"]:
            log.warning("ended %d stray worker process(es) at start-up", counts["stray"])

    def _start(self, context: Context, journal: Journal) -> None:
        """Listening: the background work begins, and systemd hears that hive is ready."""
        config, registry = self.config, context.registry
        journal.start()
        assert context.usage is not None and self._upstream is not None
        context.usage.start()
        self._upstream.start()
        context.metrics.watch_gpus(lambda: context.gpus.snapshot().gpus)
        log.info("hive listening on %s and %s", config.listen, config.socket_path)
        context.loads.loaded("start", self.config_path, "loaded")
        self._declared = DeclaredFiles(
            context.reconciler, lambda: self.config, self.config_path, self.notifier.status,
            context.loads.declared,
        )  # fmt: skip
        self._declared.request(first=True)
        self._join_fleet(context)
        self.notifier.ready(status_line(registry))
        changed = asyncio.Event()

        def on_change(change: Change) -> None:
            changed.set()
            _log_change(change)

        self._unsubscribe = registry.subscribe(on_change)  # on the loop, in order
        self._background = [
            asyncio.create_task(self.notifier.watchdog_loop(), name="hive-watchdog"),
            asyncio.create_task(self._publish_status(registry, changed), name="hive-status"),
        ]

    async def _shut_down(self, context: Context, journal: Journal) -> None:
        """Out of the fleet, workers stopped or detached (``on_exit``), then every part closed
        in the reverse order of its start."""
        config, notifier = self.config, self.notifier
        notifier.stopping(f"stopping ({status_line(context.registry)})")
        # Stopping workers may take stop_timeout and more: keep systemd from giving up.
        self._background.append(
            asyncio.create_task(
                notifier.extend_timeout_loop(config.stop_timeout + config.drain_timeout),
                name="hive-extend-timeout",
            )
        )
        host_down, why = await stop_for_shutdown(config.on_exit, config.shutdown_check)
        log.info("shutting down (on_exit = %s%s)", config.on_exit, why)
        if context.fleet is not None:  # out of the fleet view at once, before workers stop
            await context.fleet.close()
        if context.usage is not None:
            await context.usage.close()
        await context.supervisor.close(host_down=host_down)  # stops (and withdraws) or detaches
        if self._declared is not None:
            await self._declared.close()
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._upstream is not None:
            await self._upstream.close()
        await journal.close()
        await asyncio.to_thread(context.gpus.close)
        context.events.close()
        context.metrics.close()
        if self._runner is not None:
            await self._runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            config.socket_path.unlink()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        notifier.close()

    async def _publish_status(self, registry: Registry, changed: asyncio.Event) -> None:
        """``STATUS=`` with the worker counts as they change, at most twice a second."""
        while True:
            await changed.wait()
            changed.clear()
            self.notifier.status(status_line(registry))
            await asyncio.sleep(0.5)

    # -- SIGHUP ----------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the configuration; apply what can change live, keep the rest; never crash.

        Backends, routers and limits take effect at once, for new workers and new stops;
        running workers are not touched. A file that does not load is refused whole and the
        running configuration stays.
        """
        context = self.context
        if context is None or self.loader is None:
            return
        self.notifier.reloading()
        old = self.config
        try:
            new = self.loader()
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            context.loads.refused(f"reload refused, the running configuration stays: {exc}")
            self.notifier.ready(f"reload refused: {str(exc).splitlines()[0]}")
            return
        changed = [key for key in Config.model_fields if getattr(old, key) != getattr(new, key)]
        kept = [key for key in changed if key in RESTART_ONLY]
        if kept:
            log.warning("reload: %s take effect at the next start of hive", ", ".join(kept))
            new = new.model_copy(update={key: getattr(old, key) for key in kept})
        live = [key for key in changed if key not in RESTART_ONLY]
        self.config = new
        context.config = new
        context.supervisor.config = new
        context.registry.retention = new.retention
        context.logs.max_bytes = new.max_log_bytes
        if self._upstream is not None:
            self._upstream.reload(new)
        log.info("reloaded the configuration: %s", ", ".join(live) or "nothing changed")
        summary = f"changed {', '.join(live)}" if live else "nothing changed"
        later = f"; {', '.join(kept)} take effect at the next start of hive" if kept else ""
        context.loads.loaded("SIGHUP", self.config_path, f"reloaded: {summary}{later}")
        self.notifier.ready(status_line(context.registry))
        if self._declared is not None:
            self._declared.request()

    # -- the fleet -------------------------------------------------------------------------

    def _join_fleet(self, context: Context) -> None:
        """With ``[fleet]``: publish this node in etcd and take its desired workers from it."""
        if self.config.fleet is None:
            return

        def node_value() -> dict[str, Any]:
            value = views.node_view(context).model_dump(mode="json", exclude=views.NODE_LOCAL)
            value["devices"] = views.devices_view(context).model_dump(mode="json")
            return dict(value)

        fleet = Fleet(self.config.fleet, context.registry, context.reconciler, node_value)
        context.fleet = fleet
        context.metrics.watch_fleet(fleet)
        fleet.start()

    def _lock_state_dir(self) -> None:
        """One hive per state_dir: two would adopt the same workers."""
        path = self.config.state_path
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path / "hive.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StartupError(f"cannot use state_dir {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(f"another hive is running with state_dir {path}") from None
        os.set_inheritable(fd, False)
        self._lock_fd = fd  # held until the process exits

    async def _listen(self, app: web.Application) -> None:
        """Serve the API on the listeners :meth:`_build` claimed; StartupError if one fails."""
        config = self.config
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=5.0
        )
        await self._runner.setup()
        guard = ConnectionGuard(config.http_header_timeout, config.http_max_connections)
        app[CONTEXT].guard = guard
        # Both sites build their connections with the runner's server: guard each of them.
        # (aiohttp has no public hook for a listener's protocol factory.)
        self._runner._server = guard.wrap(self._runner.server)  # type: ignore[assignment]
        # Listeners that run out of descriptors calmly (hive/api/listeners.py).
        listeners.quiet_accept_errors(asyncio.get_running_loop())
        await self._ports.serve(self._runner)

    def _handshake_failed(self, reason: str) -> None:
        if self.context is not None:
            self.context.metrics.tls_handshake_failures.labels(reason).inc()

    async def _abandon(self) -> None:
        """A start that failed: the workers it adopted keep running (not ours to stop), what it
        opened is closed, what it made removed (its empty cgroups, its socket)."""
        try:
            if self.context is not None:
                await self.context.supervisor.close(detach=True)  # the containment's too
                await asyncio.to_thread(self.context.gpus.close)
                self.context.events.close()
            if self._runner is not None:
                await self._runner.cleanup()
        finally:
            if self._containment is not None:  # again, should the build have failed after it
                self._containment.close()
            self._ports.close()


def _log_change(change: Change) -> None:
    """Every state change in hive's log, with the worker id (and why, when it failed)."""
    before = change.from_.value if change.from_ else "new"
    after = change.to.value if change.to else "forgotten"
    if change.renamed_to is not None:
        after = f"took over as {change.renamed_to}"
    worker = change.worker
    detail = f" ({worker.error})" if change.to == State.FAILED and worker.error else ""
    log.info("worker %s: %s -> %s%s", change.id, before, after, detail)


def _log_tasks() -> None:
    """`kill -USR2 <hive>`: log what every asyncio task of hive is waiting on."""
    for task in asyncio.all_tasks():
        stream = io.StringIO()
        task.print_stack(file=stream)
        log.warning("task %s:\n%s", task.get_name(), stream.getvalue())


def serve(
    config: Config,
    log_format: str = "text",
    loader: Callable[[], Config] | None = None,
    config_path: Path | None = None,
) -> int:
    """Run hive until SIGTERM or SIGINT; SIGHUP re-reads the configuration through ``loader``.

    Returns the process exit code."""
    setup_logging(log_format)
    log.info("%s", raise_limit())
    # `kill -USR1 <hive>` prints every thread's stack to hive's log: for a hive that seems stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    async def main() -> None:
        daemon = Daemon(config, loader, config_path)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.request_stop)
        loop.add_signal_handler(signal.SIGUSR2, _log_tasks)
        loop.add_signal_handler(signal.SIGHUP, daemon.reload)
        await daemon.run()

    try:
        asyncio.run(main())
    except StartupError as exc:
        log.error("%s", exc)
        Notifier().status(f"failed: {exc}")
        return 1
    return 0

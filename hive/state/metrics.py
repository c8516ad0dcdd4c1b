"""Prometheus metrics for ``GET /metrics``, through the ``prometheus_client`` library.

Figures that the registry already holds (workers by state, restarts, RSS, CPU, in-flight) are
read at scrape time by a collector, so they can never drift from the records. Latencies that
only exist as moments (spawn to ready, exit to ``failed``, HTTP requests) are histograms fed as
they happen. Every hive has its own ``CollectorRegistry``: no global state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hive.models import State
from hive.state.registry import Change, Registry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Fast paths first: crash detection and readiness lags are milliseconds.
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_STARTUP = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200)


class _RecordCollector(Collector):
    """Per-state counts and per-worker figures, read from the registry at scrape time."""

    def __init__(self, registry: Registry, gpus: Callable[[], Iterable[Any]] | None) -> None:
        self.registry = registry
        self.gpus = gpus

    def collect(self) -> Iterator[Metric]:
        by_state = GaugeMetricFamily("hive_workers", "Workers by state.", labels=["state"])
        for state, count in self.registry.counts().items():
            by_state.add_metric([state.value], count)
        yield by_state

        restarts = GaugeMetricFamily(
            "hive_worker_restarts", "Restarts of each worker so far.", labels=["worker", "model"]
        )
        rss = GaugeMetricFamily(
            "hive_worker_rss_bytes",
            "Resident memory of the worker's process tree.",
            labels=["worker"],
        )
        cpu = GaugeMetricFamily(
            "hive_worker_cpu_percent", "CPU use of the worker's process tree.", labels=["worker"]
        )
        gpu_memory = GaugeMetricFamily(
            "hive_worker_gpu_memory_used_mib", "GPU memory used by the worker.", labels=["worker"]
        )
        in_flight = GaugeMetricFamily(
            "hive_worker_in_flight", "Requests in flight, from heartbeats.", labels=["worker"]
        )
        up = GaugeMetricFamily(
            "hive_worker_up", "1 when the worker is ready or busy.", labels=["worker", "model"]
        )
        registered = GaugeMetricFamily(
            "hive_worker_router_registered",
            "1 when the router lists the ready worker as registered, 0 while it does not.",
            labels=["worker", "router"],
        )
        for w in self.registry.list():
            if w.state in (State.READY, State.BUSY) and w.desired == "running":
                for router, status in w.routers.items():
                    registered.add_metric([w.id, router], 1 if status == "registered" else 0)
            restarts.add_metric([w.id, w.model], w.restarts)
            up.add_metric([w.id, w.model], 1 if w.state in (State.READY, State.BUSY) else 0)
            for family, value in (
                (rss, w.rss_bytes),
                (cpu, w.cpu_percent),
                (gpu_memory, w.gpu_memory_used_mib),
                (in_flight, w.in_flight),
            ):
                if value is not None:
                    family.add_metric([w.id], value)
        yield from (restarts, up, rss, cpu, gpu_memory, in_flight, registered)

        if self.gpus is None:
            return
        memory_used = GaugeMetricFamily(
            "hive_gpu_memory_used_mib", "GPU memory in use.", labels=["gpu", "uuid"]
        )
        memory_total = GaugeMetricFamily(
            "hive_gpu_memory_total_mib", "GPU memory in all.", labels=["gpu", "uuid"]
        )
        utilization = GaugeMetricFamily(
            "hive_gpu_utilization_percent", "GPU utilization.", labels=["gpu", "uuid"]
        )
        healthy = GaugeMetricFamily(
            "hive_gpu_healthy", "1 while NVML answers for the GPU.", labels=["gpu", "uuid"]
        )
        for gpu in self.gpus():
            labels = [gpu.id, gpu.uuid]
            healthy.add_metric(labels, 1 if gpu.healthy else 0)
            for family, value in (
                (memory_used, gpu.memory_used_mib),
                (memory_total, gpu.memory_total_mib),
                (utilization, gpu.utilization_percent),
            ):
                if value is not None:
                    family.add_metric(labels, value)
        yield from (memory_used, memory_total, utilization, healthy)


class SchedulerFigures(Protocol):
    """What the fleet's scheduler tells the metrics (:class:`hive.desired.scheduler.Scheduler`
    has them)."""

    leading: bool
    elections: int
    transactions: int
    writes: int
    fenced_writes: int
    placements: Mapping[str, int]
    on_pass: list[Callable[[float], None]]

    @property
    def unplaceable(self) -> int: ...


class FleetFigures(Protocol):
    """What the fleet tells the metrics (:class:`hive.desired.fleet.Fleet` has them)."""

    connected: bool
    lease_losses: int
    watch_restarts: int

    @property
    def scheduler(self) -> SchedulerFigures | None: ...


class _FleetCollector(Collector):
    """The fleet's figures, read at scrape time."""

    def __init__(self, fleet: FleetFigures) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "hive_fleet_connected",
            "1 while etcd answers this node, 0 while it does not (workers run on).",
            value=1 if self.fleet.connected else 0,
        )
        yield CounterMetricFamily(
            "hive_fleet_lease_losses",
            "Times etcd no longer had this node's lease when hive renewed it (hive was paused "
            "or cut off for longer than lease_ttl): the node's keys were gone meanwhile.",
            value=self.fleet.lease_losses,
        )
        yield CounterMetricFamily(
            "hive_fleet_watch_restarts",
            "Times the watch of this node's desired set ended and hive read the set again.",
            value=self.fleet.watch_restarts,
        )


class _SchedulerCollector(Collector):
    """The scheduler's figures, read at scrape time (its passes' histogram is fed as they
    end: :meth:`Metrics.watch_fleet`)."""

    def __init__(self, scheduler: SchedulerFigures) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        s = self.scheduler
        yield GaugeMetricFamily(
            "hive_scheduler_leader",
            "1 while this hive holds the fleet's election and schedules, 0 while another does.",
            value=1 if s.leading else 0,
        )
        yield GaugeMetricFamily(
            "hive_scheduler_unplaceable",
            "Replicas wanted that no node can take now (room, labels, backends, cordons), as of "
            "the scheduler's last pass; 0 on a hive that does not schedule.",
            value=s.unplaceable,
        )
        placements = CounterMetricFamily(
            "hive_scheduler_placements",
            "Replicas this hive wrote onto a node as scheduler, by why: placed (a new replica), "
            "healed (its node gone), drained, relabelled (its node's labels changed), rolled.",
            labels=["reason"],
        )
        for reason, count in sorted(s.placements.items()):
            placements.add_metric([reason], count)
        yield placements
        for name, text, value in (
            ("hive_scheduler_elections", "Times this hive won the scheduler's election.",
             s.elections),
            ("hive_scheduler_transactions", "Write transactions this hive made as scheduler.",
             s.transactions),
            ("hive_scheduler_writes", "Keys written or deleted in those transactions.", s.writes),
            ("hive_scheduler_fenced_writes",
             "Transactions etcd refused because this hive no longer held the election (it then "
             "stops scheduling and campaigns again): a deposed scheduler writes nothing.",
             s.fenced_writes),
        ):  # fmt: skip
            yield CounterMetricFamily(name, text, value=value)


class Metrics:
    """hive's metrics; ``render()`` is the body of ``GET /metrics``."""

    def __init__(self, registry: Registry) -> None:
        self.prometheus = CollectorRegistry(auto_describe=True)
        self._records = _RecordCollector(registry, None)
        self.prometheus.register(self._records)
        self.spawn_ready = Histogram(
            "hive_spawn_to_ready_seconds",
            "From the worker's process start to its ready state.",
            ["backend"],
            buckets=_STARTUP,
            registry=self.prometheus,
        )
        self.startup_phases = Histogram(
            "hive_startup_phase_seconds",
            "Where start-ups that reached ready went, phase by phase (the record's startup).",
            ["backend", "phase"],
            buckets=_STARTUP,
            registry=self.prometheus,
        )
        self.crash_detection = Histogram(
            "hive_crash_detection_seconds",
            "From the kernel reporting a worker's exit to its record being failed.",
            buckets=_FAST,
            registry=self.prometheus,
        )
        self.failures = Counter(
            "hive_worker_failures",
            "Workers that became failed (crashed, hung, never ready).",
            ["backend"],
            registry=self.prometheus,
        )
        self.http_requests = Histogram(
            "hive_http_request_duration_seconds",
            "API requests by route and status.",
            ["method", "route", "status"],
            buckets=_FAST,
            registry=self.prometheus,
        )
        self.router_reconciles = Counter(
            "hive_router_reconciles",
            "Reconcile rounds completed with each router.",
            ["router"],
            registry=self.prometheus,
        )
        self.router_requests = Counter(
            "hive_router_requests",
            "Registrations (add) and removals (remove) hive sent to each router.",
            ["router", "kind"],
            registry=self.prometheus,
        )
        self.router_jobs = Counter(
            "hive_router_jobs",
            "How the router's registration and removal jobs ended: registered, removed, failed.",
            ["router", "outcome"],
            registry=self.prometheus,
        )
        self.event_clients = Gauge(
            "hive_event_clients", "Clients following /v1/events.", registry=self.prometheus
        )
        self.loop_stalls = Counter(
            "hive_loop_stalls",
            "Times hive's event loop ran late by a quarter second or more (hive stopped, "
            "frozen or blocked); workers' deadlines are extended by each.",
            registry=self.prometheus,
        )
        self.loop_stall_seconds = Counter(
            "hive_loop_stall_seconds",
            "Seconds hive's event loop did not run when it should have, summed over the stalls.",
            registry=self.prometheus,
        )
        self.auth_failures = Counter(
            "hive_auth_failures",
            "Failed log-ins to the status page (login) and unknown bearer tokens (token) over TCP.",
            ["kind"],
            registry=self.prometheus,
        )
        self.auth_refused = Counter(
            "hive_auth_refused",
            "Requests answered 429 because their address failed too often lately.",
            registry=self.prometheus,
        )
        self.tls_handshake_failures = Counter(
            "hive_tls_handshake_failures",
            "TLS handshakes on the API's port that failed, by OpenSSL's reason (e.g. "
            "TLSV1_ALERT_UNKNOWN_CA: the client does not trust hive's certificate).",
            ["reason"],
            registry=self.prometheus,
        )

        self._unsubscribe = registry.subscribe(self._on_change)

    def watch_fleet(self, fleet: FleetFigures) -> None:
        """With ``[fleet]``: export whether etcd answers, and what went wrong with it so far
        (only then: no fleet, no series); with ``schedule``, the scheduler's figures."""
        self.prometheus.register(_FleetCollector(fleet))
        scheduler = fleet.scheduler
        if scheduler is None:
            return
        self.prometheus.register(_SchedulerCollector(scheduler))
        passes = Histogram(
            "hive_scheduler_pass_seconds",
            "Scheduling passes this hive ran as scheduler: the plan and its writes.",
            buckets=_FAST,
            registry=self.prometheus,
        )
        scheduler.on_pass.append(passes.observe)

    def watch_gpus(self, gpus: Callable[[], Iterable[Any]]) -> None:
        """Export per-GPU figures from the device snapshot (read at scrape time)."""
        self._records.gpus = gpus

    def _on_change(self, change: Change) -> None:
        self._observe_startup(change)
        if change.fields_only:
            return
        w = change.worker
        if change.to == State.READY and change.from_ == State.STARTING:
            if w.started_at is not None and w.ready_at is not None:
                seconds = (w.ready_at - w.started_at).total_seconds()
                self.spawn_ready.labels(w.backend).observe(max(0.0, seconds))
        elif change.to == State.FAILED:
            self.failures.labels(w.backend).inc()

    def _observe_startup(self, change: Change) -> None:
        """A start-up's phases up to ``probe`` once it has them all, ``register`` once known."""
        after = change.worker.startup
        if not after or change.to is None:
            return
        before = change.before.startup if change.before is not None else []
        names = {p.phase for p in before}
        new = []
        if after[-1].phase in ("probe", "register") and "probe" not in names:
            new = [p for p in after if p.phase != "register"]
        if after[-1].phase == "register" and "register" not in names:
            new.append(after[-1])
        for phase in new:
            self.startup_phases.labels(change.worker.backend, phase.phase).observe(phase.seconds)

    def close(self) -> None:
        self._unsubscribe()

    def render(self) -> bytes:
        return generate_latest(self.prometheus)

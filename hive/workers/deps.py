"""What every worker's lifecycle shares, built once by the supervisor and handed to each
:class:`~hive.workers.run.WorkerRun`."""

from __future__ import annotations

from dataclasses import dataclass, field

from hive.config import BackendConfig, Config
from hive.errors import UnknownBackend
from hive.host.containment import Containment
from hive.host.process import Spawner
from hive.state.journal import Journal
from hive.state.metrics import Metrics
from hive.state.registry import Registry
from hive.upstream.router_sync import RouterSync
from hive.workers.logs import Logs
from hive.workers.memory import MemoryWatch
from hive.workers.probes import Prober
from hive.workers.reservations import Reservations
from hive.workers.stall import LoopWatch


@dataclass
class Deps:
    """What every worker's lifecycle shares; built once by the supervisor.

    ``config`` is swapped on reload and ``closing`` set at shut-down, so runs read them here.
    """

    config: Config
    registry: Registry
    spawner: Spawner
    logs: Logs
    prober: Prober
    reservations: Reservations
    api_url: str
    containment: Containment
    journal: Journal | None = None
    upstream: RouterSync | None = None
    metrics: Metrics | None = None
    #: How long hive itself did not run: every deadline of a worker leaves that out.
    watch: LoopWatch = field(default_factory=LoopWatch)
    closing: bool = False
    #: Each attempt's memory peaks, and its reservation held until its memory is back.
    memory: MemoryWatch | None = None

    def backend(self, name: str) -> BackendConfig | None:
        """A record's backend; None once a reload took it out of the configuration."""
        try:
            return self.config.backend(name)
        except UnknownBackend:
            return None

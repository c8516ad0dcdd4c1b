"""The context: what ``hive serve`` builds once at start-up and hands to whoever needs it."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from hive import __version__
from hive.config import Config
from hive.desired.reconcile import Reconciler
from hive.devices.cpu import CpuNode
from hive.devices.gpu import GpuMonitor
from hive.devices.placement import Placer
from hive.state.events import EventHub
from hive.state.metrics import Metrics
from hive.state.registry import Registry, now
from hive.workers.logs import Logs
from hive.workers.supervisor import Supervisor
from hive.workers.usage import Usage

if TYPE_CHECKING:  # the API imports this module: no cycle at run time
    from hive.api.guard import ConnectionGuard
    from hive.desired.fleet import Fleet


@dataclass
class Context:
    config: Config
    registry: Registry
    supervisor: Supervisor
    logs: Logs
    placer: Placer
    cpu_nodes: list[CpuNode]
    gpus: GpuMonitor
    token: str
    events: EventHub
    metrics: Metrics
    #: Replacements and applies of declared sets.
    reconciler: Reconciler
    #: Where hive's configuration file is (declared workers are read beside it).
    config_path: Path | None = None
    #: Per-worker figures; readers say they want them (:meth:`Usage.wanted`).
    usage: Usage | None = None
    #: With ``[fleet]``: this node in etcd.
    fleet: Fleet | None = None
    #: Set when the API listens: the deadlines and caps of its connections.
    guard: ConnectionGuard | None = None
    version: str = __version__
    hostname: str = field(default_factory=socket.gethostname)
    started_at: datetime = field(default_factory=now)

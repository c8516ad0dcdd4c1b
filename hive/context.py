"""The context: what ``hive serve`` builds once at start-up and hands to whoever needs it."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from hive import __version__
from hive.config import Config
from hive.desired.reconcile import Reconciler
from hive.devices.cpu import CpuNode
from hive.devices.gpu import GpuMonitor
from hive.devices.placement import Placer
from hive.models import LastReload
from hive.state.events import EventHub
from hive.state.metrics import Metrics
from hive.state.registry import Registry, now
from hive.workers.logs import Logs
from hive.workers.supervisor import Supervisor
from hive.workers.usage import Usage

if TYPE_CHECKING:  # the API imports this module: no cycle at run time
    from hive.api.guard import ConnectionGuard
    from hive.desired.fleet import Fleet


class ConfigLoads:
    """The configuration file hive last read (None: none, the defaults) and how its last read
    went, at start or on SIGHUP, the declared workers' check included: ``GET /v1/node`` shows
    it, where a refusal was only in the log."""

    def __init__(self) -> None:
        self.file: Path | None = None
        self.last: LastReload | None = None
        self._summary: str | None = None  # None: the configuration was refused

    def loaded(self, trigger: Literal["start", "SIGHUP"], path: Path | None, summary: str) -> None:
        """The configuration loaded from ``path`` (where hive looks for it: None, or no such
        file, is the defaults); the declared workers are checked next (:meth:`declared`)."""
        self.file = path if path is not None and path.is_file() else None
        self._summary = summary if self.file else f"{summary} (no configuration file: defaults)"
        self.last = LastReload(at=now(), trigger=trigger, ok=True, message=self._summary)

    def refused(self, message: str) -> None:
        """A SIGHUP's configuration did not load: the running one stays."""
        self._summary = None
        self.last = LastReload(at=now(), trigger="SIGHUP", ok=False, message=message)

    def declared(self, refusal: str | None) -> None:
        """A pass over the declared workers found them whole and valid (None) or refused them:
        the outcome of the last load, unless its configuration was refused (the pass read the
        one before)."""
        if self.last is None or self._summary is None:
            return
        ok = refusal is None
        self.last = self.last.model_copy(update={"ok": ok, "message": refusal or self._summary})


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
    #: The configuration file read and how the last reload went.
    loads: ConfigLoads = field(default_factory=ConfigLoads)
    #: Set when the API listens: the deadlines and caps of its connections.
    guard: ConnectionGuard | None = None
    version: str = __version__
    hostname: str = field(default_factory=socket.gethostname)
    started_at: datetime = field(default_factory=now)

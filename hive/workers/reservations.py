"""Reservations: the devices, cores and port an attempt holds, chosen under the registry lock.

A reservation is computed inside a registry builder (see
:meth:`hive.state.registry.Registry.add`), so what it takes cannot be taken by a concurrent
spawn at the same moment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hive.addresses import http_url
from hive.config import BackendConfig
from hive.devices.placement import Placer
from hive.models import Entry, SpawnRequest
from hive.workers.ports import PortPool


class Reservations:
    """Places workers on devices (:class:`Placer`) and gives them ports (:class:`PortPool`)."""

    def __init__(self, placer: Placer, ports: PortPool, worker_host: str) -> None:
        self.placer = placer
        self.ports = ports
        self.worker_host = worker_host

    def reserve(
        self,
        spec: SpawnRequest,
        backend_name: str,
        backend: BackendConfig,
        entries: Mapping[str, Entry],
        worker_id: str,
        previous_port: int | None,
        previous_bootstrap: int | None = None,
    ) -> dict[str, Any]:
        """The record fields of a reservation: device, cpus, gpus, port, url and, for a
        prefill worker, its bootstrap port."""
        placement = self.placer.place(spec, backend_name, backend, entries, worker_id)
        port = self.ports.allocate(entries, worker_id, wanted=spec.port, previous=previous_port)
        bootstrap = None
        if spec.role == "prefill":
            bootstrap = self.ports.allocate(
                entries,
                worker_id,
                wanted=spec.bootstrap_port,
                previous=previous_bootstrap,
                also_taken=frozenset({port}),
                what="bootstrap_port",
            )
        return {
            "device": placement.device,
            "cpus": placement.cpus,
            "gpus": placement.gpus,
            "port": port,
            "url": http_url(self.worker_host, port),
            "bootstrap_port": bootstrap,
        }

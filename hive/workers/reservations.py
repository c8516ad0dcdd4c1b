"""Reservations: the devices, cores, memory and port an attempt holds, chosen under the
registry lock.

A reservation is computed inside a registry builder (see
:meth:`hive.state.registry.Registry.add`), so what it takes cannot be taken by a concurrent
spawn at the same moment. Memory: the figures of :mod:`hive.workers.memory_need` (declared,
learned or estimated); on a GPU the GPU figure stands in for a share the request does not
declare, and the host figure must fit in what other workers leave of ``host_memory_mib``
(:mod:`hive.devices.host_memory`), or the spawn is refused before anything starts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from hive.addresses import http_url
from hive.config import BackendConfig
from hive.devices import host_memory
from hive.devices.placement import Placer
from hive.models import Entry, SpawnRequest
from hive.workers.memory_need import Kind, Need, Sizing
from hive.workers.ports import PortPool


class Reservations:
    """Places workers on devices (:class:`Placer`) and gives them ports (:class:`PortPool`)."""

    def __init__(
        self,
        placer: Placer,
        ports: PortPool,
        worker_host: str,
        sizing: Sizing | None = None,
        budget: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.placer = placer
        self.ports = ports
        self.worker_host = worker_host
        self.sizing = sizing
        #: What workers may reserve of host memory in total (MiB); None: not accounted.
        self.budget = budget

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
        """The record fields of a reservation: device, cpus, gpus, memory, port, url and, for
        a prefill worker, its bootstrap port."""
        gpu_need = None
        on_cpu = spec.device == "cpu" or spec.device.startswith("CPU-") or backend.gpu is False
        if self.sizing is not None and not on_cpu:
            gpu_need = self.sizing.need(spec, backend_name, backend, "gpu").gpu_mib
        placement = self.placer.place(
            spec, backend_name, backend, entries, worker_id, gpu_memory_mib=gpu_need
        )
        need = Need()
        if self.sizing is not None:
            kind: Kind = "gpu" if placement.gpus else "cpu"
            need = self.sizing.need(spec, backend_name, backend, kind)
            budget = self.budget()
            host_memory.check(worker_id, need.host_mib, need.source, budget, entries)
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
            "memory_mib": need.host_mib,
            "gpu_memory_mib": need.gpu_mib if placement.gpus else None,
            "memory_source": need.source,
            "memory_peak_mib": None,
            "gpu_memory_peak_mib": None,
            "memory_held": True,
        }

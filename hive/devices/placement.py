"""Placement: which device and which cores a new or restarted worker gets.

Runs under the registry's lock (as a builder passed to the registry), so two concurrent spawns
see each other's reservations and can never be given the same cores. A worker holds what it was
given while it runs or waits for a restart; a stopped or failed worker holds nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hive.config import BackendConfig
from hive.devices.cpu import CpuNode
from hive.errors import Invalid, NoCapacity
from hive.models import LIVE_STATES, SpawnRequest, Worker
from hive.registry import Entry


@dataclass(frozen=True, slots=True)
class Placement:
    device: str
    cpus: list[int]
    exclusive: bool
    gpus: list[str]


def holds_resources(record: Worker) -> bool:
    """A worker keeps its port and devices while it runs or while a restart is due."""
    return record.state in LIVE_STATES or record.next_restart_at is not None


def _cores(cores: list[int]) -> str:
    return ",".join(map(str, cores))


class Placer:
    """Chooses devices for workers; knows the host's CPU nodes (and later its GPUs)."""

    def __init__(self, nodes: list[CpuNode], gpu_error: str | None) -> None:
        self.nodes = nodes
        self.gpu_error = gpu_error

    def place(
        self,
        spec: SpawnRequest,
        backend_name: str,
        backend: BackendConfig,
        entries: Mapping[str, Entry],
        worker_id: str,
    ) -> Placement:
        wants_gpu = spec.device == "gpu" or spec.device.startswith("GPU-")
        if wants_gpu and backend.gpu is False:
            raise Invalid(f"device: backend {backend_name!r} runs on CPU only")
        wants_cpu = spec.device == "cpu" or spec.device.startswith("CPU-")
        if wants_cpu and backend.gpu is True:
            raise Invalid(f"device: backend {backend_name!r} needs a GPU")
        gpu_fields = spec.gpus is not None or spec.gpu_memory_mib is not None
        auto_gpu = spec.device == "auto" and (backend.gpu is True or gpu_fields)
        if wants_gpu or auto_gpu:
            reason = self.gpu_error or "no GPU on this host"
            raise NoCapacity(f"no GPU available for {worker_id!r}: {reason}")
        if spec.gpus is not None or spec.gpu_memory_mib is not None:
            raise NoCapacity(
                f"device: {spec.device} has no GPU for the gpus or gpu_memory_mib requested"
            )
        return self._place_cpu(spec, entries, worker_id)

    def _reserved(self, entries: Mapping[str, Entry], worker_id: str) -> dict[int, str]:
        taken: dict[int, str] = {}
        for other_id, entry in entries.items():
            exclusive = entry.spec.cpus is not None and holds_resources(entry.record)
            if other_id != worker_id and exclusive:
                taken.update(dict.fromkeys(entry.record.cpus, other_id))
        return taken

    def _candidates(self, spec: SpawnRequest) -> list[CpuNode]:
        if spec.device.startswith("CPU-"):
            for node in self.nodes:
                if node.id == spec.device:
                    return [node]
            known = ", ".join(n.id for n in self.nodes)
            raise NoCapacity(f"device: no {spec.device} on this host (it has {known})")
        if isinstance(spec.cpus, list):
            wanted = set(spec.cpus)
            nodes = [n for n in self.nodes if wanted <= set(n.cores)]
            if not nodes:
                raise NoCapacity(
                    f"cpus: cores {_cores(spec.cpus)} are not all on one node hive may use"
                )
            return nodes
        return list(self.nodes)

    def _place_cpu(
        self, spec: SpawnRequest, entries: Mapping[str, Entry], worker_id: str
    ) -> Placement:
        taken = self._reserved(entries, worker_id)
        nodes = self._candidates(spec)

        def free(node: CpuNode) -> list[int]:
            return [c for c in node.cores if c not in taken]

        node = max(nodes, key=lambda n: (len(free(n)), -n.index))
        if isinstance(spec.cpus, list):
            if missing := sorted(set(spec.cpus) - set(node.cores)):
                raise NoCapacity(f"cpus: cores {_cores(missing)} are not usable on {node.id}")
            if busy := [c for c in spec.cpus if c in taken]:
                owners = sorted({taken[c] for c in busy})
                raise NoCapacity(
                    f"cores {_cores(busy)} of {node.id} are reserved by {', '.join(owners)}"
                )
            return Placement(node.id, list(spec.cpus), True, [])
        if isinstance(spec.cpus, int):
            available = free(node)
            if len(available) < spec.cpus:
                raise NoCapacity(
                    f"{node.id} has {len(available)} unreserved cores of {len(node.cores)}, "
                    f"{spec.cpus} requested"
                )
            return Placement(node.id, available[: spec.cpus], True, [])
        return Placement(node.id, free(node) or list(node.cores), False, [])

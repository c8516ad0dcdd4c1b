"""Placement: which device, which GPUs and which cores a new or restarted worker gets.

Runs under the registry's lock (as a builder passed to the registry), so two concurrent spawns
see each other's reservations and can never be given the same GPU or core. A worker holds what
it was given while it runs or waits for a restart; a stopped or failed worker holds nothing.

GPUs: a worker that declares no ``gpu_memory_mib`` takes its GPUs whole; workers that declare it
share a GPU while the declared sum fits in the GPU's memory minus what processes other than
hive's workers already use. ``gpus: N`` picks N healthy GPUs with the most free memory,
preferring GPUs on one NUMA node. A GPU worker without ``cpus`` runs on its GPUs' local cores
(NVML's CPU affinity); with ``cpus`` it reserves cores, the GPUs' local ones first.

Which kind of device, for ``device: auto``: the backend's ``gpu`` says. ``true``: a GPU;
``false``: the CPU; ``"optional"``: a GPU with room, else the CPU; ``"auto"``: a GPU whenever the
host has one (no room there is an error), the CPU on a host without any.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from hive.config import BackendConfig
from hive.devices.cpu import CpuNode, cpulist
from hive.devices.gpu import GpuInfo, GpuSnapshot
from hive.devices.host_memory import holds_memory
from hive.errors import NoCapacity
from hive.models import Entry, SpawnRequest, holds_resources


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a worker runs. Its cores are its own alone when its spec asked for ``cpus``."""

    device: str
    cpus: list[int]
    gpus: list[str]


def _cores(cores: list[int] | tuple[int, ...]) -> str:
    return ",".join(map(str, cores))


def _ranges(cores: Iterable[int]) -> str:
    """Core ids as a cpulist (``0-3,8``), or ``none``."""
    return cpulist(cores) or "none"


def _no_such_cores(missing: list[int], usable: Iterable[int]) -> NoCapacity:
    """Cores asked for that are not on this host (or not in hive's cpuset), and those that are."""
    which = f"core {missing[0]} does" if len(missing) == 1 else f"cores {_cores(missing)} do"
    return NoCapacity(
        f"cpus: {which} not exist or are not hive's to use; hive may use cores {_ranges(usable)}"
    )


@dataclass
class _GpuUse:
    """Who holds a GPU now: whole, or shares declared in MiB."""

    whole: list[str] = field(default_factory=list)
    shared: dict[str, int] = field(default_factory=dict)

    @property
    def declared(self) -> int:
        return sum(self.shared.values())


class Placer:
    """Chooses devices for workers from the host's CPU nodes and the latest GPU snapshot."""

    def __init__(self, nodes: list[CpuNode], gpus: Callable[[], GpuSnapshot] | None = None) -> None:
        self.nodes = nodes
        self._gpus = gpus or (lambda: GpuSnapshot(error="GPU discovery is off"))
        #: pids of hive's workers and their children (kept fresh by the usage refresher), so
        #: that GPU memory used by other processes can be told apart.
        self.worker_pids: frozenset[int] = frozenset()

    def memory_total_mib(self, uuids: Iterable[str]) -> int | None:
        """The memory of the smallest of these GPUs, as last read; None if none is known."""
        snapshot = self._gpus()
        totals = [
            gpu.memory_total_mib
            for uuid in uuids
            if (gpu := snapshot.by_uuid(uuid)) is not None and gpu.memory_total_mib
        ]
        return min(totals) if totals else None

    def snapshot(self) -> GpuSnapshot:
        """The latest GPU snapshot."""
        return self._gpus()

    @property
    def usable_cores(self) -> list[int]:
        return sorted(c for node in self.nodes for c in node.cores)

    def place(
        self,
        spec: SpawnRequest,
        backend_name: str,
        backend: BackendConfig,
        entries: Mapping[str, Entry],
        worker_id: str,
        gpu_memory_mib: int | None = None,
    ) -> Placement:
        """Where the worker runs. ``gpu_memory_mib`` stands in for a share the request does not
        declare (learned or estimated: :mod:`hive.workers.memory_need`), so it shares a GPU."""
        gpu_fields = spec.gpus is not None or spec.gpu_memory_mib is not None
        if gpu_memory_mib is not None and spec.gpu_memory_mib is None:
            spec = spec.model_copy(update={"gpu_memory_mib": gpu_memory_mib})
        device = spec.device
        explicit_gpu = device == "gpu" or device.startswith("GPU-")
        explicit_cpu = device == "cpu" or device.startswith("CPU-")
        if explicit_gpu and backend.gpu is False:
            raise NoCapacity(f"device: backend {backend_name!r} runs on CPU only")
        if explicit_cpu and backend.gpu is True:
            raise NoCapacity(f"device: backend {backend_name!r} needs a GPU, {device} has none")
        if explicit_cpu and gpu_fields:
            raise NoCapacity(
                f"device: {device} has no GPU for the gpus or gpu_memory_mib requested"
            )
        if explicit_gpu or (device == "auto" and (backend.gpu is True or gpu_fields)):
            self._some_gpu(spec, backend_name, backend)
            return self._place_gpu(spec, entries, worker_id)
        if device == "auto" and backend.gpu == "auto" and self._gpus().gpus:
            return self._place_gpu(spec, entries, worker_id)  # "auto": the host has GPUs
        if device == "auto" and backend.gpu == "optional":
            try:
                return self._place_gpu(spec, entries, worker_id)
            except NoCapacity:
                pass  # "optional": a GPU when one fits, else the CPU
        return self._place_cpu(spec, entries, worker_id)

    # -- GPUs ----------------------------------------------------------------------------------

    def _gpu_use(self, entries: Mapping[str, Entry], worker_id: str) -> dict[str, _GpuUse]:
        use: dict[str, _GpuUse] = {}
        for other_id, entry in entries.items():
            if other_id == worker_id or not holds_memory(entry.record):
                continue
            # What it reserved: its declared share, or the figure that stood in for one.
            share = entry.record.gpu_memory_mib or entry.spec.gpu_memory_mib
            for uuid in entry.record.gpus:
                held = use.setdefault(uuid, _GpuUse())
                if share is None:
                    held.whole.append(other_id)
                else:
                    held.shared[other_id] = share
        return use

    def _foreign_mib(self, gpu: GpuInfo) -> int:
        """GPU memory used by processes that are not hive's workers."""
        return sum(p.used_memory_mib or 0 for p in gpu.processes if p.pid not in self.worker_pids)

    def _free_for(self, gpu: GpuInfo, held: _GpuUse, wanted: int | None) -> tuple[int, str]:
        """MiB still free for a new worker on ``gpu`` (negative: it does not fit), and why."""
        total = gpu.memory_total_mib or 0
        if not gpu.healthy:
            return -1, f"{gpu.id} is unhealthy ({gpu.error or 'no answer from NVML'})"
        if held.whole:
            return -1, f"{gpu.id} is held whole by {', '.join(held.whole)}"
        foreign = self._foreign_mib(gpu)
        free = total - foreign - held.declared
        if wanted is None:
            if held.shared:
                return -1, f"{gpu.id} is shared by {', '.join(held.shared)}"
            return free, f"{gpu.id}: {free}/{total} MiB free"
        holders = "".join(f", {w} {mib}" for w, mib in sorted(held.shared.items()))
        detail = (
            f"{gpu.id}: {free}/{total} MiB free ({held.declared} declared by hive's workers"
            f"{holders}; {foreign} used by other processes), {wanted} MiB requested"
        )
        return (free - wanted if free >= wanted else -1), detail

    def _numa(self, gpu: GpuInfo) -> int:
        local = set(gpu.cpu_affinity)
        for node in self.nodes:
            if local & set(node.cores):
                return node.index
        return -1

    def _some_gpu(self, spec: SpawnRequest, backend_name: str, backend: BackendConfig) -> None:
        """Raise NoCapacity when the host has no GPU at all, saying what asked for one (never
        the worker's id, which the user may not have given) and how to run on the CPU."""
        snapshot = self._gpus()
        if snapshot.gpus:
            return
        reason = snapshot.error or "no GPU on this host"
        if spec.device == "gpu" or spec.device.startswith("GPU-"):
            if backend.gpu is True:
                raise NoCapacity(f"device: no GPU available ({reason})")
            raise NoCapacity(
                f"device: no GPU available ({reason}); use --device cpu to run it on the CPU"
            )
        if backend.gpu is True:
            raise NoCapacity(
                f"device: backend {backend_name!r} needs a GPU, and there is no GPU available "
                f"({reason})"
            )
        field = "gpus" if spec.gpus is not None else "gpu_memory_mib"
        raise NoCapacity(
            f"{field}: no GPU available ({reason}); to run it on the CPU, use --device cpu "
            "without --gpus or --gpu-memory"
        )

    def _place_gpu(
        self, spec: SpawnRequest, entries: Mapping[str, Entry], worker_id: str
    ) -> Placement:
        snapshot = self._gpus()
        if not snapshot.gpus:
            reason = snapshot.error or "no GPU on this host"
            raise NoCapacity(f"device: no GPU available ({reason})")
        use = self._gpu_use(entries, worker_id)
        wanted_n = spec.gpus or 1
        if spec.device not in ("gpu", "auto"):
            gpu = snapshot.by_id(spec.device)
            if gpu is None:
                known = ", ".join(g.id for g in snapshot.gpus)
                raise NoCapacity(f"device: no {spec.device} on this host (it has {known})")
            if wanted_n != 1:
                raise NoCapacity(
                    f"gpus: device {spec.device} names one GPU; use device=gpu for {wanted_n}"
                )
            held = use.get(gpu.uuid or "", _GpuUse())
            free, why = self._free_for(gpu, held, spec.gpu_memory_mib)
            if free < 0:
                raise NoCapacity(f"{spec.device} cannot take {worker_id!r}: {why}")
            chosen = [gpu]
        else:
            fits: list[tuple[int, GpuInfo]] = []
            reasons = []
            for gpu in snapshot.gpus:
                free, why = self._free_for(
                    gpu, use.get(gpu.uuid or "", _GpuUse()), spec.gpu_memory_mib
                )
                reasons.append(why)
                if free >= 0:
                    fits.append((free, gpu))
            if len(fits) < wanted_n:
                need = f"{wanted_n} GPU(s)" + (
                    f" with {spec.gpu_memory_mib} MiB" if spec.gpu_memory_mib else " whole"
                )
                raise NoCapacity(
                    f"no room for {worker_id!r}: it needs {need}, "
                    f"{len(fits)} fit; " + "; ".join(reasons)
                )
            chosen = self._best(fits, wanted_n)
        cpus = self._gpu_cores(spec, chosen, entries, worker_id)
        return Placement(
            ",".join(g.id for g in chosen),
            cpus,
            [g.uuid or "" for g in chosen],
        )

    def _best(self, fits: list[tuple[int, GpuInfo]], n: int) -> list[GpuInfo]:
        """N GPUs with the most free memory, on one NUMA node when some node has N."""
        ranked = sorted(fits, key=lambda item: (-item[0], item[1].index))
        by_node: dict[int, list[tuple[int, GpuInfo]]] = {}
        for item in ranked:
            by_node.setdefault(self._numa(item[1]), []).append(item)
        groups = [group[:n] for group in by_node.values() if len(group) >= n]
        if groups:
            best = max(groups, key=lambda group: sum(free for free, _ in group))
            return sorted((gpu for _, gpu in best), key=lambda g: g.index)
        return sorted((gpu for _, gpu in ranked[:n]), key=lambda g: g.index)

    def _gpu_cores(
        self,
        spec: SpawnRequest,
        gpus: list[GpuInfo],
        entries: Mapping[str, Entry],
        worker_id: str,
    ) -> list[int]:
        usable = set(self.usable_cores)
        local = sorted({c for g in gpus for c in g.cpu_affinity} & usable) or sorted(usable)
        taken = self._reserved(entries, worker_id)
        if spec.cpus is None:
            return [c for c in local if c not in taken] or local
        if isinstance(spec.cpus, list):
            self._check_listed(spec.cpus, usable, taken)
            return list(spec.cpus)
        ordered = local + [c for c in sorted(usable) if c not in local]
        free = [c for c in ordered if c not in taken]
        if len(free) < spec.cpus:
            raise NoCapacity(
                f"cpus: {len(free)} unreserved cores of {len(usable)}, {spec.cpus} requested"
            )
        return sorted(free[: spec.cpus])

    # -- CPUs ----------------------------------------------------------------------------------

    def _reserved(self, entries: Mapping[str, Entry], worker_id: str) -> dict[int, str]:
        taken: dict[int, str] = {}
        for other_id, entry in entries.items():
            exclusive = entry.spec.cpus is not None and holds_resources(entry.record)
            if other_id != worker_id and exclusive:
                taken.update(dict.fromkeys(entry.record.cpus, other_id))
        return taken

    def _check_listed(self, cores: list[int], usable: set[int], taken: dict[int, str]) -> None:
        if missing := sorted(set(cores) - usable):
            raise _no_such_cores(missing, usable)
        if busy := [c for c in cores if c in taken]:
            owners = sorted({taken[c] for c in busy})
            raise NoCapacity(f"cpus: cores {_cores(busy)} are reserved by {', '.join(owners)}")

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
                if missing := sorted(wanted - set(self.usable_cores)):
                    raise _no_such_cores(missing, self.usable_cores)
                layout = ", ".join(f"{n.id}: {_ranges(n.cores)}" for n in self.nodes)
                raise NoCapacity(
                    f"cpus: cores {_cores(spec.cpus)} are on more than one NUMA node ({layout}); "
                    "list cores of one node"
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
            self._check_listed(spec.cpus, set(node.cores), taken)
            return Placement(node.id, list(spec.cpus), [])
        if isinstance(spec.cpus, int):
            available = free(node)
            if len(available) < spec.cpus:
                raise NoCapacity(
                    f"{node.id} has {len(available)} unreserved cores of {len(node.cores)}, "
                    f"{spec.cpus} requested"
                )
            return Placement(node.id, available[: spec.cpus], [])
        return Placement(node.id, free(node) or list(node.cores), [])

"""Which node takes a replica: a pure function of what the nodes publish.

A node can take a replica when it is up and not cordoned, its labels have every one of the
deployment's ``node_labels``, it has the replica's backend, and its ``room`` (what its workers
have not reserved: hive.desired.node_doc) holds what the spec asks for, as the node's own
placement would take it:

- GPUs: ``gpus: N`` (default 1) healthy GPUs, whole ones unless ``gpu_memory_mib`` asks for a
  share of each; a GPU is needed for ``device = "gpu"`` (or a GPU's id), for ``gpus`` or
  ``gpu_memory_mib``, and for a backend with ``gpu = true``, or ``"auto"`` on a node with GPUs;
  ``"optional"`` takes a GPU where one fits, else the CPU;
- ``cpus: N`` free cores (on one CPU node for a CPU worker), ``memory_mib`` of host memory.

Among the nodes that can, the replica goes to the one with the fewest replicas of its deployment
(spread), then the fewest replicas in all, then by name: so the same picture gives the same
answer. What a placement takes is taken from that node's room at once, for the next one.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hive.desired.deployments import Deployment
from hive.desired.fleet_view import NodeInfo


@dataclass(frozen=True)
class Need:
    gpus: int = 0  # 0: no GPU
    share_mib: int | None = None  # each GPU's share; None: the GPUs whole
    optional_gpu: bool = False  # a GPU when one fits, else the CPU
    cores: int = 0
    memory_mib: int = 0


def need(spec: dict[str, Any], node: NodeInfo) -> Need | None:
    """What ``spec`` takes on ``node``; None when the node cannot run it at all (or the spec,
    a desired key written by someone else, makes no sense)."""
    try:
        return _need(spec, node)
    except (TypeError, ValueError, AttributeError):
        return None


def _need(spec: dict[str, Any], node: NodeInfo) -> Need | None:
    backend = spec.get("backend") or node.default_backend
    if backend not in node.backends:
        return None
    mode = node.backends[backend]
    device = str(spec.get("device") or "auto")
    cpus = spec.get("cpus")
    cores = len(cpus) if isinstance(cpus, list) else int(cpus or 0)
    memory = int(spec.get("memory_mib") or 0)
    share = spec.get("gpu_memory_mib")
    n = int(spec.get("gpus") or 1)
    gpu_fields = spec.get("gpus") is not None or share is not None
    has_gpus = bool((node.room or {}).get("gpus"))
    if device == "cpu" or device.startswith("CPU-"):
        if mode is True or gpu_fields:
            return None
        return Need(cores=cores, memory_mib=memory)
    explicit = device == "gpu" or device.startswith("GPU-")
    if explicit or mode is True or gpu_fields or (mode == "auto" and has_gpus):
        if mode is False:
            return None
        return Need(gpus=n, share_mib=share, cores=cores, memory_mib=memory)
    if mode == "optional" and has_gpus:
        return Need(gpus=1, optional_gpu=True, cores=cores, memory_mib=memory)
    return Need(cores=cores, memory_mib=memory)


class Room:
    """A node's room, as it publishes it, taken from as replicas are placed there."""

    def __init__(self, published: dict[str, Any]) -> None:
        self.cores: list[int] = [int(c) for c in published.get("cores") or []]
        memory = published.get("memory_mib")
        self.memory_mib: int | None = int(memory) if isinstance(memory, int) else None
        self.gpus: list[dict[str, Any]] = [
            dict(g) for g in published.get("gpus") or [] if isinstance(g, dict)
        ]

    def _gpu_fits(self, n: int, share: int | None) -> list[dict[str, Any]] | None:
        if share is None:
            fit = [g for g in self.gpus if g.get("healthy", True) and g.get("whole")]
        else:
            fit = [g for g in self.gpus if g.get("healthy", True) and g["memory_free_mib"] >= share]
        if len(fit) < n:
            return None
        return sorted(fit, key=lambda g: -int(g["memory_free_mib"]))[:n]

    def take(self, need: Need) -> bool:
        """Take what ``need`` takes, if it fits; False (and nothing taken) when it does not."""
        if need.memory_mib and self.memory_mib is not None and self.memory_mib < need.memory_mib:
            return False
        gpus = self._gpu_fits(need.gpus, need.share_mib) if need.gpus else None
        on_gpu = gpus is not None
        if need.gpus and not on_gpu and not need.optional_gpu:
            return False
        if need.cores:
            if on_gpu and sum(self.cores) < need.cores:
                return False
            if not on_gpu and max(self.cores, default=0) < need.cores:
                return False
        for gpu in gpus or []:
            if need.share_mib is None or need.optional_gpu:
                gpu["memory_free_mib"], gpu["whole"] = 0, False
            else:
                gpu["memory_free_mib"] -= need.share_mib
                gpu["whole"] = False
        self._take_cores(need.cores, spread=on_gpu)
        if need.memory_mib and self.memory_mib is not None:
            self.memory_mib -= need.memory_mib
        return True

    def _take_cores(self, n: int, spread: bool) -> None:
        if not n or not self.cores:
            return
        if not spread:
            i = max(range(len(self.cores)), key=lambda j: self.cores[j])
            self.cores[i] -= n
            return
        for i in sorted(range(len(self.cores)), key=lambda j: -self.cores[j]):
            taken = min(n, self.cores[i])
            self.cores[i] -= taken
            n -= taken
            if not n:
                return


@dataclass
class Candidate:
    """A node that may take replicas, and what this pass has put there so far."""

    name: str
    info: NodeInfo
    room: Room
    count: Counter[str] = field(default_factory=Counter)  # replicas by deployment
    total: int = 0

    def takes(self, deployment: Deployment) -> bool:
        """Take one replica of ``deployment`` if it can; counted when it does."""
        wanted = need(deployment.spawn, self.info)
        if wanted is None or not self.room.take(wanted):
            return False
        self.count[deployment.name] += 1
        self.total += 1
        return True


def choose(
    deployment: Deployment, candidates: dict[str, Candidate], exclude: Iterable[str] = ()
) -> str | None:
    """The node for one replica of ``deployment`` (its room taken), or None."""
    left = set(exclude)
    ranked = sorted(
        (c.count[deployment.name], c.total, c.name)
        for c in candidates.values()
        if c.name not in left and deployment.matches(c.info.labels)
    )
    for _, _, name in ranked:
        if candidates[name].takes(deployment):
            return name
    return None


def place_many(
    wanted: list[tuple[Deployment, list[int]]], candidates: dict[str, Candidate]
) -> list[tuple[Deployment, int, str]]:
    """Nodes for many replicas at once: (deployment, k, node) for each that has one.

    One heap of the nodes a deployment may use, by (its replicas there, all replicas there,
    name): a node that cannot take one more is dropped for the rest of that deployment (its
    room only shrinks during a pass). O(replicas x log nodes + deployments x nodes)."""
    placed: list[tuple[Deployment, int, str]] = []
    for deployment, ks in sorted(wanted, key=lambda item: item[0].name):
        heap = [
            (c.count[deployment.name], c.total, c.name)
            for c in candidates.values()
            if deployment.matches(c.info.labels)
        ]
        heapq.heapify(heap)
        for k in ks:
            while heap:
                _, _, name = heapq.heappop(heap)
                candidate = candidates[name]
                if candidate.takes(deployment):
                    placed.append((deployment, k, name))
                    heapq.heappush(heap, (candidate.count[deployment.name], candidate.total, name))
                    break
            else:
                break  # no node has room for one more
    return placed

"""What a node publishes about itself in ``{prefix}/nodes/{node}``: the figures that change only
when its workers or devices do, and what the fleet's scheduler places by.

A node at rest must write nothing but its lease's keep-alives, and traffic alone must not make
it write: so a busy worker counts as ready (:func:`published_state`), and the live figures of
``GET /v1/devices`` (a CPU node's load and available memory; a GPU's used and free memory,
utilization, temperature, power and processes) are left out: the node's API has them. What stays
is stable: the devices, their totals, health, and the workers on them; and ``fleet``:

- ``labels``: ``[fleet] labels``, matched by deployments' ``node_labels``;
- ``backends``: each backend's name and its ``gpu`` setting, and ``default_backend``;
- ``routers``: the routers this node registers its workers with (a replica moved here serves once
  each of them has it);
- ``room``: what a new worker may still reserve, counted from what hive's workers declared, not
  from live usage: free cores on each CPU node (cores reserved by workers that asked for
  ``cpus`` are taken), what the node's own admission leaves of ``host_memory_mib`` (the
  figures workers hold: declared, learned or estimated), and each GPU's memory less the
  declared shares (none left when a worker holds it whole).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from hive.config import Config, FleetConfig
from hive.devices.host_memory import held_by
from hive.models import Entry, State, holds_resources

#: Fields of ``GET /v1/devices`` that change from one read to the next.
LIVE_CPU = ("load", "memory_available_bytes")
LIVE_GPU = (
    "memory_used_mib", "memory_free_mib", "utilization_percent", "temperature_c", "power_w",
    "processes",
)  # fmt: skip


def published_state(state: State) -> State:
    """A worker's state as etcd has it: ``busy`` is ``ready``. Whether a worker holds a request
    changes with each request (a demo worker says so at once, an engine at each read of its
    load): published, every node under load would write at the pace of its traffic, and the
    scheduler places and moves by ready-or-busy alone. The node's API has it live."""
    return State.READY if state == State.BUSY else state


class Entries(Protocol):
    def locked(self) -> Any: ...


def publishing(
    node_value: Callable[[], dict[str, Any]],
    registry: Entries,
    config: Callable[[], Config],
    fleet: FleetConfig,
    budget: Callable[[], int | None] = lambda: None,
) -> Callable[[], dict[str, Any]]:
    """``node_value`` as published: :func:`node_document` over the registry's entries now;
    ``budget``: the host memory workers may reserve (``host_memory_mib``, None: unknown)."""

    def value() -> dict[str, Any]:
        with registry.locked() as entries:
            held = dict(entries)
        return node_document(node_value(), held, config(), fleet, budget())

    return value


def node_document(
    value: dict[str, Any],
    entries: Mapping[str, Entry],
    config: Config,
    fleet: FleetConfig,
    budget_mib: int | None = None,
) -> dict[str, Any]:
    """The node's view (``node_value``: /v1/node with /v1/devices in full) as published."""
    doc = dict(value)
    if isinstance(doc.get("workers"), dict):  # counts by state: busy ones count as ready
        counts = dict(doc["workers"])
        counts["ready"] = counts.get("ready", 0) + counts.pop("busy", 0)
        doc["workers"] = counts
    devices = dict(doc.get("devices") or {})
    cpus = [{k: v for k, v in c.items() if k not in LIVE_CPU} for c in devices.get("cpus") or []]
    gpus = [{k: v for k, v in g.items() if k not in LIVE_GPU} for g in devices.get("gpus") or []]
    if "cpus" in devices:
        devices["cpus"], devices["gpus"] = cpus, gpus
        doc["devices"] = devices
    doc["fleet"] = {
        "labels": dict(fleet.labels),
        "backends": {name: backend.gpu for name, backend in sorted(config.backends.items())},
        "default_backend": config.default_backend,
        "routers": [router.url for router in config.routers],
        "room": room(cpus, gpus, entries, budget_mib),
    }
    return doc


def room(
    cpus: list[dict[str, Any]],
    gpus: list[dict[str, Any]],
    entries: Mapping[str, Entry],
    budget_mib: int | None = None,
) -> dict[str, Any]:
    """What is left to reserve, from what the live workers hold (see the module's text).
    Memory: what the node's admission (hive.devices.host_memory) leaves of ``budget_mib``,
    None where the node accounts none; the host's total would promise more than a node admits
    (a tenth, up to 8 GiB, is kept back), and a replica placed on it be refused there for
    ever."""
    reserved_cores: set[int] = set()
    whole: set[str] = set()
    shared: dict[str, int] = {}
    for entry in entries.values():
        record, spec = entry.record, entry.spec
        if not holds_resources(record):
            continue
        if spec.cpus is not None:
            reserved_cores.update(record.cpus)
        for uuid in record.gpus:
            if spec.gpu_memory_mib is None:
                whole.add(uuid)
            else:
                shared[uuid] = shared.get(uuid, 0) + spec.gpu_memory_mib
    memory_mib = None
    if budget_mib is not None:
        memory_mib = max(budget_mib - sum(held_by(entries, "").values()), 0)
    return {
        "cores": [sum(c not in reserved_cores for c in cpu.get("cores", [])) for cpu in cpus],
        "memory_mib": memory_mib,
        "gpus": [_gpu_room(g, whole, shared) for g in gpus],
    }


def _gpu_room(gpu: dict[str, Any], whole: set[str], shared: dict[str, int]) -> dict[str, Any]:
    uuid = gpu.get("uuid") or ""
    total = gpu.get("memory_total_mib") or 0
    declared = shared.get(uuid, 0)
    held = uuid in whole
    return {
        "id": gpu.get("id"),
        "healthy": bool(gpu.get("healthy", True)),
        "memory_total_mib": total,
        "memory_free_mib": 0 if held else max(0, total - declared),
        "whole": not held and declared == 0,
    }

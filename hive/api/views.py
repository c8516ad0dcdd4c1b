"""What ``GET /v1/node`` and ``GET /v1/devices`` answer, built from the context.

The node view counts devices and workers; the devices view joins the CPU nodes and the GPU
snapshot with the workers that hold resources on them. Nothing here parses a request or writes a
response: the handlers in :mod:`hive.api.routes` do that.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from hive.context import Context
from hive.devices import cpu
from hive.devices.cpu import CpuNode
from hive.devices.gpu import GpuSnapshot
from hive.models import Devices, DeviceSummary, Node, Worker, holds_resources
from hive.startup import token_source

#: What the node's document in etcd leaves out of ``GET /v1/node``: the fleet's own view, and
#: this host's files and reloads (its operator's business, nothing the fleet places by).
NODE_LOCAL = frozenset(
    {"fleet", "config_file", "state_dir", "token_source", "token_file", "last_reload"}
)


def device_summary(nodes: Sequence[CpuNode], snapshot: GpuSnapshot) -> DeviceSummary:
    """How many CPU nodes, cores and GPUs the host has, and why GPUs are missing, if they are."""
    return DeviceSummary(
        cpus=len(nodes),
        cores=sum(len(n.cores) for n in nodes),
        gpus=len(snapshot.gpus),
        gpu_error=snapshot.error,
    )


def workers_by_gpu(records: Iterable[Worker]) -> dict[str, list[str]]:
    """GPU UUID -> the ids of the workers placed on it, in the order of ``records``."""
    on_gpu: dict[str, list[str]] = {}
    for record in records:
        for uuid in record.gpus:
            on_gpu.setdefault(uuid, []).append(record.id)
    return on_gpu


def node_view(context: Context) -> Node:
    """The host: name, version, start time, device counts and worker counts by state; where
    its files are and how its last reload went."""
    source = token_source(context.config)
    return Node(
        hostname=context.hostname,
        version=context.version,
        started_at=context.started_at,
        devices=device_summary(context.cpu_nodes, context.gpus.snapshot()),
        workers=context.registry.counts(),
        api_url=context.config.api_url,
        socket=str(context.config.socket_path),
        fleet=context.fleet.status() if context.fleet is not None else None,
        config_file=None if context.loads.file is None else str(context.loads.file),
        state_dir=str(context.config.state_path),
        token_source=source,
        token_file=str(context.config.token_path) if source == "file" else None,
        last_reload=context.loads.last,
    )


def devices_view(context: Context) -> Devices:
    """Every CPU node and GPU with live figures and the workers holding resources on it."""
    records = [r for r in context.registry.list() if holds_resources(r)]
    cpus = cpu.snapshot(context.cpu_nodes, records)
    on_gpu = workers_by_gpu(records)
    snapshot = context.gpus.snapshot()
    return Devices(cpus=cpus, gpus=snapshot.to_models(on_gpu), gpu_error=snapshot.error)

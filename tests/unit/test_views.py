"""The node and devices views (``hive/views.py``), built from a registry and a GPU snapshot.

Plain synchronous tests; no daemon is started. The context is a stand-in holding a real
registry, CPU nodes and a fixed GPU snapshot.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest

from hive.api.views import device_summary, devices_view, node_view, workers_by_gpu
from hive.config import Config
from hive.context import ConfigLoads, Context
from hive.devices.cpu import CpuNode
from hive.devices.gpu import GpuInfo, GpuSnapshot
from hive.models import SpawnRequest, State, Worker
from hive.state.registry import Registry

UUID0 = "GPU-00000000-0000-0000-0000-000000000000"
UUID1 = "GPU-00000000-0000-0000-0000-000000000001"
NODES = [CpuNode("CPU-0", 0, (0, 1, 2, 3)), CpuNode("CPU-1", 1, (4, 5))]
SNAPSHOT = GpuSnapshot(gpus=(GpuInfo(0, UUID0, name="A"), GpuInfo(1, UUID1, name="B")))
STARTED = datetime(2030, 1, 1, tzinfo=UTC)


def worker(worker_id: str, **fields: Any) -> Worker:
    return Worker.model_validate(
        {
            "id": worker_id,
            "model": "m",
            "backend": "demo",
            "device": "GPU-0",
            "port": 18000,
            "url": "http://127.0.0.1:18000",
            "state": "ready",
            "created_at": STARTED,
            **fields,
        }
    )


class _Gpus:
    def snapshot(self) -> GpuSnapshot:
        return SNAPSHOT


class _Context:
    """The fields of :class:`hive.context.Context` that the views read."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.cpu_nodes = NODES
        self.gpus = _Gpus()
        self.hostname = "host-1"
        self.version = "9.9.9"
        self.started_at = STARTED
        self.config = Config(listen="127.0.0.1:7171", socket=Path("/run/hive-test/hive.sock"))
        self.fleet = None  # no [fleet]
        self.loads = ConfigLoads()


def _add(registry: Registry, worker_id: str, **fields: Any) -> None:
    base = {"model": "m", "backend": "demo", "port": 18000, "url": "http://127.0.0.1:18000"}
    registry.add(SpawnRequest(model="m"), "tok", lambda _: {"id": worker_id, **base, **fields})


def test_device_summary_counts_nodes_cores_and_gpus() -> None:
    summary = device_summary(NODES, SNAPSHOT)
    assert summary.model_dump() == {"cpus": 2, "cores": 6, "gpus": 2, "gpu_error": None}
    none = device_summary(NODES[:1], GpuSnapshot(error="NVML reports no GPU on this host"))
    assert none.model_dump() == {
        "cpus": 1,
        "cores": 4,
        "gpus": 0,
        "gpu_error": "NVML reports no GPU on this host",
    }


def test_workers_by_gpu_lists_each_worker_on_every_gpu_it_holds() -> None:
    records = [
        worker("a", gpus=[UUID0, UUID1]),
        worker("b", gpus=[UUID1]),
        worker("c", device="CPU-0"),
    ]
    assert workers_by_gpu(records) == {UUID0: ["a"], UUID1: ["a", "b"]}
    assert workers_by_gpu([]) == {}


def test_node_view(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HIVE_TOKEN", raising=False)
    registry = Registry()
    _add(registry, "w1", device="GPU-0", gpus=[UUID0])
    _add(registry, "w2", device="CPU-0", cpus=[0])
    registry.transition("w2", State.READY)
    node = node_view(cast(Context, _Context(registry)))
    assert node.hostname == "host-1" and node.version == "9.9.9" and node.started_at == STARTED
    assert node.devices.model_dump() == {"cpus": 2, "cores": 6, "gpus": 2, "gpu_error": None}
    assert node.workers[State.STARTING] == 1 and node.workers[State.READY] == 1
    assert node.workers[State.STOPPED] == 0
    assert (node.api_url, node.socket) == ("http://127.0.0.1:7171", "/run/hive-test/hive.sock")
    # Where its files are, the token's path but never the token, and no reload yet.
    config = Config(state_dir=Path("/var/lib/h"), token_file=Path("/etc/h/token"))
    context = _Context(registry)
    context.config = config
    node = node_view(cast(Context, context))
    assert (node.config_file, node.state_dir) == (None, "/var/lib/h")
    assert (node.token_source, node.token_file) == ("file", "/etc/h/token")
    assert node.last_reload is None
    monkeypatch.setenv("HIVE_TOKEN", "t" * 32)
    node = node_view(cast(Context, context))
    assert (node.token_source, node.token_file) == ("HIVE_TOKEN", None)
    assert "t" * 32 not in node.model_dump_json()


def test_devices_view_leaves_out_workers_that_hold_nothing() -> None:
    registry = Registry()
    _add(registry, "on-gpu", device="GPU-1", gpus=[UUID1], cpus=[4])
    _add(registry, "on-cpu", device="CPU-0", cpus=[0, 1])
    _add(registry, "gone", device="GPU-0", gpus=[UUID0], cpus=[2])
    registry.transition("gone", State.STOPPED)
    devices = devices_view(cast(Context, _Context(registry)))
    assert devices.gpu_error is None
    assert [(g.id, g.uuid, g.workers) for g in devices.gpus] == [
        ("GPU-0", UUID0, []),
        ("GPU-1", UUID1, ["on-gpu"]),
    ]
    # A GPU worker shows on the CPU node of its cores too.
    assert [(c.id, c.cores, c.workers) for c in devices.cpus] == [
        ("CPU-0", [0, 1, 2, 3], ["on-cpu"]),
        ("CPU-1", [4, 5], ["on-gpu"]),
    ]

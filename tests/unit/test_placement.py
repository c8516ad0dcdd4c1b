"""Placement and the port pool as plain objects, without a daemon: every rule of the module
docstring of hive/devices/placement.py, against entries built by hand."""

from __future__ import annotations

from typing import Any

import pytest

from hive.config import BackendConfig
from hive.devices.cpu import CpuNode
from hive.devices.gpu import GpuInfo, GpuProcessInfo, GpuSnapshot
from hive.devices.placement import Placer
from hive.errors import NoCapacity
from hive.models import Entry, SpawnRequest, State, Worker
from hive.state.registry import now

NODES = [CpuNode("CPU-0", 0, (0, 1, 2, 3)), CpuNode("CPU-1", 1, (4, 5, 6, 7))]
OPTIONAL = BackendConfig(command=["x"], gpu="optional")
CPU_ONLY = BackendConfig(command=["x"], gpu=False)


def gpu(index: int, free: int, node_cores: tuple[int, ...], total: int = 80_000) -> GpuInfo:
    """A GPU on which a process that is not hive's uses all but ``free`` MiB."""
    foreign = (GpuProcessInfo(pid=1_000_000 + index, used_memory_mib=total - free),)
    return GpuInfo(
        index=index,
        uuid=f"GPU-{index:08d}-0000-0000-0000-000000000000",
        memory_total_mib=total,
        memory_used_mib=total - free,
        memory_free_mib=free,
        cpu_affinity=node_cores,
        processes=foreign if free < total else (),
    )


GPUS = GpuSnapshot(
    gpus=(gpu(0, 70_000, (0, 1, 2, 3)), gpu(1, 79_000, (4, 5, 6, 7)), gpu(2, 60_000, (4, 5, 6, 7)))
)


def holding(wid: str, spec: SpawnRequest | None = None, **fields: Any) -> Entry:
    record = Worker(
        id=wid,
        model="m",
        backend="demo",
        device=fields.pop("device", "CPU-0"),
        port=18000,
        url="u",
        state=State.READY,
        created_at=now(),
        **fields,
    )
    return Entry(record, spec or SpawnRequest(model="m"), "t")


def place(placer: Placer, entries: dict[str, Entry] | None = None, **spec: Any) -> Any:
    backend = spec.pop("backend", OPTIONAL)
    return placer.place(SpawnRequest(model="m", **spec), "b", backend, entries or {}, "new")


def test_without_gpus_a_worker_runs_on_a_cpu_node() -> None:
    placement = place(Placer(NODES), device="cpu")
    assert placement.gpus == [] and placement.device.startswith("CPU-")


def test_cpus_reserve_cores_that_another_worker_holds_not() -> None:
    placer = Placer(NODES)
    asked = SpawnRequest(model="m", cpus=3)
    taken = {"a": holding("a", asked, cpus=[0, 1, 2], device="CPU-0")}
    placement = place(placer, taken, device="CPU-0", cpus=1)
    assert placement.cpus == [3]
    with pytest.raises(NoCapacity):
        place(placer, taken, device="CPU-0", cpus=2)


def test_gpus_n_picks_the_freest_and_runs_on_their_local_cores() -> None:
    placer = Placer(NODES, lambda: GPUS)
    one = place(placer, device="gpu", gpus=1)
    assert one.gpus == [GPUS.gpus[1].uuid]
    assert one.cpus == [4, 5, 6, 7]  # the GPU's local cores


def test_a_gpu_held_whole_is_not_given_twice() -> None:
    placer = Placer(NODES, lambda: GPUS)
    held = {"a": holding("a", gpus=[GPUS.gpus[1].uuid], device="GPU-1")}
    placement = place(placer, held, device="gpu", gpus=1)
    assert placement.gpus == [GPUS.gpus[0].uuid]


def test_declared_memory_shares_a_gpu_while_it_fits() -> None:
    snapshot = GpuSnapshot(gpus=(gpu(0, 80_000, (0, 1, 2, 3)),))
    placer = Placer(NODES, lambda: snapshot)
    first = place(placer, device="GPU-0", gpu_memory_mib=50_000)
    assert first.gpus == [snapshot.gpus[0].uuid]
    held = {"a": holding("a", gpus=first.gpus, device="GPU-0")}
    held["a"] = Entry(held["a"].record, SpawnRequest(model="m", gpu_memory_mib=50_000), "t")
    with pytest.raises(NoCapacity):
        place(placer, held, device="GPU-0", gpu_memory_mib=40_000)
    assert place(placer, held, device="GPU-0", gpu_memory_mib=30_000).gpus == first.gpus


def test_a_cpu_only_backend_refuses_a_gpu() -> None:
    with pytest.raises(NoCapacity, match="runs on CPU only"):
        place(Placer(NODES, lambda: GPUS), device="gpu", backend=CPU_ONLY)


def test_cores_that_do_not_exist_are_named_with_those_that_do() -> None:
    """``--cpus 5,6`` on a 2-core host blames the missing cores, not the NUMA layout."""
    with pytest.raises(NoCapacity) as caught:
        place(Placer([CpuNode("CPU-0", 0, (0, 1))]), cpus=[5, 6])
    assert str(caught.value) == (
        "cpus: cores 5,6 do not exist or are not hive's to use; hive may use cores 0-1"
    )
    with pytest.raises(NoCapacity) as caught:
        place(Placer(NODES), cpus=[3, 9])
    assert "core 9 does not exist" in str(caught.value) and "cores 0-7" in str(caught.value)
    with pytest.raises(NoCapacity) as caught:
        place(Placer(NODES), cpus=[3, 4])
    assert str(caught.value) == (
        "cpus: cores 3,4 are on more than one NUMA node (CPU-0: 0-3, CPU-1: 4-7); "
        "list cores of one node"
    )

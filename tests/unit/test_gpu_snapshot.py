"""The GPU monitor's pure helpers, in process: the CPU mask decoded and the snapshot's lookups. The
monitor against the real pynvml over a fake NVML library is in tests/daemon/test_gpu_monitor.py.
"""

from __future__ import annotations

from hive.devices.gpu import (
    GpuInfo,
    GpuProcessInfo,
    GpuSnapshot,
    compute_pids,
    decode_cpu_mask,
)

UUID0 = "GPU-11111111-2222-3333-4444-555555555555"
UUID1 = "GPU-66666666-7777-8888-9999-000000000000"


def test_decode_cpu_mask() -> None:
    assert decode_cpu_mask([0b1011]) == (0, 1, 3)
    assert decode_cpu_mask([0, 1 << 63 | 1]) == (64, 127)
    assert decode_cpu_mask([]) == ()


def test_snapshot_lookups_and_compute_pids() -> None:
    gpus = (
        GpuInfo(index=0, uuid=UUID0, processes=(GpuProcessInfo(1, 10), GpuProcessInfo(2, None))),
        GpuInfo(index=1, uuid=UUID1, processes=(GpuProcessInfo(1, 5),), healthy=False),
    )
    snapshot = GpuSnapshot(gpus=gpus)
    assert snapshot.by_id("GPU-1") is gpus[1]
    assert snapshot.by_id(UUID0) is gpus[0]
    assert snapshot.by_id("GPU-7") is None
    assert snapshot.healthy == (gpus[0],)
    assert compute_pids(snapshot) == {1: 15}
    models = snapshot.to_models({UUID1: ["a", "b"]})
    assert [m.workers for m in models] == [[], ["a", "b"]]
    assert models[1].healthy is False

"""A GPU asked for on a host without any: the refusal names what asked for it (never the
worker's id, which hive may have made up), says why there is none, and how to run on the CPU
where the backend can (issue 29)."""

from __future__ import annotations

from typing import Any

import pytest

from hive.config import BackendConfig, parse_config
from hive.devices.cpu import CpuNode
from hive.devices.gpu import NO_GPU, GpuSnapshot
from hive.devices.placement import Placer
from hive.errors import NoCapacity
from hive.models import SpawnRequest

NODES = [CpuNode("CPU-0", 0, (0, 1, 2, 3))]
NONE = GpuSnapshot(error=NO_GPU)


def refusal(gpu: Any, backend_name: str = "demo", **spec: Any) -> str:
    placer = Placer(NODES, lambda: NONE)
    backend = BackendConfig(command=["x"], gpu=gpu)
    with pytest.raises(NoCapacity) as caught:
        placer.place(SpawnRequest(model="m", **spec), backend_name, backend, {}, "m-442d1c")
    return str(caught.value)


@pytest.mark.parametrize("gpu", ["optional", "auto"])
def test_gpus_asked_says_how_to_run_on_the_cpu(gpu: Any) -> None:
    assert refusal(gpu, gpus=1) == (
        "gpus: no GPU available (NVML reports no GPU on this host); to run it on the CPU, "
        "use --device cpu without --gpus or --gpu-memory"
    )
    assert refusal(gpu, gpu_memory_mib=4000).startswith("gpu_memory_mib: no GPU available")


def test_device_gpu_asked_suggests_device_cpu() -> None:
    for device in ("gpu", "GPU-0"):
        assert refusal("optional", device=device) == (
            "device: no GPU available (NVML reports no GPU on this host); "
            "use --device cpu to run it on the CPU"
        )


def test_a_gpu_only_backend_says_it_needs_one_and_suggests_nothing_it_refuses() -> None:
    message = refusal(True, backend_name="sglang")
    assert message == (
        "device: backend 'sglang' needs a GPU, and there is no GPU available "
        "(NVML reports no GPU on this host)"
    )
    assert "--device cpu" not in refusal(True, device="gpu")


def test_the_vllm_template_runs_on_the_cpu_so_it_is_not_refused() -> None:
    vllm = parse_config("").backends["vllm"]
    placement = Placer(NODES, lambda: NONE).place(SpawnRequest(model="m"), "vllm", vllm, {}, "w")
    assert placement.gpus == [] and placement.device == "CPU-0"


def test_no_refusal_names_the_worker_id() -> None:
    for spec in ({"gpus": 1}, {"device": "gpu"}, {"gpu_memory_mib": 10}):
        assert "m-442d1c" not in refusal("optional", **spec)

"""A backend that runs on a GPU when the host has one and on the CPU otherwise (``gpu = "auto"``),
and what it is told on each (``device_args``, ``device_env``, ``{cpus}``): the placement and the
argv and environment of the built-in ``vllm`` template on both kinds of host, without a daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hive.config import BackendConfig, Config, parse_config
from hive.devices.cpu import CpuNode, cpulist
from hive.devices.gpu import GpuInfo, GpuSnapshot
from hive.devices.placement import Placer
from hive.errors import ConfigError, NoCapacity
from hive.models import Entry, SpawnRequest, State, Worker
from hive.state.registry import now
from hive.workers.launch import build_launch

NODES = [CpuNode("CPU-0", 0, (0, 1, 2, 3))]
AUTO = BackendConfig(command=["x"], gpu="auto")


def gpu(index: int) -> GpuInfo:
    return GpuInfo(
        index=index,
        uuid=f"GPU-{index:08d}-0000-0000-0000-000000000000",
        memory_total_mib=80_000,
        memory_used_mib=0,
        memory_free_mib=80_000,
        cpu_affinity=(0, 1, 2, 3),
    )


TWO_GPUS = GpuSnapshot(gpus=(gpu(0), gpu(1)))
NO_GPU = GpuSnapshot(error="NVML: no library")


def place(snapshot: GpuSnapshot, held: dict[str, Entry] | None = None, **spec: Any) -> Any:
    placer = Placer(NODES, lambda: snapshot)
    return placer.place(SpawnRequest(model="m", **spec), "vllm", AUTO, held or {}, "new")


def holding(uuids: list[str]) -> Entry:
    record = Worker(
        id="old",
        model="m",
        backend="vllm",
        device="GPU-0",
        port=18000,
        url="u",
        state=State.READY,
        created_at=now(),
        gpus=uuids,
    )
    return Entry(record, SpawnRequest(model="m"), "t")


def test_auto_takes_a_gpu_on_a_host_that_has_one() -> None:
    placement = place(TWO_GPUS)
    assert placement.gpus == [TWO_GPUS.gpus[0].uuid]
    assert place(TWO_GPUS, gpus=2).gpus == [g.uuid for g in TWO_GPUS.gpus]


def test_auto_never_falls_back_to_the_cpu_on_a_gpu_host() -> None:
    """Unlike "optional": a GPU engine put on the CPU because its GPUs are full would fail."""
    held = {"a": holding([g.uuid or "" for g in TWO_GPUS.gpus])}
    with pytest.raises(NoCapacity, match="no room"):
        place(TWO_GPUS, held)
    optional = BackendConfig(command=["x"], gpu="optional")
    placer = Placer(NODES, lambda: TWO_GPUS)
    assert placer.place(SpawnRequest(model="m"), "b", optional, held, "new").gpus == []


def test_auto_runs_on_the_cpu_on_a_host_without_gpus() -> None:
    placement = place(NO_GPU)
    assert placement.gpus == [] and placement.device == "CPU-0"
    assert place(NO_GPU, cpus=2).cpus == [0, 1]
    with pytest.raises(NoCapacity, match="no GPU available"):
        place(NO_GPU, gpus=1)  # asked for a GPU: still refused


def test_auto_may_be_put_on_the_cpu_or_a_gpu_by_name() -> None:
    assert place(TWO_GPUS, device="cpu").gpus == []
    assert place(TWO_GPUS, device="GPU-1").gpus == [TWO_GPUS.gpus[1].uuid]


def test_cpulist_is_the_kernels_form() -> None:
    assert cpulist([3, 0, 1, 2, 8]) == "0-3,8"
    assert cpulist([5]) == "5"
    assert cpulist([0, 2, 4]) == "0,2,4"
    assert cpulist([]) == ""


def launch_of(backend: BackendConfig, tmp: Path, spec: SpawnRequest, **fields: Any) -> Any:
    record = Worker(
        **{
            "id": "v",
            "model": spec.model,
            "backend": "vllm",
            "port": 18000,
            "url": "u",
            "state": State.STARTING,
            "created_at": now(),
            **fields,
        }
    )
    return build_launch(Entry(record, spec, "t"), backend, Config(), "u", tmp, {"PATH": "/bin"})


def test_the_vllm_template_on_a_cpu_host(tmp_path: Path) -> None:
    vllm = Config().backends["vllm"]
    assert vllm.gpu == "auto"
    spec = SpawnRequest(model="/models/tiny")
    launch = launch_of(vllm, tmp_path, spec, device="CPU-0", cpus=[2, 3])
    assert launch.argv[1:] == [
        "serve", "/models/tiny", "--served-model-name", "/models/tiny",
        "--host", "127.0.0.1", "--port", "18000",
    ]  # fmt: skip
    assert "--tensor-parallel-size" not in launch.argv  # 0 is what vLLM refuses
    assert launch.env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert launch.env["VLLM_CPU_OMP_THREADS_BIND"] == "2-3"  # the worker's own cores
    assert launch.env["CUDA_VISIBLE_DEVICES"] == ""


def test_the_vllm_template_on_a_gpu(tmp_path: Path) -> None:
    vllm = Config().backends["vllm"]
    spec = SpawnRequest(model="/models/tiny", gpus=2)
    launch = launch_of(vllm, tmp_path, spec, device="GPU-0,GPU-1", gpus=["u0", "u1"], cpus=[0])
    argv = launch.argv
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert "VLLM_CPU_KVCACHE_SPACE" not in launch.env
    assert "VLLM_CPU_OMP_THREADS_BIND" not in launch.env
    assert launch.env["CUDA_VISIBLE_DEVICES"] == "u0,u1"


def test_a_spawns_env_and_args_win_over_the_device_tables(tmp_path: Path) -> None:
    vllm = Config().backends["vllm"]
    spec = SpawnRequest(
        model="m", env={"VLLM_CPU_KVCACHE_SPACE": "1"}, args=["--max-model-len", "512"]
    )
    launch = launch_of(vllm, tmp_path, spec, device="CPU-0", cpus=[0, 1])
    assert launch.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert launch.argv[-2:] == ["--max-model-len", "512"]


def test_device_tables_in_the_file(tmp_path: Path) -> None:
    config = parse_config(
        "[backends.e]\n"
        'command = ["e", "--port", "{port}"]\n'
        'gpu = "auto"\n'
        'device_args = {cpu = ["--threads", "{ncpus}"], gpu = ["--tp", "{gpus}"]}\n'
        'device_env = {cpu = {E_CORES = "{cpus}", E_LITERAL = "{{x}}"}}\n',
        "hive.toml",
    )
    e = config.backends["e"]
    launch = launch_of(e, tmp_path, SpawnRequest(model="m"), device="CPU-0", cpus=[0, 1, 3])
    assert launch.argv[1:] == ["--port", "18000", "--threads", "3"]
    assert launch.env["E_CORES"] == "0-1,3" and launch.env["E_LITERAL"] == "{x}"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('device_args = {cpu = ["{cores}"]}', "unknown placeholder {cores}"),
        ('device_env = {gpu = {X = "{nope}"}}', "unknown placeholder {nope}"),
        ('device_args = {tpu = ["x"]}', "device_args.tpu"),
        ('gpu = "sometimes"', "gpu"),
    ],
)
def test_a_bad_device_table_names_the_key(table: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(f'[backends.e]\ncommand = ["e"]\n{table}\n', "hive.toml")


def test_an_old_vllm_override_stays_valid() -> None:
    """A file written for the old template (its own command with ``--tensor-parallel-size``,
    ``gpu = true``) still loads and means what it meant."""
    config = parse_config(
        "[backends.vllm]\n"
        'command = ["vllm", "serve", "{model}", "--tensor-parallel-size", "{gpus}"]\n'
        "gpu = true\n",
        "hive.toml",
    )
    assert config.backends["vllm"].gpu is True
    assert config.backends["vllm"].command[-1] == "{gpus}"

"""The estimate of a GGUF model's memory before its first run, against what llama.cpp itself
reports for the same generated model (llama-server ``-lv 4``: its model, KV cache and compute
buffers, at the version engines/llama_server.py pins), and the reading of the options that change
it. The whole run is checked against measured peaks in the bench (bench/figures/memory.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_gguf

from hive.config import Config
from hive.devices.engine_args import engine_of, memory_options
from hive.devices.estimate import (
    LLAMA_RUNTIME_MIB,
    MIB,
    NotEstimable,
    compute_bytes,
    gguf_estimate,
    kv_cache_bytes,
    llama_context,
    read_gguf,
    safetensors_bytes,
)
from hive.models import SpawnRequest
from hive.workers.memory_need import memory_key

#: What llama.cpp said for the model of :func:`model` (MiB): its weights, then per set of
#: options the KV cache and the compute buffer.
LLAMA_WEIGHTS = 11.59
LLAMA_SAYS = [
    (["-c", "1024", "-np", "1"], 1.00, 13.26),
    (["-c", "4096", "-np", "2"], 4.00, 14.26),
    (["-c", "4096", "-np", "1", "-fa", "off"], 4.00, 77.51),
    ([], 16.00, 28.26),  # the trained context (16384), slots left to llama-server
    (["-c", "2048", "-np", "1", "-ctk", "q8_0", "-ctv", "q8_0", "-ub", "256"], 1.06, 6.66),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    return tiny_gguf.write(
        path, context=16384, layers=2, embd=512, heads=8, kv_heads=2, ff=1408, f16=True
    )


def options(args: list[str]) -> dict[str, str]:
    return memory_options("llama-server", ["llama-server", "--model", "m", *args])


def test_weights_are_the_tensor_table(model: Path) -> None:
    read = read_gguf(model)
    assert read.n_layer == 2 and read.n_head_kv == [2, 2] and read.n_ctx_train == 16384
    assert read.weights / MIB == pytest.approx(LLAMA_WEIGHTS, abs=0.01)
    assert read.weights < model.stat().st_size  # the header is not weights


@pytest.mark.parametrize(("args", "kv_mib", "compute_mib"), LLAMA_SAYS)
def test_kv_cache_exact_and_compute_buffer_within_15_percent(
    model: Path, args: list[str], kv_mib: float, compute_mib: float
) -> None:
    read, opts = read_gguf(model), options(args)
    ctx = llama_context(read, opts)
    kv = kv_cache_bytes(
        read, ctx.n_ctx, opts.get("cache_type_k", "f16"), opts.get("cache_type_v", "f16"), 2
    )
    assert kv / MIB == pytest.approx(kv_mib, abs=0.01)
    assert compute_bytes(read, ctx) / MIB == pytest.approx(compute_mib, rel=0.15)


def test_the_estimate_adds_them_up_on_the_cpu(model: Path) -> None:
    estimate = gguf_estimate(model, options(["-c", "4096", "-np", "2"]), "cpu")
    parts = LLAMA_WEIGHTS + 4.00 + 14.26 + LLAMA_RUNTIME_MIB
    assert estimate.host_mib == pytest.approx(parts, rel=0.05)
    assert estimate.gpu_mib is None
    assert "KV cache 4 MiB (4096 cells f16/f16)" in estimate.detail


def test_on_a_gpu_the_offloaded_layers_and_their_cache_are_gpu_memory(model: Path) -> None:
    read = read_gguf(model)
    whole = gguf_estimate(model, options(["-c", "4096"]), "gpu")
    assert whole.gpu_mib is not None and whole.host_mib is not None
    assert whole.gpu_mib * MIB > read.weights - read.tensors["token_embd.weight"]
    one = gguf_estimate(model, options(["-c", "4096", "-ngl", "1"]), "gpu")
    assert one.gpu_mib is not None and one.host_mib is not None
    assert one.gpu_mib < whole.gpu_mib and one.host_mib > whole.host_mib
    split = gguf_estimate(model, options(["-c", "4096"]), "gpu", gpus=2)
    assert split.gpu_mib is not None and split.gpu_mib < whole.gpu_mib


def test_what_cannot_be_estimated_says_why(tmp_path: Path) -> None:
    with pytest.raises(NotEstimable, match="not a local file"):
        gguf_estimate(tmp_path / "absent.gguf", {}, "cpu")
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a model at all")
    with pytest.raises(NotEstimable, match="not a GGUF file"):
        gguf_estimate(bogus, {}, "cpu")
    with pytest.raises(NotEstimable, match=r"no \*\.safetensors"):
        safetensors_bytes(tmp_path)


def test_safetensors_weights_from_the_headers(tmp_path: Path) -> None:
    import json
    import struct

    header = json.dumps(
        {
            "__metadata__": {"format": "pt"},
            "a": {"dtype": "BF16", "shape": [1024, 512], "data_offsets": [0, 1048576]},
            "b": {"dtype": "F32", "shape": [16], "data_offsets": [1048576, 1048640]},
        }
    ).encode()
    (tmp_path / "model.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header + bytes(1048640)
    )
    assert safetensors_bytes(tmp_path) == (1048640, "BF16")


def test_only_the_options_that_change_memory_make_the_key() -> None:
    argv = ["-c", "8192", "--threads", "4", "-np=2", "-fa", "--alias", "x", "--no-mmap"]
    assert options(argv) == {
        "ctx_size": "8192", "parallel": "2", "flash_attn": "on", "mmap": "off"
    }  # fmt: skip
    env = {"LLAMA_ARG_CTX_SIZE": "1024", "LLAMA_ARG_THREADS": "8"}
    assert memory_options("llama-server", ["-c", "4096"], env) == {"ctx_size": "4096"}
    assert memory_options("llama-server", [], env) == {"ctx_size": "1024"}
    assert memory_options("vllm", ["serve", "m", "--max-model-len", "4096", "--port", "1"]) == {
        "max_model_len": "4096"
    }
    assert engine_of(["/opt/llama/bin/llama-server", "-m", "x"]) == "llama-server"
    assert engine_of(["vllm", "serve"]) == "vllm"
    assert engine_of(["{python}", "-m", "sglang.launch_server"]) == "sglang"
    assert engine_of(["{python}", "-m", "hive.demo_worker"]) is None

    backend = Config().backends["llama-server"]

    def key(**spec: object) -> str:
        return memory_key(SpawnRequest(model="m.gguf", **spec), "llama-server", backend, "cpu").key

    assert key(args=["-c", "4096"]) == key(args=["-c", "4096", "--threads", "3"], port=20001)
    assert key(args=["-c", "4096"]) != key(args=["-c", "8192"])
    assert key(args=["-c", "4096"]) != key(args=["-c", "4096", "-np", "4"])
    demo = Config().backends["demo"]
    plain = memory_key(SpawnRequest(model="m"), "demo", demo, "cpu")
    assert plain.engine is None and "argv" in plain.about  # every argument counts
    gpu = memory_key(SpawnRequest(model="m", gpu_memory_mib=4096), "demo", demo, "gpu")
    assert gpu.about["gpu_memory_mib"] == 4096 and gpu.key != plain.key

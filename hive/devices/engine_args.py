"""Which of an engine's arguments change how much memory it takes, read from its argv.

hive learns a worker's memory per backend, model and these arguments
(:mod:`hive.state.memory_book`), and estimates it from them before the first run
(:mod:`hive.devices.estimate`). For the engines hive knows, only the options below count, so
that a worker run with another ``--threads`` or ``--alias`` reuses what was learned:

* llama-server: the context size and slots (the KV cache is ``n_ctx`` cells, shared by the
  slots), the KV cache's types and whether it is unified or offloaded, the batch and micro-batch
  (the compute buffers), the layers on the GPU and the split across GPUs (what lives where), flash
  attention (without it, the attention scores take ``n_ctx x ubatch x heads`` floats), mmap and
  mlock (how the weights are held), the prompt cache in RAM, a draft model, a projector, LoRA.
* vLLM: the model length, sequences and batched tokens (activations), the GPU memory share, the
  KV cache's type, size and block size, the weights' dtype and quantization, the tensor and
  pipeline parallel sizes, swap and CPU offload, eager mode (CUDA graphs take memory); on the CPU
  build ``VLLM_CPU_KVCACHE_SPACE`` (its KV cache, in GiB).
* SGLang: the static memory fraction, context length, running requests and total tokens, the KV
  cache's type, the dtype and quantization, the tensor parallel size, chunked prefill, CUDA
  graphs.

For any other engine hive cannot know what an option does: every argument and variable counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Literal

Engine = Literal["llama-server", "vllm", "sglang"]

#: A value option's spellings -> its name; a flag's spellings -> (its name, the value it sets).
_LLAMA_VALUES = {
    "-c": "ctx_size", "--ctx-size": "ctx_size",
    "-np": "parallel", "--parallel": "parallel",
    "-ctk": "cache_type_k", "--cache-type-k": "cache_type_k",
    "-ctv": "cache_type_v", "--cache-type-v": "cache_type_v",
    "-b": "batch_size", "--batch-size": "batch_size",
    "-ub": "ubatch_size", "--ubatch-size": "ubatch_size",
    "-ngl": "gpu_layers", "--gpu-layers": "gpu_layers", "--n-gpu-layers": "gpu_layers",
    "-sm": "split_mode", "--split-mode": "split_mode",
    "-ts": "tensor_split", "--tensor-split": "tensor_split",
    "-ot": "override_tensor", "--override-tensor": "override_tensor",
    "-cram": "cache_ram", "--cache-ram": "cache_ram",
    "-md": "model_draft", "--model-draft": "model_draft",
    "-cd": "ctx_size_draft", "--ctx-size-draft": "ctx_size_draft",
    "-mm": "mmproj", "--mmproj": "mmproj",
    "--lora": "lora",
    "--kv-unified-per-slot": "kv_unified_per_slot",
    "-lm": "load_mode", "--load-mode": "load_mode",
}  # fmt: skip
_LLAMA_FLAGS = {
    "-kvu": ("kv_unified", "on"), "--kv-unified": ("kv_unified", "on"),
    "-no-kvu": ("kv_unified", "off"), "--no-kv-unified": ("kv_unified", "off"),
    "-nkvo": ("kv_offload", "off"), "--no-kv-offload": ("kv_offload", "off"),
    "-kvo": ("kv_offload", "on"), "--kv-offload": ("kv_offload", "on"),
    "--no-mmap": ("mmap", "off"), "--mmap": ("mmap", "on"),
    "--mlock": ("mlock", "on"),
    "--swa-full": ("swa_full", "on"),
    "--cpu-moe": ("cpu_moe", "on"), "-cmoe": ("cpu_moe", "on"),
}  # fmt: skip
#: Flags whose value is optional: ``-fa`` alone is ``on``.
_LLAMA_OPTIONAL = {"-fa": "flash_attn", "--flash-attn": "flash_attn"}
_LLAMA_ENV = {
    "LLAMA_ARG_CTX_SIZE": "ctx_size", "LLAMA_ARG_N_PARALLEL": "parallel",
    "LLAMA_ARG_CACHE_TYPE_K": "cache_type_k", "LLAMA_ARG_CACHE_TYPE_V": "cache_type_v",
    "LLAMA_ARG_BATCH": "batch_size", "LLAMA_ARG_UBATCH": "ubatch_size",
    "LLAMA_ARG_N_GPU_LAYERS": "gpu_layers", "LLAMA_ARG_FLASH_ATTN": "flash_attn",
    "LLAMA_ARG_CACHE_RAM": "cache_ram", "LLAMA_ARG_KV_UNIFIED": "kv_unified",
}  # fmt: skip

_VLLM_VALUES = {
    "--max-model-len": "max_model_len", "--max-num-seqs": "max_num_seqs",
    "--max-num-batched-tokens": "max_num_batched_tokens",
    "--gpu-memory-utilization": "gpu_memory_utilization",
    "--kv-cache-dtype": "kv_cache_dtype", "--kv-cache-memory-bytes": "kv_cache_memory_bytes",
    "--kv-cache-memory": "kv_cache_memory_bytes", "--block-size": "block_size",
    "--dtype": "dtype", "--quantization": "quantization", "-q": "quantization",
    "--tensor-parallel-size": "tensor_parallel_size", "-tp": "tensor_parallel_size",
    "--pipeline-parallel-size": "pipeline_parallel_size", "-pp": "pipeline_parallel_size",
    "--swap-space": "swap_space", "--cpu-offload-gb": "cpu_offload_gb",
    "--max-cudagraph-capture-size": "max_cudagraph_capture_size",
}  # fmt: skip
_VLLM_FLAGS = {"--enforce-eager": ("enforce_eager", "on")}
_VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "cpu_kvcache_space"}

_SGLANG_VALUES = {
    "--mem-fraction-static": "mem_fraction_static", "--context-length": "context_length",
    "--max-running-requests": "max_running_requests", "--max-total-tokens": "max_total_tokens",
    "--kv-cache-dtype": "kv_cache_dtype", "--dtype": "dtype", "--quantization": "quantization",
    "--tp-size": "tp_size", "--tp": "tp_size", "--chunked-prefill-size": "chunked_prefill_size",
    "--cuda-graph-max-bs": "cuda_graph_max_bs",
}  # fmt: skip
_SGLANG_FLAGS = {"--disable-cuda-graph": ("disable_cuda_graph", "on")}

_TABLES: dict[Engine, tuple[dict[str, str], dict[str, tuple[str, str]], dict[str, str]]] = {
    "llama-server": (_LLAMA_VALUES, _LLAMA_FLAGS, _LLAMA_ENV),
    "vllm": (_VLLM_VALUES, _VLLM_FLAGS, _VLLM_ENV),
    "sglang": (_SGLANG_VALUES, _SGLANG_FLAGS, {}),
}


def engine_of(command: Sequence[str]) -> Engine | None:
    """The engine a backend's command runs, when hive knows it: ``llama-server`` (its binary,
    by any path), ``vllm`` (``vllm serve``) or ``sglang`` (``-m sglang.launch_server``)."""
    if not command:
        return None
    program = PurePath(command[0]).name
    if program == "llama-server":
        return "llama-server"
    if program == "vllm":
        return "vllm"
    if "sglang.launch_server" in command:
        return "sglang"
    return None


def memory_options(
    engine: Engine, argv: Sequence[str], env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The options of ``argv`` (and the variables of ``env``) that change ``engine``'s memory,
    by name: ``{"ctx_size": "8192", "parallel": "4"}``. The last of an option repeated wins;
    arguments win over the environment, as the engines have it."""
    values, flags, variables = _TABLES[engine]
    found = {variables[k]: v for k, v in (env or {}).items() if k in variables}
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name, sep, inline = token.partition("=")
        if not token.startswith("-"):
            i += 1
            continue
        key = name if sep else token
        if key in values:
            if sep:
                found[values[key]] = inline
            elif i + 1 < len(tokens):
                found[values[key]] = tokens[i + 1]
                i += 1
        elif key in flags:
            flag, value = flags[key]
            found[flag] = value
        elif engine == "llama-server" and key in _LLAMA_OPTIONAL:
            follows = tokens[i + 1] if i + 1 < len(tokens) else ""
            if sep:
                found[_LLAMA_OPTIONAL[key]] = inline
            elif follows in ("on", "off", "auto"):
                found[_LLAMA_OPTIONAL[key]] = follows
                i += 1
            else:
                found[_LLAMA_OPTIONAL[key]] = "on"
        i += 1
    return dict(sorted(found.items()))


def number(options: Mapping[str, str], name: str, default: float) -> float:
    """An option's value as a number; ``default`` when absent or not a number."""
    try:
        return float(options[name])
    except (KeyError, ValueError):
        return default

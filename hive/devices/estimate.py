"""How much memory a model will take before it has ever run: read from the model's own files.

* **GGUF (llama-server).** The weights are the tensor table's sizes, read with the ``gguf``
  package (the model's tensors are never read). The KV cache is ``n_ctx`` cells (``--ctx-size``,
  else the context the model was trained for; the slots share them) times, for every layer, its
  KV heads times the key and value lengths, at the cache's types (f16 unless ``-ctk``/``-ctv``
  say). The compute buffer is what llama.cpp reserves for one micro-batch (``-ub``, 512): the
  larger of the feed-forward activations and the logits, plus the attention mask (with flash
  attention, llama.cpp's default, else the attention scores too). Then what the binary itself
  takes. On a GPU, the layers ``-ngl`` offloads (all by default), their KV cache, the compute
  buffer and a CUDA context are GPU memory; the token embeddings and the rest stay in RAM.
* **safetensors (vLLM).** The weights are the safetensors headers' tensor sizes; ``config.json``
  says the layers and heads. On the CPU build the KV cache is what the engine is told to take
  (``VLLM_CPU_KVCACHE_SPACE`` GiB, or ``--kv-cache-memory-bytes``), plus its runtime. On a GPU
  vLLM takes a share of the GPU's memory (``--gpu-memory-utilization``) whatever the model, so
  there the share declared is the figure; hive has no measured basis for its host memory there,
  and gives none before the first run (what that run measures is learned).

Figures are MiB, rounded up. Every function here reads files: call it from a thread.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hive.devices.engine_args import Engine, number

MIB = 1024 * 1024
#: What llama-server itself keeps resident beside the model (binary, libraries, threads,
#: HTTP server), measured with the CPU build of llama.cpp that engines/llama_server.py pins.
LLAMA_RUNTIME_MIB = 16
#: Not measured by hive (no CUDA build on its test hosts): a CUDA build's host runtime and the
#: CUDA context each process holds on its GPU. Learned figures replace them after one run.
LLAMA_CUDA_RUNTIME_MIB, CUDA_CONTEXT_MIB = 256, 512
#: vLLM's CPU build beside its weights and KV cache: the API server and the engine core, each a
#: Python with torch loaded (1,893 MiB measured with vLLM 0.32.0's CPU build and a tiny model).
VLLM_CPU_RUNTIME_MIB = 1900
#: Bytes per element of each KV cache type (quantized types by their block size).
KV_TYPE_BYTES = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
    "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32,
}  # fmt: skip
_DTYPE_BYTES = {
    "float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "F32": 4, "F16": 2,
    "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_SPLIT = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")


class NotEstimable(Exception):
    """The model cannot be estimated: not a local file hive can read, or not of a kind it
    knows. The message says why, for the log."""


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a worker will take: host memory, GPU memory on each of its GPUs (None on the CPU,
    or where the engine takes a share of the GPU rather than what the model needs), and how
    the figure was made."""

    host_mib: int | None
    gpu_mib: int | None
    detail: str


def _mib(size: float) -> int:
    return math.ceil(size / MIB)


def estimate(
    engine: Engine, model: str, options: Mapping[str, str], kind: str, gpus: int = 1
) -> Estimate:
    """The estimate for ``model`` run by ``engine`` with these memory options
    (:func:`hive.devices.engine_args.memory_options`) on a ``cpu`` or ``gpu`` worker."""
    if engine == "llama-server":
        return gguf_estimate(Path(model), options, kind, gpus)
    if engine == "vllm":
        return vllm_estimate(model, options, kind)
    raise NotEstimable(f"hive has no estimate for {engine}")


# -- GGUF ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GgufModel:
    """What an estimate needs of a GGUF file: its tensors' sizes and its shape."""

    tensors: dict[str, int]
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: list[int]
    key_length: int
    value_length: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int

    @property
    def weights(self) -> int:
        return sum(self.tensors.values())

    def layer(self, index: int) -> int:
        prefix = f"blk.{index}."
        return sum(size for name, size in self.tensors.items() if name.startswith(prefix))


def read_gguf(path: Path) -> GgufModel:
    """The tensor table and shape of a GGUF model (every part of a split one)."""
    try:
        import gguf  # a runtime dependency, imported where it is used: it loads numpy
    except ImportError as exc:
        raise NotEstimable(f"the gguf package is not installed ({exc})") from None
    if not path.is_file():
        raise NotEstimable(f"{path} is not a local file")
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError, IndexError, struct.error) as exc:
        raise NotEstimable(f"{path} is not a GGUF file hive can read: {exc}") from None
    tensors = {t.name: int(t.n_bytes) for t in reader.tensors}
    if split := _SPLIT.match(path.name):
        for part in range(2, int(split[3]) + 1):
            other = path.with_name(f"{split[1]}-{part:05d}-of-{split[3]}.gguf")
            try:
                tensors |= {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(other)).tensors}
            except (OSError, ValueError, IndexError, struct.error) as exc:
                raise NotEstimable(f"cannot read {other}: {exc}") from None

    def value(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    arch = str(value("general.architecture", "llama"))
    n_layer = int(value(f"{arch}.block_count", 0))
    n_embd = int(value(f"{arch}.embedding_length", 0))
    heads = value(f"{arch}.attention.head_count", 1)
    n_head = max(heads) if isinstance(heads, list) else int(heads)
    heads_kv = value(f"{arch}.attention.head_count_kv", n_head)
    n_head_kv = [int(h) for h in heads_kv] if isinstance(heads_kv, list) else [int(heads_kv)]
    if len(n_head_kv) < n_layer:
        n_head_kv = n_head_kv[:1] * n_layer
    head = n_embd // max(n_head, 1)
    ff = value(f"{arch}.feed_forward_length", 4 * n_embd)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return GgufModel(
        tensors=tensors,
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        key_length=int(value(f"{arch}.attention.key_length", head)),
        value_length=int(value(f"{arch}.attention.value_length", head)),
        n_ff=max(ff) if isinstance(ff, list) else int(ff),
        n_vocab=len(tokens.data) if tokens is not None else int(value(f"{arch}.vocab_size", 0)),
        n_ctx_train=int(value(f"{arch}.context_length", 4096)),
    )


@dataclass(frozen=True, slots=True)
class LlamaContext:
    """The sizes llama-server's options give: cells, cells one sequence sees, micro-batch."""

    n_ctx: int
    n_ctx_seq: int
    slots: int
    ubatch: int
    flash_attn: bool


def llama_context(model: GgufModel, options: Mapping[str, str]) -> LlamaContext:
    """``n_ctx`` as llama-server sizes it: ``--ctx-size``, else the trained context (0 means
    that too), padded to 256 cells; shared by the slots, each of which sees all of it when the
    KV cache is unified (the default when the slots are left to llama-server)."""
    slots = int(number(options, "parallel", -1))
    auto_slots = slots < 1
    slots = 4 if auto_slots else slots
    n_ctx = int(number(options, "ctx_size", 0))
    per_slot = int(number(options, "kv_unified_per_slot", 0))
    if n_ctx <= 0:
        n_ctx = slots * per_slot if per_slot > 0 else model.n_ctx_train
    n_ctx = -(-n_ctx // 256) * 256
    unified = options.get("kv_unified", "on" if auto_slots else "off") in ("on", "1", "true")
    n_ctx_seq = n_ctx if unified else max(n_ctx // slots, 1)
    batch = int(number(options, "batch_size", 2048))
    ubatch = min(int(number(options, "ubatch_size", 512)), batch, n_ctx)
    flash = options.get("flash_attn", "auto") not in ("off", "0", "false")
    return LlamaContext(n_ctx, n_ctx_seq, slots, ubatch, flash)


def kv_cache_bytes(model: GgufModel, n_ctx: int, type_k: str, type_v: str, layers: int) -> float:
    """The KV cache of ``layers`` of the model's layers (the last ones) at ``n_ctx`` cells."""
    k = KV_TYPE_BYTES.get(type_k, 2.0)
    v = KV_TYPE_BYTES.get(type_v, 2.0)
    heads = model.n_head_kv[model.n_layer - layers :] if layers else []
    return n_ctx * sum(h * (model.key_length * k + model.value_length * v) for h in heads)


def compute_bytes(model: GgufModel, ctx: LlamaContext) -> float:
    """The compute buffer llama.cpp reserves for a micro-batch: the larger of the feed-forward
    activations and the logits (llama.cpp reserves logits for every token of a micro-batch),
    plus the attention mask (f16) and, without flash attention, the attention scores (f32)."""
    ub = ctx.ubatch
    activations = max(
        4 * ub * (4 * model.n_ff + 2 * model.n_embd), 4 * ub * (model.n_vocab + model.n_embd)
    )
    attention = 2 * ub * ctx.n_ctx_seq
    if not ctx.flash_attn:
        attention += 4 * ub * ctx.n_ctx_seq * model.n_head
    return activations + attention


def gguf_estimate(path: Path, options: Mapping[str, str], kind: str, gpus: int = 1) -> Estimate:
    model = read_gguf(path)
    ctx = llama_context(model, options)
    type_k, type_v = options.get("cache_type_k", "f16"), options.get("cache_type_v", "f16")
    compute = compute_bytes(model, ctx)
    output = 4 * model.n_vocab * ctx.slots
    if kind != "gpu":
        kv = kv_cache_bytes(model, ctx.n_ctx, type_k, type_v, model.n_layer)
        total = model.weights + kv + compute + output + LLAMA_RUNTIME_MIB * MIB
        detail = (
            f"weights {_mib(model.weights)} MiB + KV cache {_mib(kv)} MiB ({ctx.n_ctx} cells "
            f"{type_k}/{type_v}) + compute {_mib(compute + output)} MiB "
            f"+ llama-server {LLAMA_RUNTIME_MIB} MiB"
        )
        return Estimate(_mib(total), None, detail)
    layers = options.get("gpu_layers", "auto")
    offloaded = model.n_layer + 1
    if layers not in ("auto", "all") and (n := int(number(options, "gpu_layers", -1))) >= 0:
        offloaded = min(n, model.n_layer + 1)
    on_gpu = min(offloaded, model.n_layer)
    gpu_weights = sum(model.layer(i) for i in range(model.n_layer - on_gpu, model.n_layer))
    output_layer = sum(model.tensors.get(n, 0) for n in ("output.weight", "output_norm.weight"))
    if offloaded > model.n_layer:
        gpu_weights += output_layer
    kv_gpu = 0.0
    if options.get("kv_offload", "on") != "off":
        kv_gpu = kv_cache_bytes(model, ctx.n_ctx, type_k, type_v, on_gpu)
    kv_host = kv_cache_bytes(model, ctx.n_ctx, type_k, type_v, model.n_layer) - kv_gpu
    host_compute = compute if offloaded <= model.n_layer else 4 * ctx.ubatch * model.n_embd
    gpu_total = gpu_weights + kv_gpu + compute
    host = model.weights - gpu_weights + kv_host + host_compute + output
    detail = (
        f"GPU: {on_gpu}/{model.n_layer} layers {_mib(gpu_weights)} MiB + KV cache "
        f"{_mib(kv_gpu)} MiB ({ctx.n_ctx} cells {type_k}/{type_v}) + compute {_mib(compute)} MiB"
        f" + CUDA context {CUDA_CONTEXT_MIB} MiB; host: {_mib(host)} MiB + runtime "
        f"{LLAMA_CUDA_RUNTIME_MIB} MiB"
    )
    per_gpu = _mib(gpu_total / max(gpus, 1)) + CUDA_CONTEXT_MIB
    return Estimate(_mib(host) + LLAMA_CUDA_RUNTIME_MIB, per_gpu, detail)


# -- safetensors (vLLM) --------------------------------------------------------------------------


def model_directory(model: str) -> Path:
    """A local model directory, or the newest snapshot of a Hugging Face id in the cache
    (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``)."""
    local = Path(model)
    if local.is_dir():
        return local
    if model.count("/") == 1 and not model.startswith(("/", ".")):
        hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
        )
        snapshots = Path(hub) / f"models--{model.replace('/', '--')}" / "snapshots"
        found = (
            sorted(snapshots.glob("*"), key=lambda p: p.stat().st_mtime)
            if snapshots.is_dir()
            else []
        )
        if found:
            return found[-1]
    raise NotEstimable(f"{model} is neither a local directory nor in the Hugging Face cache")


def safetensors_bytes(directory: Path) -> tuple[int, str | None]:
    """The size of every tensor in the directory's ``*.safetensors`` files, from their headers
    (8 bytes of length, then JSON), and the dtype most of them have."""
    total, by_dtype = 0, dict[str, int]()
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise NotEstimable(f"{directory} has no *.safetensors files")
    for file in files:
        try:
            with open(file, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > 100 * MIB:
                    raise NotEstimable(f"{file}: a header of {length} bytes is not safetensors")
                header = json.loads(handle.read(length))
        except (OSError, ValueError, struct.error) as exc:
            raise NotEstimable(f"cannot read {file}: {exc}") from None
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            begin, end = tensor["data_offsets"]
            total += end - begin
            by_dtype[tensor["dtype"]] = by_dtype.get(tensor["dtype"], 0) + end - begin
    main = max(by_dtype, key=lambda d: by_dtype[d]) if by_dtype else None
    return total, main


def vllm_estimate(model: str, options: Mapping[str, str], kind: str) -> Estimate:
    if kind == "gpu":
        raise NotEstimable("vLLM on a GPU takes its share of the GPU; hive learns its host memory")
    directory = model_directory(model)
    weights, dtype = safetensors_bytes(directory)
    wanted = options.get("dtype", "auto")
    if wanted in _DTYPE_BYTES and dtype in _DTYPE_BYTES:
        weights = weights * _DTYPE_BYTES[wanted] // _DTYPE_BYTES[dtype]
    if "kv_cache_memory_bytes" in options:
        kv = number(options, "kv_cache_memory_bytes", 0)
        told = "--kv-cache-memory-bytes"
    else:
        kv = number(options, "cpu_kvcache_space", 4) * 1024 * MIB
        told = "VLLM_CPU_KVCACHE_SPACE"
    total = weights + kv + VLLM_CPU_RUNTIME_MIB * MIB
    detail = (
        f"weights {_mib(weights)} MiB + KV cache {_mib(kv)} MiB ({told}) "
        f"+ vLLM runtime {VLLM_CPU_RUNTIME_MIB} MiB"
    )
    return Estimate(_mib(total), None, detail)

"""What hive reads of an engine, as a backend configures it: its load and progress
(``[backends.NAME.load]``) and the log lines that end its start-up phases
(``startup_phases``), with the built-in values for the engines hive knows, and the built-in
backends themselves (``BUILTIN_BACKENDS``, the templates of docs/backends.md).

Kept out of :mod:`hive.config` (which re-exports :class:`LoadConfig`) so that the engines'
habits, which change with their versions, are found in one place.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: The phases hive names itself (:mod:`hive.workers.phases`); an engine's phase may not be one.
HIVE_PHASES = frozenset({"hive", "process", "probe", "register"})


class LoadConfig(BaseModel):
    """Where an engine says how many requests it runs, and how to read it
    (:mod:`hive.workers.engine_load`)."""

    model_config = ConfigDict(extra="forbid")

    path: str
    #: ``llama-server``: its ``/slots``; ``sglang``: its ``/get_load``; ``prometheus``: the sum of
    #: the ``running`` (and ``waiting``) metrics in a Prometheus text page such as ``/metrics``.
    format: Literal["llama-server", "sglang", "prometheus"]
    running: list[str] = []
    waiting: list[str] = []
    #: ``prometheus`` only: counters that move while the engine works (tokens generated, engine
    #: steps); while it has requests and none of them moves for ``stall_timeout``, it stalled.
    #: ``llama-server`` needs none: its slots' tasks and token counts are its progress.
    progress: list[str] = []
    #: Seconds between reads while the worker is ready or busy and sends no heartbeats.
    period: Annotated[float, Field(gt=0)] = 2.0

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError("must start with '/'")
        return path

    @model_validator(mode="after")
    def _metrics_named(self) -> LoadConfig:
        if self.format == "prometheus" and not self.running:
            raise ValueError("running: name the metric(s) of running requests for prometheus")
        if self.format != "prometheus" and (self.running or self.waiting or self.progress):
            raise ValueError('running, waiting and progress are for format = "prometheus" only')
        return self


class PhasePattern(BaseModel):
    """One phase of an engine's start-up: it ends when a line of the worker's log matches
    ``pattern`` (a Python regular expression, searched in the line)."""

    model_config = ConfigDict(extra="forbid")

    phase: Annotated[str, Field(min_length=1, max_length=64)]
    pattern: Annotated[str, Field(min_length=1, max_length=1000)]

    @field_validator("phase")
    @classmethod
    def _not_hives(cls, phase: str) -> str:
        if phase in HIVE_PHASES:
            names = ", ".join(sorted(HIVE_PHASES))
            raise ValueError(f"{phase!r} is a phase hive names itself ({names})")
        return phase

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return pattern


class StartupPhase(BaseModel):
    """Where part of an attempt's start-up went (the record's ``startup``)."""

    model_config = ConfigDict(frozen=True)

    phase: str
    seconds: float


def _phases(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"phase": phase, "pattern": pattern} for phase, pattern in pairs]


#: vLLM (V1 engine, 0.8 to 0.32): its log lines as its source has them. The CPU build prints
#: "Warming up done." where a GPU prints "torch.compile takes/took ... in total", and no graph
#: capture; a line a version does not print is a phase that version does not have.
VLLM_PHASES = _phases(
    ("engine", r"Starting to load model"),
    ("weights", r"Loading weights took"),
    ("model", r"Model loading took"),
    ("compile", r"torch\.compile (takes|took) .* in total|Warming up done"),
    ("kv cache", r"KV cache size:"),
    ("graphs", r"Graph capturing finished"),
    ("engine ready", r"init engine \(profile"),
    ("api server", r"Starting vLLM (API )?server"),
    ("listening", r"Application startup complete"),
)
#: llama.cpp's llama-server: ``main:`` before mid-2025, ``llama_server:`` since.
LLAMA_SERVER_PHASES = _phases(
    ("init", r"(main|load_model): loading model"),
    ("model", r"(main|llama_server): model loaded"),
    ("listening", r"(main|llama_server): (server is )?listening on"),
)
#: SGLang (0.4 to 0.5), from its source; not run here.
SGLANG_PHASES = _phases(
    ("weights", r"Load weight end"),
    ("kv cache", r"KV Cache is allocated"),
    ("graphs", r"Capture cuda graph end"),
    ("listening", r"Uvicorn running on|Application startup complete"),
)
#: hive's demo worker (:mod:`hive.demo_worker`).
DEMO_PHASES = _phases(
    ("listening", r"^demo worker: pid \d+ serving"),
    ("model", r"^demo worker: model loaded"),
)
#: vLLM's counters of work done: tokens generated, and one per engine step (prefill or decode).
VLLM_PROGRESS = [
    "vllm:generation_tokens_total",
    "vllm:prompt_tokens_total",
    "vllm:iteration_tokens_total_count",
]


#: Backends every hive knows. A ``[backends.NAME]`` table in the file overrides them key by key.
BUILTIN_BACKENDS: dict[str, dict[str, Any]] = {
    "demo": {
        "command": ["{python}", "-m", "hive.demo_worker", "--port", "{port}", "--model", "{model}"],
        "role_args": {
            "prefill": ["--role", "prefill", "--bootstrap-port", "{bootstrap_port}"],
            "decode": ["--role", "decode"],
        },
        "load": {"path": "/v1/loads?include=core", "format": "sglang"},
        "startup_phases": DEMO_PHASES,
        "health_path": "/health",
        "startup_timeout": 120,
        "gpu": "optional",
    },
    "vllm": {
        "command": [
            "vllm", "serve", "{model}",
            "--served-model-name", "{model}",
            "--host", "{host}", "--port", "{port}",
        ],
        "device_args": {"gpu": ["--tensor-parallel-size", "{gpus}"]},
        # CPU build: a 4 GiB KV cache (unset: 92 % of the host's memory), threads on its cores.
        "device_env": {
            "cpu": {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "{cpus}"}
        },
        "share_args": ["--gpu-memory-utilization", "{gpu_memory_fraction}"],
        "load": {
            "path": "/metrics",
            "format": "prometheus",
            "running": ["vllm:num_requests_running"],
            "waiting": ["vllm:num_requests_waiting"],
            "progress": VLLM_PROGRESS,
        },
        "startup_phases": VLLM_PHASES,
        "health_path": "/health",
        "startup_timeout": 1200,
        "gpu": "auto",
    },
    "sglang": {
        "command": [
            "{python}", "-m", "sglang.launch_server",
            "--model-path", "{model}",
            "--served-model-name", "{model}",
            "--host", "{host}", "--port", "{port}",
            "--tp-size", "{gpus}",
        ],
        "share_args": ["--mem-fraction-static", "{gpu_memory_fraction}"],
        "load": {"path": "/v1/loads?include=core", "format": "sglang"},
        "startup_phases": SGLANG_PHASES,
        # Its /health otherwise runs a one-token generation, which waits behind running work.
        "env": {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "false"},
        "role_args": {
            "prefill": [
                "--disaggregation-mode", "prefill",
                "--disaggregation-bootstrap-port", "{bootstrap_port}",
            ],
            "decode": ["--disaggregation-mode", "decode"],
        },
        "health_path": "/health",
        "startup_timeout": 1200,
        "gpu": True,
    },
    "llama-server": {
        "command": [
            "llama-server", "--model", "{model}",
            "--alias", "{model}",
            "--host", "{host}", "--port", "{port}",
            "--threads", "{ncpus}",
        ],
        "load": {"path": "/slots", "format": "llama-server"},
        "startup_phases": LLAMA_SERVER_PHASES,
        "health_path": "/health",
        "startup_timeout": 600,
        "gpu": "optional",
    },
}  # fmt: skip

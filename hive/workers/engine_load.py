"""Engine load: how many requests an engine says it is running and holding, from its own report.

Engines that do not heartbeat to hive still say how busy they are: llama-server's ``/slots``
(one entry per slot, ``is_processing``), SGLang's ``/v1/loads`` (one entry per data-parallel
rank, ``num_running_reqs`` and ``num_waiting_reqs``; ``/get_load`` before 0.5), and any
engine's Prometheus ``/metrics`` (vLLM's ``vllm:num_requests_running`` and
``vllm:num_requests_waiting``). :func:`parse` turns one such
answer into a :class:`Load`; the worker's probes read it, and the registry makes the worker
``busy`` while ``in_flight`` is above zero.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from hive.engine_config import LoadConfig


class LoadError(ValueError):
    """The engine's answer is not the load report its backend said it would be."""


@dataclass(frozen=True, slots=True)
class Load:
    """Requests the engine is running now, and those it holds waiting for a slot."""

    running: int
    waiting: int = 0
    #: What the engine has done so far (counters, its slots' tasks and token counts), compared
    #: only for change: a busy engine whose progress stands still is stalled. None: not said.
    progress: tuple[float, ...] | None = None

    @property
    def in_flight(self) -> int:
        return self.running + self.waiting


def parse(config: LoadConfig, body: bytes) -> Load:
    """The load in one answer of the engine's load endpoint, read as ``config.format`` says."""
    if config.format == "prometheus":
        return _prometheus(body.decode("utf-8", "replace"), config)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LoadError(f"{config.path} did not answer JSON: {exc}") from None
    if config.format == "llama-server":
        return _llama_slots(data, config.path)
    return _sglang_load(data, config.path)


def _llama_slots(data: Any, path: str) -> Load:
    """llama-server's ``GET /slots``: a list of slots, each with ``is_processing``; a busy
    slot's progress is its task and the tokens it decoded and took in so far (``n_decoded`` in
    ``next_token`` since 2025, beside it before)."""
    if not isinstance(data, list) or not all(isinstance(s, dict) for s in data):
        raise LoadError(f"{path} did not answer a list of slots")
    busy = [slot for slot in data if slot.get("is_processing") is True]
    progress: list[float] = []
    for slot in busy:
        tokens = slot.get("next_token")
        first = tokens[0] if isinstance(tokens, list) and tokens else tokens
        decoded = first.get("n_decoded") if isinstance(first, dict) else slot.get("n_decoded")
        figures = (
            slot.get("id"),
            slot.get("id_task"),
            decoded,
            slot.get("n_prompt_tokens_processed"),
        )
        if not isinstance(decoded, int | float):
            progress = []
            break  # a version that does not say: no progress, rather than a false stall
        progress += [f if isinstance(f, int | float) else -1 for f in figures]
    return Load(running=len(busy), progress=tuple(progress) if progress or not busy else None)


def _sglang_load(data: Any, path: str) -> Load:
    """SGLang's load, one entry per data-parallel rank: ``GET /v1/loads`` (0.5.x: ``{"loads":
    [{"num_running_reqs", "num_waiting_reqs", ...}]}``) or the older ``GET /get_load`` (a list
    of ``{"num_reqs", "num_waiting_reqs", ...}``)."""
    if isinstance(data, dict) and isinstance(data.get("loads"), list):
        ranks = data["loads"]
    else:
        ranks = data if isinstance(data, list) else [data]
    running = waiting = 0
    for rank in ranks:
        count = (
            rank.get("num_running_reqs", rank.get("num_reqs")) if isinstance(rank, dict) else None
        )
        if not isinstance(count, int):
            raise LoadError(f"{path} did not answer SGLang's load (num_running_reqs per rank)")
        running += count
        queued = rank.get("num_waiting_reqs", 0)
        waiting += queued if isinstance(queued, int) else 0
    return Load(running=running, waiting=waiting)


def _prometheus(text: str, config: LoadConfig) -> Load:
    """Sum the samples of the named metrics (every label set) in Prometheus' text format."""
    sums = dict.fromkeys([*config.running, *config.waiting, *config.progress], 0.0)
    seen: set[str] = set()
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{") if "{" in line.split(" ", 1)[0] else line.partition(" ")
        if name not in sums:
            continue
        value = rest.rpartition("}")[2] if "}" in rest else rest
        fields = value.split()
        try:
            number = float(fields[0]) if fields else math.nan
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            sums[name] += number
            seen.add(name)
    if not seen.intersection(config.running):
        names = ", ".join(config.running)
        raise LoadError(f"{config.path} has no sample of {names}")
    progress = [name for name in config.progress if name in seen]
    return Load(
        running=round(sum(sums[n] for n in config.running)),
        waiting=round(sum(sums[n] for n in config.waiting)),
        progress=tuple(sums[n] for n in progress) if progress else None,
    )

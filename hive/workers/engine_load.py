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

from hive.config import LoadConfig


class LoadError(ValueError):
    """The engine's answer is not the load report its backend said it would be."""


@dataclass(frozen=True, slots=True)
class Load:
    """Requests the engine is running now, and those it holds waiting for a slot."""

    running: int
    waiting: int = 0

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
    """llama-server's ``GET /slots``: a list of slots, each with ``is_processing``."""
    if not isinstance(data, list) or not all(isinstance(s, dict) for s in data):
        raise LoadError(f"{path} did not answer a list of slots")
    return Load(running=sum(1 for slot in data if slot.get("is_processing") is True))


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
    sums = dict.fromkeys([*config.running, *config.waiting], 0.0)
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
    return Load(
        running=round(sum(sums[n] for n in config.running)),
        waiting=round(sum(sums[n] for n in config.waiting)),
    )

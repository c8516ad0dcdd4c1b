"""How much memory a worker will need: declared, learned, or estimated before its first run.

For each resource hive reserves (host memory; memory on each GPU of a worker that shares its
GPUs), the figure is the first of:

1. **declared**: the request's ``memory_mib`` (host) or ``gpu_memory_mib`` (per GPU);
2. **learned**: the largest peak of the last runs of the same memory key (backend, model, the
   arguments that change memory, the GPU share: :func:`memory_key`), that became ready;
3. **estimated**: from the model's files (:mod:`hive.devices.estimate`), for the engines hive
   knows how to estimate (llama-server with GGUF, vLLM's CPU build with safetensors).

The record's ``memory_source`` says which: the source of a figure the request did not declare
(learned or estimated) when there is one, ``declared`` when the request declared every figure,
and null when hive reserves no memory for the worker (an engine and model it cannot estimate,
never run before). The estimates read files, so they are made before the spawn reaches the
registry (:meth:`Sizing.prepare`, in a thread); :meth:`Sizing.need` only looks up, under the
registry's lock.

vLLM and SGLang take a share of the GPU they are given (``--gpu-memory-utilization``,
``--mem-fraction-static``) whatever the model: without a declared ``gpu_memory_mib`` they hold
their GPUs whole, as before; no learned or estimated figure stands in for theirs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

from hive.config import BackendConfig
from hive.devices.engine_args import Engine, engine_of, memory_options
from hive.devices.estimate import Estimate, NotEstimable, estimate
from hive.models import Entry, SpawnRequest
from hive.state.memory_book import MemoryBook

log = logging.getLogger("hive.memory")

Source = Literal["declared", "learned", "estimated"]
Kind = Literal["cpu", "gpu"]
#: Engines that take a share of their GPU rather than what the model needs.
SHARE_TAKERS: frozenset[Engine] = frozenset({"vllm", "sglang"})
_CACHED = 256


@dataclass(frozen=True, slots=True)
class MemoryKey:
    """What a worker's memory is learned by: ``key`` (a digest) of ``about``."""

    key: str
    about: dict[str, Any]
    engine: Engine | None
    options: dict[str, str]


def memory_key(
    spec: SpawnRequest, backend_name: str, backend: BackendConfig, kind: Kind
) -> MemoryKey:
    """The memory key of a worker run from ``spec`` on a ``kind`` device: the backend, the
    model, the kind of device, on a GPU how many and the declared share, and the arguments that
    change memory: for an engine hive knows, its memory options
    (:func:`~hive.devices.engine_args.memory_options`); for any other, every argument and
    variable, as written (placeholders unexpanded: a port never makes a key of its own)."""
    # The backend's arguments and environment for the kind of device, where it has them.
    device_args: dict[str, list[str]] = getattr(backend, "device_args", {})
    device_env: dict[str, dict[str, str]] = getattr(backend, "device_env", {})
    argv = [*backend.command, *backend.role_args.get(spec.role, []), *device_args.get(kind, [])]
    if kind == "gpu" and spec.gpu_memory_mib:
        argv += backend.share_args
    argv += spec.args
    env = {**backend.env, **device_env.get(kind, {}), **spec.env}
    engine = engine_of(backend.command)
    about: dict[str, Any] = {"backend": backend_name, "model": spec.model, "device": kind}
    if kind == "gpu":
        about |= {"gpus": spec.gpus or 1, "gpu_memory_mib": spec.gpu_memory_mib}
    options: dict[str, str] = {}
    if engine is not None:
        options = memory_options(engine, argv, env)
        about["options"] = options
    else:
        about |= {"argv": argv, "env": dict(sorted(env.items()))}
    digest = hashlib.sha256(json.dumps(about, sort_keys=True).encode()).hexdigest()[:24]
    return MemoryKey(digest, about, engine, options)


@dataclass(frozen=True, slots=True)
class Need:
    """The memory a worker reserves: host MiB, MiB on each of its GPUs (None: it takes them
    whole, or runs on the CPU), where they come from, and how they were made (for the log)."""

    host_mib: int | None = None
    gpu_mib: int | None = None
    source: Source | None = None
    detail: str = ""


def _kinds(spec: SpawnRequest, backend: BackendConfig, has_gpus: bool) -> list[Kind]:
    device = spec.device
    if device == "cpu" or device.startswith("CPU-"):
        return ["cpu"]
    if device != "auto" or backend.gpu is True:
        return ["gpu"]
    kinds: list[Kind] = ["gpu"] if has_gpus and backend.gpu is not False else []
    return [*kinds, "cpu"] if backend.gpu is not True else kinds


class Sizing:
    """Declared, learned and estimated figures; the estimates kept by key (and the model
    file's size and time, so a changed file is estimated anew)."""

    def __init__(self, book: MemoryBook) -> None:
        self.book = book
        self._estimates: OrderedDict[str, tuple[object, Estimate | None]] = OrderedDict()

    async def prepare(
        self, spec: SpawnRequest, backend_name: str, backend: BackendConfig, has_gpus: bool
    ) -> None:
        """Estimate, in a thread, what no declaration or learned figure will say."""
        for kind in _kinds(spec, backend, has_gpus):
            mkey = memory_key(spec, backend_name, backend, kind)
            declared = spec.memory_mib is not None and (kind == "cpu" or spec.gpu_memory_mib)
            if declared or mkey.engine is None or self.book.learned(mkey.key) is not None:
                continue
            stamp = await asyncio.to_thread(_stamp, spec.model)
            cached = self._estimates.get(mkey.key)
            if cached is not None and cached[0] == stamp:
                self._estimates.move_to_end(mkey.key)
                continue
            gpus = spec.gpus or 1
            try:
                found: Estimate | None = await asyncio.to_thread(
                    estimate, mkey.engine, spec.model, mkey.options, kind, gpus
                )
                log.info("memory of %s on %s estimated: %s", spec.model, kind, found.detail)
            except NotEstimable as exc:
                found = None
                log.info("no memory estimate for %s on %s: %s", spec.model, kind, exc)
            self._estimates[mkey.key] = (stamp, found)
            while len(self._estimates) > _CACHED:
                self._estimates.popitem(last=False)

    def need(
        self, spec: SpawnRequest, backend_name: str, backend: BackendConfig, kind: Kind
    ) -> Need:
        """The figures a worker reserves on a ``kind`` device (no I/O: under the lock)."""
        mkey = memory_key(spec, backend_name, backend, kind)
        learned = self.book.learned(mkey.key)
        cached = self._estimates.get(mkey.key)
        guess = cached[1] if cached is not None else None
        sources: list[Source] = []
        host = spec.memory_mib
        if host is not None:
            sources.append("declared")
        elif learned is not None:
            host = learned.host_mib
            sources.append("learned")
        elif guess is not None and guess.host_mib is not None:
            host = guess.host_mib
            sources.append("estimated")
        gpu: int | None = None
        if kind == "gpu":
            gpus = spec.gpus or 1
            if spec.gpu_memory_mib is not None:
                gpu = spec.gpu_memory_mib
                sources.append("declared")
            elif mkey.engine in SHARE_TAKERS:
                pass
            elif learned is not None and learned.gpu_mib:
                gpu = math.ceil(learned.gpu_mib / gpus)
                sources.append("learned")
            elif guess is not None and guess.gpu_mib is not None:
                gpu = guess.gpu_mib
                sources.append("estimated")
        source = next((s for s in sources if s != "declared"), sources[0] if sources else None)
        detail = guess.detail if source == "estimated" and guess is not None else ""
        return Need(host, gpu, source, detail)

    def learn(
        self, entry: Entry, backend: BackendConfig, host_mib: int, gpu_mib: int | None
    ) -> None:
        """The peaks of a run of ``entry``'s worker that became ready."""
        record = entry.record
        kind: Kind = "gpu" if record.gpus else "cpu"
        mkey = memory_key(entry.spec, record.backend, backend, kind)
        self.book.learn(mkey.key, mkey.about, host_mib, gpu_mib)


def _stamp(model: str) -> object:
    """What tells a changed model file: its size and time (None where it is not a file)."""
    try:
        stat = os.stat(model)
    except OSError:
        return None
    return (stat.st_size, stat.st_mtime_ns)

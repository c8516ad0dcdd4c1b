"""Usage: what each worker's process tree uses (RSS, CPU, GPU memory), refreshed periodically.

Every ``interval`` seconds, off the event loop, the refresher reads each running worker's
cgroup (a few small files: its pids, ``memory.stat``, ``cpu.stat``) where workers have one, or
else walks each worker's process tree with psutil, sums resident memory and CPU use, and adds
up the GPU memory that NVML's latest snapshot lists for those pids. The figures go into the
records in one registry update; API reads never compute them. It only reads processes, never
signals them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable

import psutil

from hive.devices.gpu import GpuSnapshot, compute_pids
from hive.devices.placement import Placer
from hive.host.containment import Cgroups
from hive.models import LIVE_STATES, process_key
from hive.state.registry import Figures, Registry

log = logging.getLogger("hive.usage")


class Usage:
    def __init__(
        self,
        registry: Registry,
        placer: Placer,
        gpus: Callable[[], GpuSnapshot],
        interval: float = 2.0,
        cgroups: Cgroups | None = None,
    ) -> None:
        self.registry = registry
        self.placer = placer
        self.gpus = gpus
        self.interval = interval
        self._processes: dict[int, psutil.Process] = {}  # kept for cpu_percent's deltas
        self._task: asyncio.Task[None] | None = None
        #: Where workers have cgroups, figures come from them (:meth:`_refresh_cgroups`).
        self.cgroups = cgroups
        self._cpu_times: dict[str, tuple[float, int]] = {}  # worker -> (monotonic, usage_usec)
        self._read_at = time.monotonic()  # watched from the start, for three periods
        self._wake: asyncio.Event | None = None

    #: Figures are refreshed while someone read them within this many refresh periods (or GPUs
    #: are in use: placement counts what hive's own workers hold on them).
    WATCHED_PERIODS = 3

    def wanted(self) -> None:
        """Someone reads the figures (a worker list, a record, a metrics scrape): keep them
        fresh for the next three refresh periods, and refresh now if they were let go."""
        idle = time.monotonic() - self._read_at > self.watched_for
        self._read_at = time.monotonic()
        if idle and self._wake is not None:
            self._wake.set()

    def _watched(self) -> bool:
        if time.monotonic() - self._read_at <= self.watched_for:
            return True
        return any(gpu.processes for gpu in self.gpus().gpus)

    @property
    def watched_for(self) -> float:
        return self.WATCHED_PERIODS * self.interval

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="hive-usage")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        """Every ``interval`` while the figures are watched; while nobody reads them (and no GPU
        is in use), nothing: a quiet host reads no cgroup at all."""
        assert self._wake is not None
        while True:
            self._wake.clear()
            if self._watched():
                try:
                    await asyncio.to_thread(self.refresh)
                except (OSError, psutil.Error):  # the process table moved under the refresh
                    log.exception("refreshing worker figures failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)

    def _process(self, pid: int) -> psutil.Process | None:
        process = self._processes.get(pid)
        try:
            if process is None or not process.is_running():
                process = psutil.Process(pid)
                process.cpu_percent(None)  # the first call only sets the baseline
                self._processes[pid] = process
            return process
        except psutil.Error:
            self._processes.pop(pid, None)
            return None

    def refresh(self) -> None:
        """Measure every running worker now (blocking: call from a thread)."""
        if self.cgroups is not None:
            self._refresh_cgroups(self.cgroups)
            return
        gpu_memory = compute_pids(self.gpus())
        changes: dict[str, Figures] = {}
        seen: set[int] = set()
        # One pass over the process table for every tree (psutil's children() would rescan it
        # once per worker).
        children: dict[int, list[int]] = {}
        for proc in psutil.process_iter(["ppid"]):
            children.setdefault(proc.info["ppid"] or 0, []).append(proc.pid)
        for record in self.registry.list():
            if record.state not in LIVE_STATES or record.pid is None:
                continue
            tree, stack = [], [record.pid]
            while stack:
                pid = stack.pop()
                tree.append(pid)
                stack.extend(children.get(pid, ()))
            rss, cpu, gpu = 0, 0.0, None
            for pid in tree:
                process = self._process(pid)
                if process is None:
                    continue
                seen.add(process.pid)
                with contextlib.suppress(psutil.Error):
                    rss += process.memory_info().rss
                    cpu += process.cpu_percent(None)
                if process.pid in gpu_memory:
                    gpu = (gpu or 0) + gpu_memory[process.pid]
            changes[record.id] = Figures(rss, round(cpu, 1), gpu)
        for pid in set(self._processes) - seen:
            del self._processes[pid]
        self.placer.worker_pids = frozenset(seen)
        self.registry.record_usage(changes)

    def _refresh_cgroups(self, cgroups: Cgroups) -> None:
        """From each worker's cgroup: its pids, memory and CPU time, without walking the whole
        process table. CPU % is the cgroup's CPU time since the last refresh over the time
        between them."""
        gpu_memory = compute_pids(self.gpus())
        changes: dict[str, Figures] = {}
        seen: set[int] = set()
        at = time.monotonic()
        cpu_times: dict[str, tuple[float, int]] = {}
        for record in self.registry.list():
            if record.state not in LIVE_STATES or record.pid is None:
                continue
            figures = cgroups.figures(process_key(record))
            if figures is None:
                continue
            pids, memory, cpu_usec = figures
            seen |= pids
            if memory is None:
                memory = sum(_rss(pid) for pid in pids)
            cpu_times[record.id] = (at, cpu_usec)
            before = self._cpu_times.get(record.id)
            cpu = 0.0
            if before is not None and at > before[0]:
                cpu = max(cpu_usec - before[1], 0) / 1e6 / (at - before[0]) * 100
            gpu: int | None = None
            for pid in pids & gpu_memory.keys():
                gpu = (gpu or 0) + gpu_memory[pid]
            changes[record.id] = Figures(memory, round(cpu, 1), gpu)
        self._cpu_times = cpu_times
        self.placer.worker_pids = frozenset(seen)
        self.registry.record_usage(changes)


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss(pid: int) -> int:
    """A process's resident memory from ``/proc/<pid>/statm`` (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as file:
            return int(file.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0

"""Memory truth: each attempt's measured peaks, learned when it ends, and its reservation held
until its memory is really back.

**Measuring.** Per attempt, the peak host memory of the worker's whole tree: the cgroup's
``memory.peak`` where the memory controller is on for hive's cgroups (the kernel's own high-water
mark, page cache the worker brought in included); elsewhere the sum of ``VmHWM`` (each process's
peak resident memory, which the kernel keeps) over the tree's live processes, sampled. A process
that started and ended between two samples is missed; the leader's own peak never is. On a GPU,
the peak of the GPU memory NVML lists for the tree's processes (all its GPUs together), from the
GPU snapshot hive keeps anyway. Samples are taken every :attr:`MemoryWatch.period` seconds while
a worker starts (where engines allocate) and always on a GPU (NVML reports what is used now,
not a peak), every :attr:`MemoryWatch.idle_period` seconds once a CPU worker is ready (the kernel
keeps its peak meanwhile), and once more before a stop signals it. The figures are the
record's ``memory_peak_mib`` and ``gpu_memory_peak_mib`` (hot fields: stored, never told as
changes, like the usage figures).

**Learning.** When an attempt that became ready ends, its peaks go into the memory book
(:mod:`hive.state.memory_book`) under its memory key (:mod:`hive.workers.memory_need`).

**Free means free.** A worker's reservation (``memory_held``) outlives its process until the
memory is back: its cgroup (or its tagged processes) empty, and, on a GPU, a GPU snapshot taken
after the end listing none of the processes the attempt had on its GPUs. The wait is bounded by
``stop_timeout``; when it runs out the reservation is released with a sentence in the worker's
log and hive's, and what NVML still lists counts as memory used by other processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from hive.config import BackendConfig, Config
from hive.devices.gpu import GpuSnapshot
from hive.devices.host_memory import default_budget, host_total_mib
from hive.host.containment import Cgroups, Containment
from hive.models import LIVE_STATES, SpawnRequest, State, Worker, process_key
from hive.state.memory_book import MemoryBook
from hive.state.registry import Change, Registry
from hive.workers.memory_need import Sizing

log = logging.getLogger("hive.memory")

MIB = 1024 * 1024


@dataclass
class _Attempt:
    """What the meter knows of one worker's current attempt, kept up to date from the
    registry's changes (so that a tick looks at no record)."""

    leader: int
    key: str
    #: Sampled every ``period``: it starts, or it is on a GPU; else every ``idle_period``.
    often: bool = True
    live: bool = True
    host_kib: int = 0
    gpu_mib: int = 0
    gpu_pids: set[int] = field(default_factory=set)
    due_at: float = 0.0


@dataclass(frozen=True, slots=True)
class _Due:
    worker_id: str
    key: str
    leader: int


class MemoryWatch:
    """Samples the peaks of running workers, learns them, and releases reservations once the
    memory is back. The samples read ``/proc`` and cgroup files: always in a thread. Which
    workers run, and how often each is due, it hears from the registry's changes."""

    #: Seconds between samples of a starting worker or one on a GPU (NVML says what a process
    #: uses now, not its peak: a peak between two samples is missed); of every other one, whose
    #: peak the kernel keeps meanwhile (``VmHWM``, ``memory.peak``).
    period, idle_period = 1.0, 30.0

    def __init__(
        self,
        registry: Registry,
        containment: Containment,
        gpus: Callable[[], GpuSnapshot],
        sizing: Sizing,
    ) -> None:
        self.registry = registry
        self.containment = containment
        self.gpus = gpus
        self.sizing = sizing
        self._attempts: dict[str, _Attempt] = {}
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        #: Samples taken and seconds spent in them, for the bench's figure of the cost.
        self.samples, self.sample_seconds = 0, 0.0

    def cost(self) -> tuple[int, float]:
        """Samples taken so far, and the seconds they took (the metrics' figure of the cost)."""
        return self.samples, self.sample_seconds

    def start(self) -> None:
        for record in self.registry.list():
            self._heard(record.id, record)
        self._unsubscribe = self.registry.subscribe(self._on_change)
        self._task = asyncio.create_task(self._loop(), name="hive-memory")

    async def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- sampling ------------------------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        if change.to is None:
            self._attempts.pop(change.id, None)  # forgotten (a successor: it comes back)
        else:
            self._heard(change.id, change.worker)

    def _heard(self, worker_id: str, record: Worker) -> None:
        attempt = self._attempts.get(worker_id)
        if record.state not in LIVE_STATES or record.pid is None:
            if attempt is not None:
                attempt.live = False  # kept: its GPU pids, for the wait until it is released
            return
        if attempt is None or attempt.leader != record.pid:
            attempt = self._attempts[worker_id] = _Attempt(record.pid, process_key(record))
        attempt.live = True
        attempt.often = record.state == State.STARTING or bool(record.gpus)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            due = self._due(time.monotonic())
            if not due:
                continue
            try:
                await asyncio.to_thread(self._sample, due)
            except (OSError, psutil.Error):
                log.exception("sampling worker memory failed")

    def _due(self, at: float) -> list[_Due]:
        due: list[_Due] = []
        for worker_id, attempt in self._attempts.items():
            if attempt.live and attempt.due_at <= at:
                attempt.due_at = at + (self.period if attempt.often else self.idle_period)
                due.append(_Due(worker_id, attempt.key, attempt.leader))
        return due

    async def sample(self, worker_id: str) -> None:
        """Sample one worker now (before a stop signals it: its last peak)."""
        record = self.registry.get(worker_id)
        if record.pid is None or record.state not in LIVE_STATES:
            return
        self._heard(worker_id, record)
        with contextlib.suppress(OSError, psutil.Error):
            await asyncio.to_thread(
                self._sample, [_Due(worker_id, process_key(record), record.pid)]
            )

    def _sample(self, due: list[_Due]) -> None:
        """Read each due worker's peak; record those that grew (blocking: in a thread)."""
        started = time.perf_counter()
        snapshot = self.gpus()
        on_gpu: dict[int, int] = {}
        for gpu in snapshot.gpus:
            for process in gpu.processes:
                on_gpu[process.pid] = on_gpu.get(process.pid, 0) + (process.used_memory_mib or 0)
        children = self._children() if not isinstance(self.containment, Cgroups) else None
        grew: dict[str, tuple[int | None, int | None]] = {}
        for item in due:
            attempt = self._attempts.get(item.worker_id)
            if attempt is None or attempt.leader != item.leader:
                continue
            pids, host_kib = self._host_peak(item, children)
            gpu_pids = pids & on_gpu.keys()
            gpu_mib = sum(on_gpu[pid] for pid in gpu_pids)
            attempt.gpu_pids |= gpu_pids
            if host_kib > attempt.host_kib or gpu_mib > attempt.gpu_mib:
                attempt.host_kib = max(attempt.host_kib, host_kib)
                attempt.gpu_mib = max(attempt.gpu_mib, gpu_mib)
                gpu_peak = attempt.gpu_mib if attempt.gpu_mib or attempt.gpu_pids else None
                grew[item.worker_id] = (-(-attempt.host_kib // 1024), gpu_peak)
        if grew:
            self.registry.memory_peaks(grew)
        self.samples += len(due)
        self.sample_seconds += time.perf_counter() - started

    def _host_peak(self, item: _Due, children: dict[int, list[int]] | None) -> tuple[set[int], int]:
        """The tree's pids and its peak resident memory in KiB."""
        if isinstance(self.containment, Cgroups):
            path = self.containment.path(item.key)
            pids = _cgroup_pids(path / "cgroup.procs")
            with contextlib.suppress(OSError, ValueError), open(path / "memory.peak", "rb") as f:
                return pids, int(f.read().split()[0]) // 1024
        else:
            pids, stack = set(), [item.leader]
            while stack:
                pid = stack.pop()
                pids.add(pid)
                stack.extend(children.get(pid, ()) if children else ())
        return pids, sum(_hwm_kib(pid) for pid in pids)

    @staticmethod
    def _children() -> dict[int, list[int]]:
        children: dict[int, list[int]] = {}
        for proc in psutil.process_iter(["ppid"]):
            children.setdefault(proc.info["ppid"] or 0, []).append(proc.pid)
        return children

    # -- the end of an attempt -----------------------------------------------------------------

    def learn(self, worker_id: str, backend: BackendConfig | None) -> None:
        """The attempt became ready and ended: its peaks go into the memory book."""
        entry = self.registry.entry(worker_id)
        peak = entry.record.memory_peak_mib
        if backend is None or not peak:
            return
        self.sizing.learn(entry, backend, peak, entry.record.gpu_memory_peak_mib)

    async def attempt_over(
        self,
        worker_id: str,
        key: str,
        leader: int | None,
        ready: bool,
        backend: BackendConfig | None,
        bound: float | None,
    ) -> str | None:
        """An attempt ended: learn its peaks if it became ready, then release its reservation
        once its memory is back (``bound`` seconds at most; None: at once, as at shut-down).
        Returns the sentence for the logs when the bound ran out, else None."""
        if ready:
            self.learn(worker_id, backend)
        if bound is None:
            self._attempts.pop(worker_id, None)
            self.registry.memory_released(worker_id)
            return None
        return await self.released(worker_id, key, leader, bound)

    async def released(
        self, worker_id: str, key: str, leader: int | None, bound: float
    ) -> str | None:
        """Wait until the attempt's memory is back (bounded), then release its reservation;
        the sentence for the logs when the bound ran out first, else None."""
        record = self.registry.get(worker_id)
        if not record.memory_held:
            return None
        ended = time.time()
        deadline = time.monotonic() + bound
        attempt = self._attempts.pop(worker_id, None)
        gpu_pids = set(attempt.gpu_pids if attempt else ()) | ({leader} if leader else set())
        note = None
        while not await asyncio.to_thread(self.containment.empty, key):
            if time.monotonic() >= deadline:
                note = f"its processes were still there {bound:g}s after it ended"
                break
            await asyncio.sleep(0.2)
        while note is None and record.gpus:
            listed = _still_listed(self.gpus(), gpu_pids, ended)
            if listed == "":
                break
            if time.monotonic() >= deadline:
                note = f"after {bound:g}s, " + (
                    listed or "no GPU snapshot was taken since it ended"
                )
                break
            await asyncio.sleep(0.1)
        self.registry.memory_released(worker_id)
        if note is None:
            return None
        return (
            f"memory: {note}; its reservation is released, and what is still held counts as "
            "memory used by other processes"
        )


def _still_listed(snapshot: GpuSnapshot, pids: set[int], since: float) -> str | None:
    """``""`` once a snapshot taken after ``since`` lists none of ``pids``; None while no such
    snapshot exists yet; else what it still lists, in words."""
    if snapshot.taken_at is None or snapshot.taken_at <= since:
        return None
    held = [
        f"{gpu.id} still lists pid {p.pid} ({p.used_memory_mib or 0} MiB)"
        for gpu in snapshot.gpus
        for p in gpu.processes
        if p.pid in pids
    ]
    return "; ".join(held)


def _cgroup_pids(path: Path) -> set[int]:
    try:
        with open(path, "rb") as file:
            return {int(pid) for pid in file.read().split()}
    except (OSError, ValueError):
        return set()


def _hwm_kib(pid: int) -> int:
    """A process's peak resident memory in KiB (``VmHWM``), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as file:
            for line in file:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Memory:
    """Everything hive knows of its workers' memory, built once by the supervisor: the book of
    learned peaks, the figures a spawn needs, the meter, and what workers may reserve."""

    def __init__(
        self,
        config: Callable[[], Config],
        registry: Registry,
        containment: Containment,
        gpus: Callable[[], GpuSnapshot],
        state_dir: Path,
    ) -> None:
        self._config = config
        self._gpus = gpus
        self.book = MemoryBook(state_dir / "memory.json")
        self.sizing = Sizing(self.book)
        self.watch = MemoryWatch(registry, containment, gpus, self.sizing)
        #: The host's memory (MiB), read at start; None when it could not be read.
        self.host_total_mib: int | None = None

    def budget(self) -> int | None:
        """What workers may reserve in total (MiB): ``host_memory_mib``, else the default."""
        configured = self._config().host_memory_mib
        if configured is not None:
            return configured
        return default_budget(self.host_total_mib) if self.host_total_mib else None

    async def start(self) -> None:
        self.host_total_mib = await asyncio.to_thread(host_total_mib)
        await asyncio.to_thread(self.book.load)
        self.book.start()
        self.watch.start()
        log.info(
            "memory: workers may reserve %s MiB of the host's %s MiB; %d figure(s) learned",
            self.budget(),
            self.host_total_mib,
            len(self.book),
        )

    async def close(self) -> None:
        await self.watch.close()
        await self.book.close()

    async def prepare(self, spec: SpawnRequest, backend_name: str, backend: BackendConfig) -> None:
        """Before a spawn reaches the registry: the estimates its reservation may need."""
        await self.sizing.prepare(spec, backend_name, backend, bool(self._gpus().gpus))

"""NVIDIA GPUs through NVML (the ``pynvml`` binding of nvidia-ml-py).

:class:`GpuMonitor` owns NVML for the life of the daemon. It initialises NVML once, and every
NVML call it makes runs on one dedicated daemon thread, never on the asyncio loop: a GPU that
has fallen off the bus can block a call for seconds. That thread reads every GPU every
``interval`` seconds into an immutable :class:`GpuSnapshot`, which :meth:`GpuMonitor.snapshot`
hands out without touching NVML.

Each figure is read on its own: a call the GPU or driver does not support gives None for that
figure only. A GPU whose identity cannot be read, or that NVML reports lost or needing a reset,
is kept in the list with ``healthy=False`` and the error text, and with what was last known of
it (name, uuid, bus id, total memory, affinity). The uuid is a GPU's stable identity; the
index (``GPU-<n>``) is NVML's enumeration order.

Without NVML (no pynvml, no ``libnvidia-ml.so.1``, no driver loaded, or no GPU) the snapshot
has no GPUs and ``error`` says why in one line; hive never fails for lack of a GPU. While NVML
cannot be initialised the monitor retries every ``retry_interval`` seconds, so a driver that
loads after hive starts is picked up.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, TypeVar

from hive.devices.nvml import (
    ABSENT,
    ARGUMENT_VERSION_MISMATCH,
    FATAL,
    FUNCTION_NOT_FOUND,
    decode_cpu_mask,
    describe,
    import_pynvml,
    init_error,
    plain,
    quietly,
)
from hive.models import GpuDevice, GpuProcess

log = logging.getLogger(__name__)

MIB = 2**20
DEFAULT_INTERVAL = 2.0
DEFAULT_START_TIMEOUT = 10.0
DEFAULT_RETRY_INTERVAL = 30.0
NO_GPU = "NVML reports no GPU on this host"

T = TypeVar("T")


@dataclass(frozen=True)
class GpuProcessInfo:
    """A compute process on a GPU; ``used_memory_mib`` is None where NVML cannot say."""

    pid: int
    used_memory_mib: int | None


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as last read. None: NVML cannot give that figure (or the GPU is unhealthy)."""

    index: int
    uuid: str | None
    name: str | None = None
    pci_bus_id: str | None = None
    memory_total_mib: int | None = None
    memory_used_mib: int | None = None
    memory_free_mib: int | None = None
    utilization_percent: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    cpu_affinity: tuple[int, ...] = ()
    processes: tuple[GpuProcessInfo, ...] = ()
    healthy: bool = True
    error: str | None = None

    @property
    def id(self) -> str:
        """The device id hive uses everywhere: ``GPU-<nvml index>``."""
        return f"GPU-{self.index}"

    def to_model(self, workers: Iterable[str] = ()) -> GpuDevice:
        """The API's view of this GPU, with the ids of the workers placed on it."""
        return GpuDevice(
            id=self.id,
            name=self.name,
            uuid=self.uuid or "",
            pci_bus_id=self.pci_bus_id,
            memory_total_mib=self.memory_total_mib,
            memory_used_mib=self.memory_used_mib,
            memory_free_mib=self.memory_free_mib,
            utilization_percent=self.utilization_percent,
            temperature_c=self.temperature_c,
            power_w=self.power_w,
            cpu_affinity=list(self.cpu_affinity),
            processes=[
                GpuProcess(pid=p.pid, used_memory_mib=p.used_memory_mib) for p in self.processes
            ],
            healthy=self.healthy,
            error=self.error,
            workers=list(workers),
        )


@dataclass(frozen=True)
class GpuSnapshot:
    """Every GPU at one moment. ``error`` (one line) says why there are none, else None."""

    gpus: tuple[GpuInfo, ...] = ()
    error: str | None = None
    driver_version: str | None = None
    taken_at: float | None = None  # time.time() when read; None: never read

    def by_uuid(self, uuid: str) -> GpuInfo | None:
        return next((gpu for gpu in self.gpus if gpu.uuid == uuid), None)

    def by_index(self, index: int) -> GpuInfo | None:
        return next((gpu for gpu in self.gpus if gpu.index == index), None)

    def by_id(self, device_id: str) -> GpuInfo | None:
        """The GPU named ``GPU-<n>`` or by its uuid, or None."""
        prefix, _, rest = device_id.partition("-")
        if prefix == "GPU" and rest.isdigit():
            return self.by_index(int(rest))
        return self.by_uuid(device_id)

    @property
    def healthy(self) -> tuple[GpuInfo, ...]:
        return tuple(gpu for gpu in self.gpus if gpu.healthy)

    def to_models(self, workers: dict[str, list[str]] | None = None) -> list[GpuDevice]:
        """The API's view of every GPU; ``workers`` maps a GPU uuid to its workers' ids."""
        workers = workers or {}
        return [gpu.to_model(workers.get(gpu.uuid or "", [])) for gpu in self.gpus]


def compute_pids(snapshot: GpuSnapshot) -> dict[int, int]:
    """pid -> GPU memory in MiB over all GPUs, for the processes NVML lists with a figure.

    A pid NVML lists only without a figure (NVML_VALUE_NOT_AVAILABLE) is left out. The pids are
    in the host's pid namespace, as NVML reports them.
    """
    used: dict[int, int] = {}
    for gpu in snapshot.gpus:
        for process in gpu.processes:
            if process.used_memory_mib is not None:
                used[process.pid] = used.get(process.pid, 0) + process.used_memory_mib
    return used


class GpuMonitor:
    """Reads every GPU through NVML on its own thread; hands out the latest snapshot.

    ``start()`` initialises NVML and takes the first snapshot (waiting at most
    ``start_timeout`` seconds for it), then a refresh follows every ``interval`` seconds until
    ``close()``. ``snapshot()``, ``error`` and ``gpus`` never touch NVML and never block.
    """

    def __init__(
        self,
        interval: float = DEFAULT_INTERVAL,
        *,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        cpu_count: int | None = None,
    ) -> None:
        self.interval = interval
        self.start_timeout = start_timeout
        self.retry_interval = retry_interval
        self._cpu_count = cpu_count or os.cpu_count() or 1
        self._snapshot = GpuSnapshot(error="GPU monitor not started")
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._cond = threading.Condition()
        self._requested = 0  # refresh requests made, ...
        self._served = 0  # ... and those a finished read began after
        self._reads = 0  # snapshots taken
        self._done = False  # the NVML thread has ended
        self._reader: _Reader | None = None
        self._init_failure: str | None = None
        self._last_init = 0.0

    # -- the caller's side: none of these call NVML ------------------------------------------

    def start(self) -> GpuSnapshot:
        """Start the NVML thread and wait (bounded) for the first snapshot. Idempotent."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hive-nvml", daemon=True)
                self._thread.start()
            first = self._cond.wait_for(
                lambda: self._reads > 0 or self._done, timeout=self.start_timeout
            )
            if not first and self._snapshot.taken_at is None:
                self._snapshot = GpuSnapshot(
                    error=f"NVML did not answer within {self.start_timeout:g} s"
                )
        return self._snapshot

    def snapshot(self) -> GpuSnapshot:
        """The latest snapshot; never blocks, never calls NVML."""
        return self._snapshot

    @property
    def error(self) -> str | None:
        """One line why there are no GPUs (no library, no driver, no GPU), else None."""
        return self._snapshot.error

    @property
    def gpus(self) -> tuple[GpuInfo, ...]:
        return self._snapshot.gpus

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def refresh_now(self, timeout: float = 10.0) -> GpuSnapshot:
        """Have the NVML thread read every GPU now; wait (bounded) for that read; return it.

        While NVML is not initialised this retries initialising it first. Blocks the calling
        thread: from asyncio, run it with ``asyncio.to_thread``.
        """
        if not self.running:
            return self._snapshot
        with self._cond:
            self._requested += 1
            ticket = self._requested
            self._wake.set()
            self._cond.wait_for(lambda: self._served >= ticket or self._done, timeout=timeout)
        return self._snapshot

    def close(self, timeout: float = 5.0) -> None:
        """Stop refreshing and shut NVML down (on its thread). Waits at most ``timeout`` s."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("the NVML thread did not stop within %g s", timeout)

    def __enter__(self) -> GpuMonitor:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the NVML thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            forced = True
            while not self._stop.is_set():
                with self._cond:
                    serving = self._requested
                if self._reader is None and (
                    forced or time.monotonic() - self._last_init >= self.retry_interval
                ):
                    self._init()
                snapshot = self._read()
                with self._cond:
                    self._snapshot = snapshot
                    self._served = max(self._served, serving)
                    self._reads += 1
                    self._cond.notify_all()
                self._wake.wait(self.interval)
                self._wake.clear()
                with self._cond:
                    forced = self._requested > self._served
        finally:
            if self._reader is not None:
                quietly(self._reader.nvml.nvmlShutdown)
                self._reader = None
            with self._cond:  # nobody waits on a thread that is gone
                self._done = True
                self._cond.notify_all()

    def _init(self) -> None:
        self._last_init = time.monotonic()
        try:
            nvml = import_pynvml()
            nvml.nvmlInit()
        except Exception as exc:
            self._init_failure = init_error(exc)
            return
        try:
            self._reader = _Reader(nvml, self._cpu_count)
        except Exception as exc:
            self._init_failure = f"NVML unavailable: {describe(exc)}"
            quietly(nvml.nvmlShutdown)
            return
        log.info(
            "NVML: driver %s, %d GPU(s)", self._reader.driver_version or "?", self._reader.count
        )

    def _read(self) -> GpuSnapshot:
        now = time.time()
        reader = self._reader
        if reader is None:
            return GpuSnapshot(error=self._init_failure, taken_at=now)
        try:
            gpus = reader.read()
        except Exception:  # a bug here must not stop the thread; keep the last figures
            log.exception("reading the GPUs failed")
            return replace(self._snapshot, taken_at=now)
        error = None if gpus else NO_GPU
        return GpuSnapshot(gpus, error, reader.driver_version, now)


class _Fatal(Exception):
    """The GPU cannot be read any further this round; ``str()`` is the GPU's error text."""


class _Reader:
    """NVML calls for one NVML session. Used only on the monitor's thread."""

    def __init__(self, nvml: ModuleType, cpu_count: int) -> None:
        self.nvml = nvml
        self.count: int = nvml.nvmlDeviceGetCount()
        self.driver_version: str | None = self._optional(nvml.nvmlSystemGetDriverVersion)
        self._words = max(1, (cpu_count + 63) // 64)
        self._handles: dict[int, Any] = {}
        self._last: dict[int, GpuInfo] = {}
        self._memory_v2: bool = getattr(nvml, "nvmlMemory_v2", None) is not None
        self._temperature_v: bool = hasattr(nvml, "nvmlDeviceGetTemperatureV")
        self._warned: set[tuple[str | None, str, int]] = set()

    def read(self) -> tuple[GpuInfo, ...]:
        gpus = []
        for index in range(self.count):
            try:
                gpu = self._read_gpu(index)
            except _Fatal as fatal:
                gpu = self._unhealthy(index, str(fatal))
            self._last[index] = gpu
            gpus.append(gpu)
        return tuple(gpus)

    def _unhealthy(self, index: int, error: str) -> GpuInfo:
        last = self._last.get(index)
        if last is None:
            return GpuInfo(index=index, uuid=None, healthy=False, error=error)
        return GpuInfo(
            index=index,
            uuid=last.uuid,
            name=last.name,
            pci_bus_id=last.pci_bus_id,
            memory_total_mib=last.memory_total_mib,
            cpu_affinity=last.cpu_affinity,
            healthy=False,
            error=error,
        )

    def _read_gpu(self, index: int) -> GpuInfo:
        nvml = self.nvml
        handle = self._handles.get(index)
        if handle is None:
            handle = self._identity("handle", nvml.nvmlDeviceGetHandleByIndex, index)
            if handle is None:
                raise _Fatal("NVML gives no handle for this GPU")
            self._handles[index] = handle
        uuid = self._identity("uuid", nvml.nvmlDeviceGetUUID, handle)
        name = self._identity("name", nvml.nvmlDeviceGetName, handle)
        pci = self._identity("PCI info", nvml.nvmlDeviceGetPciInfo, handle)
        memory = self._field(uuid, "memory", self._memory, handle)
        util = self._field(uuid, "utilization", nvml.nvmlDeviceGetUtilizationRates, handle)
        temperature = self._field(uuid, "temperature", self._temperature, handle)
        power_mw = self._field(uuid, "power", nvml.nvmlDeviceGetPowerUsage, handle)
        affinity = self._field(uuid, "CPU affinity", self._affinity, handle)
        processes = self._field(uuid, "processes", self._processes, handle)
        total, used, free = memory if memory is not None else (None, None, None)
        return GpuInfo(
            index=index,
            uuid=uuid,
            name=name,
            pci_bus_id=plain(pci.busId) if pci is not None else None,
            memory_total_mib=total,
            memory_used_mib=used,
            memory_free_mib=free,
            utilization_percent=int(util.gpu) if util is not None else None,
            temperature_c=temperature,
            power_w=power_mw / 1000 if power_mw is not None else None,
            cpu_affinity=affinity or (),
            processes=processes or (),
        )

    # -- one figure each ---------------------------------------------------------------------

    def _memory(self, handle: Any) -> tuple[int, int, int]:
        """(total, used, free) in MiB; v2 leaves the driver's reserved memory out of used."""
        nvml = self.nvml
        if self._memory_v2:
            try:
                info = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
            except nvml.NVMLError as exc:
                if exc.value not in (FUNCTION_NOT_FOUND, ARGUMENT_VERSION_MISMATCH):
                    raise
                self._memory_v2 = False  # an older driver: ask v1 from now on
            else:
                return info.total // MIB, info.used // MIB, info.free // MIB
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        return info.total // MIB, info.used // MIB, info.free // MIB

    def _temperature(self, handle: Any) -> int:
        nvml = self.nvml
        if self._temperature_v:
            try:
                return int(nvml.nvmlDeviceGetTemperatureV(handle, nvml.NVML_TEMPERATURE_GPU))
            except nvml.NVMLError as exc:
                if exc.value not in (FUNCTION_NOT_FOUND, ARGUMENT_VERSION_MISMATCH):
                    raise
                self._temperature_v = False
        return int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))

    def _affinity(self, handle: Any) -> tuple[int, ...]:
        words = self.nvml.nvmlDeviceGetCpuAffinity(handle, self._words)
        return decode_cpu_mask(int(word) for word in words)

    def _processes(self, handle: Any) -> tuple[GpuProcessInfo, ...]:
        # The _v3 name: the unversioned wrapper turns FunctionNotFound into a non-NVMLError.
        found = self.nvml.nvmlDeviceGetComputeRunningProcesses_v3(handle)
        return tuple(
            GpuProcessInfo(
                pid=int(p.pid),
                used_memory_mib=None if p.usedGpuMemory is None else int(p.usedGpuMemory) // MIB,
            )
            for p in found
        )

    # -- error handling ----------------------------------------------------------------------

    def _identity(self, what: str, call: Callable[..., T], *args: Any) -> T | None:
        """An identity call: unsupported gives None; any other failure makes the GPU unhealthy."""
        try:
            return plain(call(*args))
        except self.nvml.NVMLError as exc:
            if exc.value in ABSENT:
                return None
            raise _Fatal(f"{describe(exc)} (reading {what})") from None

    def _field(self, uuid: str | None, what: str, call: Callable[..., T], *args: Any) -> T | None:
        """A figure: None when NVML cannot give it; lost or needing reset: the GPU is unhealthy."""
        try:
            return plain(call(*args))
        except self.nvml.NVMLError as exc:
            if exc.value in FATAL:
                raise _Fatal(f"{describe(exc)} (reading {what})") from None
            if exc.value not in ABSENT and (uuid, what, exc.value) not in self._warned:
                self._warned.add((uuid, what, exc.value))
                log.warning("GPU %s: cannot read %s: %s", uuid, what, describe(exc))
            return None

    def _optional(self, call: Callable[[], T]) -> T | None:
        try:
            return plain(call())
        except self.nvml.NVMLError:
            return None

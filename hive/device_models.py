"""The wire shapes of hive's devices: CPU nodes, GPUs and their processes, as ``/v1/devices``
and ``/v1/node`` answer them. Apart from :mod:`hive.models` (which re-exports them, where the
rest of hive imports them from) only to keep that module readable in one sitting."""

from __future__ import annotations

from pydantic import BaseModel


class CpuDevice(BaseModel):
    id: str
    cores: list[int]
    memory_total_bytes: int | None
    memory_available_bytes: int | None
    load: float | None
    workers: list[str] = []


class GpuProcess(BaseModel):
    pid: int
    used_memory_mib: int | None


class GpuDevice(BaseModel):
    id: str
    name: str | None
    uuid: str
    pci_bus_id: str | None
    memory_total_mib: int | None
    memory_used_mib: int | None
    memory_free_mib: int | None
    utilization_percent: int | None
    temperature_c: int | None
    power_w: float | None
    cpu_affinity: list[int] = []
    processes: list[GpuProcess] = []
    healthy: bool = True
    error: str | None = None
    workers: list[str] = []


class Devices(BaseModel):
    cpus: list[CpuDevice]
    gpus: list[GpuDevice]
    gpu_error: str | None


class DeviceSummary(BaseModel):
    cpus: int
    cores: int
    gpus: int
    gpu_error: str | None

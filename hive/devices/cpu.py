"""CPU devices: one per NUMA node, limited to the cores hive itself may run on.

hive's own affinity already honours a cgroup cpuset or systemd's ``CPUAffinity=``, so a core
that hive may not use is never handed to a worker.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from hive.models import CpuDevice, Worker

NODE_ROOT = Path("/sys/devices/system/node")


@dataclass(frozen=True, slots=True)
class CpuNode:
    id: str
    index: int
    cores: tuple[int, ...]


def parse_cpulist(text: str) -> list[int]:
    """The kernel's list format: ``0-3,8,10-11`` -> [0, 1, 2, 3, 8, 10, 11].

    ``""`` (a node without CPUs) is []. Anything else that is not a comma-separated list of
    ``N`` or ``N-M`` items, an empty item included, raises ValueError; strip a file's newline
    first. The one parser of such lists: sysfs here, ``hive spawn --cpus`` in the CLI.
    """
    if not text:
        return []
    cores: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        cores.extend(range(int(low), int(high or low) + 1))
    return cores


def discover(root: Path = NODE_ROOT) -> list[CpuNode]:
    """The NUMA nodes with at least one core hive may use; one ``CPU-0`` without NUMA info."""
    allowed = os.sched_getaffinity(0)
    nodes = []
    for path in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        try:
            cores = set(parse_cpulist((path / "cpulist").read_text().strip())) & allowed
        except OSError:
            continue
        if cores:
            index = int(path.name[4:])
            nodes.append(CpuNode(f"CPU-{index}", index, tuple(sorted(cores))))
    return nodes or [CpuNode("CPU-0", 0, tuple(sorted(allowed)))]


def _node_memory(index: int, root: Path) -> tuple[int, int] | None:
    try:
        text = (root / f"node{index}" / "meminfo").read_text()
    except OSError:
        return None
    values = {
        m.group(1): int(m.group(2)) * 1024
        for m in re.finditer(r"Node \d+ (\w+(?:\(\w+\))?):\s+(\d+) kB", text)
    }
    if "MemTotal" not in values:
        return None
    available = values.get("MemFree", 0) + values.get("Inactive(file)", 0)
    available += values.get("Active(file)", 0) // 2
    return values["MemTotal"], min(available, values["MemTotal"])


def snapshot(
    nodes: list[CpuNode], workers: list[Worker], root: Path = NODE_ROOT
) -> list[CpuDevice]:
    """Live figures for every node. Load is the mean busy percent of its cores since last call."""
    per_core = psutil.cpu_percent(percpu=True)
    devices = []
    for node in nodes:
        memory = _node_memory(node.index, root) if len(nodes) > 1 else None
        if memory is None:
            vm = psutil.virtual_memory()
            memory = (vm.total, vm.available)
        loads = [per_core[c] for c in node.cores if c < len(per_core)]
        devices.append(
            CpuDevice(
                id=node.id,
                cores=list(node.cores),
                memory_total_bytes=memory[0],
                memory_available_bytes=memory[1],
                load=round(sum(loads) / len(loads), 1) if loads else None,
                workers=[
                    w.id
                    for w in workers
                    if w.device == node.id or (w.gpus and set(w.cpus) & set(node.cores))
                ],
            )
        )
    return devices


def cpulist(cores: Iterable[int]) -> str:
    """Core ids in the kernel's cpulist form, as taskset, numactl and vLLM read it: ``0-3,8``."""
    spans: list[list[int]] = []
    for core in sorted(set(cores)):
        if spans and core == spans[-1][1] + 1:
            spans[-1][1] = core
        else:
            spans.append([core, core])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)

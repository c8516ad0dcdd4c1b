"""Where the worker runs: its CPU affinity and each thread's allowed CPUs.

``/get_server_info`` reports these so that hive's placement and pinning can be checked from
outside the process.
"""

from __future__ import annotations

import os


def parse_cpu_list(text: str) -> list[int]:
    """``"0-3,8"`` (the kernel's list format) as ``[0, 1, 2, 3, 8]``."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        cpus.extend(range(int(low), int(high or low) + 1))
    return cpus


def cpu_affinity() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def thread_affinities() -> dict[str, list[int]]:
    """Each thread of this process (by tid) and the CPUs it may run on, from /proc."""
    threads: dict[str, list[int]] = {}
    try:
        tids = sorted(os.listdir("/proc/self/task"), key=int)
    except OSError:
        return threads
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/status") as status:
                for line in status:
                    if line.startswith("Cpus_allowed_list:"):
                        threads[tid] = parse_cpu_list(line.split(":", 1)[1])
                        break
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
    return threads

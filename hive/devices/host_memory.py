"""Host memory as a resource workers reserve, like cores and GPU memory.

What workers may reserve in total is config ``host_memory_mib``; by default the host's memory
(``MemTotal``, or the limit of the cgroup hive runs in when that is lower) less a reserve for the
system and hive itself: a tenth of it, at least 1 GiB and at most 8 GiB. A worker reserves the
figure on its record (``memory_mib``: declared, learned or estimated); a worker holds it while
it runs, while a restart is due, and after its process ended until its memory is back
(``memory_held``). A spawn whose figure does not fit in what is free is refused before anything
starts (:class:`~hive.errors.NoMemory`: needed, free, and which workers hold the rest).

Admission is by reservations, as Kubernetes admits pods by their requests against a node's
allocatable memory, never by a reading of free memory: a worker still loading has not used its
memory yet, and another must not take it meanwhile. Memory used by processes that are not
hive's workers is what the reserve is for; on a host shared with other programs, set
``host_memory_mib`` to hive's part.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from hive.errors import NoMemory
from hive.models import Entry, Worker, holds_resources

MIB = 1024 * 1024
#: What the default budget keeps back for the system and hive: a tenth, within these bounds.
RESERVE_SHARE, RESERVE_MIN_MIB, RESERVE_MAX_MIB = 0.10, 1024, 8192


def host_total_mib(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The host's memory in MiB (``MemTotal``), lowered to the memory limit of hive's own
    cgroup (v2 ``memory.max``) where one is set; None when neither can be read. Reads files:
    call from a thread."""
    total: int | None = None
    try:
        with open(meminfo, "rb") as file:
            for line in file:
                if line.startswith(b"MemTotal:"):
                    total = int(line.split()[1]) // 1024
                    break
    except (OSError, ValueError, IndexError):
        return None
    limit = _cgroup_limit_mib()
    if total is not None and limit is not None:
        return min(total, limit)
    return total


def _cgroup_limit_mib() -> int | None:
    """The memory limit of hive's own cgroup: v2 ``memory.max``, or v1
    ``memory.limit_in_bytes`` on a host that keeps the memory controller in v1."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    found: list[Path] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for mount in mounts:
            left, _, right = mount.partition(" - ")
            fstype, _, options = right.partition(" ")
            point = Path(left.split(" ")[4])
            if controllers == "" and fstype == "cgroup2":
                found.append(point / path.lstrip("/") / "memory.max")
            elif controllers == "memory" and fstype == "cgroup" and "memory" in options:
                found.append(point / path.lstrip("/") / "memory.limit_in_bytes")
    limits = []
    for file in found:
        try:
            text = file.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max", or v1's "no limit"
            limits.append(int(text) // MIB)
    return min(limits) if limits else None


def default_budget(total_mib: int) -> int:
    """``host_memory_mib`` when the configuration does not set it: ``total_mib`` less the
    reserve (10 %, at least 1 GiB, at most 8 GiB)."""
    reserve = min(max(int(total_mib * RESERVE_SHARE), RESERVE_MIN_MIB), RESERVE_MAX_MIB)
    return max(total_mib - reserve, 0)


def holds_memory(record: Worker) -> bool:
    """The worker's reservation counts: it runs, its restart is due, or its memory is not
    back yet since its process ended."""
    return holds_resources(record) or record.memory_held


def held_by(entries: Mapping[str, Entry], worker_id: str) -> dict[str, int]:
    """Host memory each other worker holds (MiB), for those that hold any."""
    return {
        other: entry.record.memory_mib
        for other, entry in entries.items()
        if other != worker_id and entry.record.memory_mib and holds_memory(entry.record)
    }


def check(
    worker_id: str,
    needed_mib: int | None,
    source: str | None,
    budget_mib: int | None,
    entries: Mapping[str, Entry],
) -> None:
    """Raise :class:`NoMemory` when ``needed_mib`` does not fit in what the other workers
    leave free of ``budget_mib``. A worker with no figure, or a host whose memory hive could not
    read, is not checked."""
    if not needed_mib or budget_mib is None:
        return
    held = held_by(entries, worker_id)
    if sum(held.values()) + needed_mib > budget_mib:
        raise NoMemory(worker_id, needed_mib, source or "declared", budget_mib, held)

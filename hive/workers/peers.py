"""Which worker, if any, a process at the other end of hive's unix socket belongs to.

The kernel names that process (``SO_PEERCRED``). It is a worker's when its cgroup is a worker's
or it carries a worker's tag (cheap, and right for any worker that leaves them alone), and
otherwise when it is, or descends from, a process hive started for a worker: hive's own record
(the registry's pid of each worker that is not down), matched by walking the peer's parents up
``/proc/<pid>/stat``. A worker that runs as root can move itself out of its cgroup and clear
its environment, but it cannot change who its parent is while that parent lives. One that
re-parented to hive, the child subreaper (tags), is a child of hive that no record names: it
belongs to some worker, which one is lost, and it is given nothing (:data:`ORPHAN`).
"""

from __future__ import annotations

import os
from pathlib import Path

from hive.host.containment import Containment
from hive.models import DOWN_STATES
from hive.state.registry import Registry

#: The owner given to a worker's orphan re-parented to hive: no worker id, so nothing allowed.
ORPHAN = ""
#: Parents walked up at most (a process tree is rarely a tenth as deep).
_DEPTH = 64


class _Pids:
    """The pid of each worker that is not down, read again when the registry changes."""

    def __init__(self) -> None:
        self.version: tuple[int, int] = (0, -1)
        self.owners: dict[int, str] = {}

    def of(self, registry: Registry) -> dict[int, str]:
        version = (id(registry), registry.seq)
        if version != self.version:
            self.version = version
            self.owners = {
                r.pid: r.id for r in registry.list() if r.pid and r.state not in DOWN_STATES
            }
        return self.owners


_PIDS = _Pids()


def worker_of_peer(pid: int, registry: Registry, containment: Containment) -> str | None:
    """The id of the worker ``pid`` belongs to (:data:`ORPHAN` when that is some worker's,
    unknown which), or None for a process that is no worker's. ``pid`` 0 (the kernel did not
    say) is no worker's: the socket's mode already admits only hive's user."""
    if pid <= 0:
        return None
    owner = containment.owner_of(pid)
    if owner is not None:
        return owner
    owners = _PIDS.of(registry)
    hive = os.getpid()
    child = None
    current = pid
    for _ in range(_DEPTH):
        if current == hive:
            return None if child is None else ORPHAN  # hive itself, or a stray child of it
        if current in owners:
            return owners[current]
        parent = _parent(current)
        if parent is None or parent <= 1:
            return None
        child, current = current, parent
    return None


def _parent(pid: int) -> int | None:
    """The parent of ``pid`` (a few hundred bytes of procfs), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, the last ')' ends it.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[1])
    except (IndexError, ValueError):
        return None

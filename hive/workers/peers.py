"""Which worker, if any, a process at the other end of hive's unix socket belongs to.

The kernel names that process (``SO_PEERCRED``). It is a worker's when its cgroup is a worker's
or it carries a worker's tag (cheap, and right for any worker that leaves them alone, whatever
its parent: an orphan re-parented to init included), and otherwise when it is, or descends
from, a process hive started for a worker: hive's own record (the registry's pid of each worker
that is not down), matched by walking the peer's parents up ``/proc/<pid>/stat``. A worker that
runs as root can move itself out of its cgroup and clear its environment, but it cannot change
who its parent is while that parent lives. One that re-parented to hive, the child subreaper
(tags), is a child of hive that no record names: it belongs to some worker, which one is lost,
and it is given nothing (:data:`ORPHAN`).

The kernel's pid is the process that connected, as it was then. A process that connects, hands
the socket to another and exits leaves a pid that names nothing (or, once reused, another
process): whoever sends on it cannot be told. So a peer that is no worker's counts only while
the process that connected still lives, checked after the look-ups through a pidfd of it
(``SO_PEERPIDFD``, Linux 6.5; where there is none, by its ``/proc`` entry); a gone one is
given nothing, as an orphan is.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
from pathlib import Path

from hive.host.containment import Containment
from hive.models import DOWN_STATES
from hive.state.registry import Registry

#: The owner given to a worker's orphan re-parented to hive: no worker id, so nothing allowed.
ORPHAN = ""
#: Parents walked up at most (a process tree is rarely a tenth as deep).
_DEPTH = 64
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_INT = struct.Struct("i")
#: getsockopt(SOL_SOCKET, SO_PEERPIDFD): a pidfd of the peer (Linux 6.5; Python 3.11 lacks it).
_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)


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


def worker_of_socket(
    sock: socket.socket, registry: Registry, containment: Containment
) -> str | None:
    """The id of the worker whose process is at the other end of the unix-socket connection
    ``sock`` (:data:`ORPHAN` when that is some worker's, unknown which, or when the process that
    connected is gone), or None for a process that is no worker's."""
    pid = peer_pid(sock)
    pidfd = _peer_pidfd(sock) if pid > 0 else None
    try:
        owner = worker_of_peer(pid, registry, containment)
        if owner is None and pid > 0 and not _alive(pid, pidfd):
            return ORPHAN
        return owner
    finally:
        if pidfd is not None:
            os.close(pidfd)


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process that connected ``sock`` (``SO_PEERCRED``); 0 when the kernel
    does not say."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return 0
    return int(_PEERCRED.unpack(creds)[0])


def _peer_pidfd(sock: socket.socket) -> int | None:
    """A pidfd of the process that connected ``sock``; None where the kernel gives none (too
    old, or the process is gone and this kernel keeps no pidfd for it)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD, 4)
    except OSError:
        return None
    pidfd = int(_INT.unpack(raw)[0]) if len(raw) == _INT.size else -1
    return pidfd if pidfd >= 0 else None


def _alive(pid: int, pidfd: int | None) -> bool:
    """Whether the process that connected still lives. A pidfd is that very process, readable
    once it has exited; without one, a ``/proc`` entry under its pid (which, in the rare case
    of a pid reused since, names another process: what only a pidfd rules out)."""
    if pidfd is not None:
        poll = select.poll()
        poll.register(pidfd, select.POLLIN)
        with contextlib.suppress(OSError):
            return not poll.poll(0)
        return False
    return os.path.exists(f"/proc/{pid}")


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

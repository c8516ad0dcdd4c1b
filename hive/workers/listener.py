"""Whose listener answers on a worker's port: ready must mean the worker's own process.

hive checks a port is free when it hands it out, but an engine such as vLLM binds it only once
its model is loaded, a minute or more later. Any process that listens on the port meanwhile
answers the readiness probe. So once a probe has passed, hive looks at who listens there before
it calls the worker ready: the sockets listening on the port (``/proc/net/tcp`` and ``tcp6``,
the ones a connection to ``127.0.0.1`` reaches) must be held by the worker's processes (their
``/proc/<pid>/fd``). Where another process holds one, the worker stays ``starting`` and its
record says who holds the port, until it is freed or ``startup_timeout`` ends the attempt.

The check runs in a thread, and only after a probe passed: a ready worker costs nothing. Where
no listener is seen at all (the engine listens in a network namespace of its own), there is
nothing to tell and the probe's word stands. A backend whose listener is never the worker's own
(a container engine's port proxy) turns the check off with ``listener_check = false``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hive.workers.run import WorkerRun

log = logging.getLogger("hive.lifecycle")

#: The kernel's tables of TCP sockets, IPv4 and IPv6, of hive's network namespace.
TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
#: ``st`` of a listening socket in those tables.
_LISTEN = b"0A"
#: Seconds between checks while another process holds the port.
RECHECK = 1.0

_LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
_ANY = ipaddress.IPv4Address("0.0.0.0")


def _address(text: bytes) -> ipaddress.IPv4Address | None:
    """The IPv4 address (an IPv6 one mapped from IPv4 included) of a table's hex address; the
    unspecified ``::`` as 0.0.0.0; None for any other IPv6 address."""
    raw = bytes.fromhex(text.decode())
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    # IPv6: four 32-bit words, each in the host's (little-endian) byte order.
    v6 = ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
    if v6.ipv4_mapped is not None:
        return v6.ipv4_mapped
    return _ANY if v6.is_unspecified else None


def reachable_listeners(port: int, tables: Iterable[Path] = TABLES) -> set[int]:
    """The inodes of the sockets that take a connection to ``127.0.0.1:port``: the ones
    listening on 127.0.0.1 if any, else on IPv4's wildcard, else on IPv6's (the kernel's
    order of preference). Empty when none is seen."""
    suffix = f":{port:04X}".encode()
    tiers: list[set[int]] = [set(), set(), set()]
    for table in tables:
        family_v6 = table.name.endswith("6")
        try:
            with open(table, "rb") as file:
                for line in file:
                    if suffix + b" " not in line:
                        continue
                    fields = line.split()
                    if len(fields) < 10 or fields[3] != _LISTEN:
                        continue
                    host, _, local_port = fields[1].partition(b":")
                    if local_port != suffix[1:]:
                        continue
                    address = _address(host)
                    if address == _LOOPBACK:
                        tiers[0].add(int(fields[9]))
                    elif address == _ANY:
                        tiers[2 if family_v6 else 1].add(int(fields[9]))
        except (OSError, ValueError):
            continue
    return next((tier for tier in tiers if tier), set())


def socket_inodes(pid: int, wanted: set[int] | None = None) -> set[int]:
    """The inodes of ``pid``'s sockets (stopping early once all ``wanted`` are found)."""
    found: set[int] = set()
    directory = f"/proc/{pid}/fd"
    try:
        names = os.listdir(directory)
    except OSError:
        return found
    for name in names:
        try:
            link = os.readlink(f"{directory}/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            found.add(int(link[8:-1]))
            if wanted is not None and wanted <= found:
                break
    return found


def _holder(inode: int) -> str:
    """``pid 1234, 'python3'`` for the process holding socket ``inode``, as far as hive may
    see (another user's processes may be closed to it)."""
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        pids = []
    for pid in pids:
        if inode in socket_inodes(pid, {inode}):
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                return f"pid {pid}"
            return f"pid {pid}, {name!r}"
    return "a process hive cannot see"


def foreign_listener(port: int, members: Callable[[], Iterable[int]]) -> str | None:
    """Why the listener on ``port`` is not the worker's (a sentence naming who holds it);
    None when the worker's processes (``members()``, asked lazily) hold every listener that
    answers there, or when none is seen. Reads ``/proc``: call it from a thread."""
    listening = reachable_listeners(port)
    if not listening:
        return None
    held: set[int] = set()
    for pid in members():
        held |= socket_inodes(pid, listening - held) & listening
        if held == listening:
            return None
    foreign = min(listening - held)
    return (
        f"port {port} is held by another process ({_holder(foreign)}), not by the worker; "
        "waiting for it to be freed"
    )


class ListenerCheck:
    """One worker attempt's check, for :meth:`hive.workers.probes.WorkerProbes.until_ready`:
    off the loop, logged once per holder, and told to ``note`` (the record's ``error``)."""

    def __init__(
        self,
        worker_id: Callable[[], str],
        members: Callable[[], Iterable[int]],
        note: Callable[[str], None],
    ) -> None:
        self._worker_id = worker_id
        self._members = members
        self._note = note
        self._told: str | None = None

    async def __call__(self, port: int) -> str | None:
        why = await asyncio.to_thread(foreign_listener, port, self._members)
        if why is not None and why != self._told:
            log.warning("worker %s: %s", self._worker_id(), why)
            self._note(why)
        self._told = why
        return why


def listener_check(run: WorkerRun) -> ListenerCheck:
    """The check for ``run``'s attempt: its containment's processes and its leader are the
    worker's; what holds it up goes to the record's ``error`` while it is ``starting``."""

    def members() -> Iterator[int]:
        leader = run.process.pid if run.process is not None else None
        if leader is not None:
            yield leader  # most often the listener: then the containment is not even asked
        yield from run.deps.containment.members(run.key) - {leader}

    def note(why: str) -> None:
        run.deps.registry.not_ready_because(run.id, why)

    return ListenerCheck(lambda: run.id, members, note)

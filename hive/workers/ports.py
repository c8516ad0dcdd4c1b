"""Ports for workers: from ``port_range``, checked by binding, never handed out twice.

Allocation runs under the registry's lock (as part of a registry builder), and a port counts as
taken while any worker holding resources has it, so two spawns can never get the same port.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Mapping
from pathlib import Path

from hive.errors import NoFreePort, PortTaken
from hive.models import Entry, holds_resources


class PortPool:
    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high
        self._next = low

    def allocate(
        self,
        entries: Mapping[str, Entry],
        worker_id: str,
        *,
        wanted: int | None = None,
        previous: int | None = None,
        also_taken: frozenset[int] = frozenset(),
        what: str = "port",
    ) -> int:
        """A free port: ``wanted`` exactly, else ``previous`` if still free, else the next one.

        A worker's bootstrap port counts as held like its HTTP port; ``also_taken`` are ports
        this worker already took (its HTTP port, when choosing its bootstrap port).
        """
        held: dict[int, str] = {}
        for other, e in entries.items():
            if other != worker_id and holds_resources(e.record):
                held[e.record.port] = other
                if e.record.bootstrap_port is not None:
                    held[e.record.bootstrap_port] = other
        held.update(dict.fromkeys(also_taken, worker_id))
        if wanted is not None:
            if wanted in held:
                raise PortTaken(wanted, held[wanted], what)
            if not port_is_free(wanted):
                raise PortTaken(wanted, None, what)
            return wanted
        if previous is not None and previous not in held and port_is_free(previous):
            return previous
        size = self.high - self.low + 1
        for step in range(size):
            port = self.low + (self._next - self.low + step) % size
            if port not in held and port_is_free(port):
                self._next = port + 1 if port < self.high else self.low
                return port
        raise NoFreePort(self.low, self.high)


#: Where Linux says which local ports it gives to outgoing connections.
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_overlap(low: int, high: int, source: Path = EPHEMERAL_RANGE) -> str | None:
    """Why ``port_range`` is a poor choice on this host, or None: a range that overlaps the
    kernel's ephemeral ports shares them with every outgoing connection, hive's own kept-alive
    probe connections among them, so a worker can find its port taken when it binds."""
    try:
        first, last = (int(x) for x in source.read_text().split())
    except (OSError, ValueError):
        return None
    if high < first or low > last:
        return None
    return (
        f"port_range {low}-{high} overlaps the ephemeral ports {first}-{last} "
        f"({source}): outgoing connections, hive's own included, can take a worker's port "
        "before it binds; a range outside it (the default is 18000-18999) avoids that"
    )


def port_is_free(port: int) -> bool:
    """True when nothing listens on ``port`` on any address, IPv4 or IPv6 (checked by binding
    each family's wildcard; the IPv6 one alone, so that a listener on ``[::1]`` or ``[::]``
    only counts too).

    SO_REUSEADDR mirrors what servers set, so a connection lingering in TIME_WAIT does not count
    as a listener, while any socket listening on the port, on any address, does.
    """
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this host: nothing can listen there
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((address, port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    return False
                if exc.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    raise
    return True

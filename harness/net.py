"""Loopback ports: a free one, a block of free ones, whether one is taken."""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick, so in the ephemeral range)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    """Whether 127.0.0.1:port can be bound now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def port_in_use(port: int) -> bool:
    """Whether anything listens on 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def port_block(size: int) -> int:
    """The first port of ``size`` consecutive ports that are all free now (below the
    ephemeral range, so that outgoing connections do not take them meanwhile)."""
    low_ephemeral = 32768
    with contextlib.suppress(OSError, ValueError):
        low_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        base = random.randrange(20000, max(20001, low_ephemeral - size - 1), 10)
        if all(port_free(p) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no block of {size} free ports")

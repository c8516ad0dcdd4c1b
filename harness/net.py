"""Loopback ports: a free one, a block of free ones, whether one is taken."""

from __future__ import annotations

import contextlib
import os
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


def port_area() -> tuple[int, int]:
    """The ports ``[low, high)`` this process takes its blocks from (:func:`port_block`, a test
    hive's ``port_range``): from 20000 up to the kernel's ephemeral ports (32768 and up, by
    default), which outgoing connections take, so a worker could find its port taken there.

    In one of pytest-xdist's N workers (``PYTEST_XDIST_WORKER=gwK``,
    ``PYTEST_XDIST_WORKER_COUNT=N``) only the Kth of N slices: the hives, etcds and routers of
    two workers never share ports, so one cannot take a port the other's worker or etcd member
    is restarting on (a free port is only free until someone binds it)."""
    low, high = 20000, 32768
    with contextlib.suppress(OSError, ValueError):
        high = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker.startswith("gw") and worker[2:].isdigit() and count.isdigit():
        k, n = int(worker[2:]), int(count)
        width = (high - low) // max(n, 1) // 500 * 500
        if k < n and width >= 500:
            return low + k * width, low + (k + 1) * width
    return low, high


def port_block(size: int) -> int:
    """The first port of ``size`` consecutive ports that are all free now, in
    :func:`port_area`."""
    low, high = port_area()
    for _ in range(200):
        base = random.randrange(low, max(low + 1, high - size - 1), 10)
        if all(port_free(p) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no block of {size} free ports")

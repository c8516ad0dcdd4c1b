"""A graceful stop's drain: wait, bounded by ``drain_timeout``, until the requests a worker
has in flight have ended, as its heartbeats say, or its engine's load endpoint (read every
0.1 s while draining).

A load read the engine did not answer (nothing within 2 s, an error, a page hive cannot read)
says nothing about the requests in flight: neither idle nor busy, and no reason to give up. The
drain reads again until one answers; only an answer of none in flight ends it before its time.
A busy vLLM's ``/metrics`` may take longer than 2 s, and the figure hive read last, before the
stop, is no answer: it is 0 when the request began since (hive reads an idle engine once a
liveness period).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("hive.lifecycle")


async def until_drained(
    worker_id: str,
    in_flight: Callable[[], int | None],
    read: Callable[[], Awaitable[bool]] | None,
    running: Callable[[], bool],
    seconds: float,
    draining: Callable[[bool], object],
) -> None:
    """Return once ``in_flight()`` is none after an answered read (``read()``: whether the
    engine answered; None where heartbeats report), the process ended (``running()``), or
    ``seconds`` passed; ``draining`` is told while it waits. A read under way when the time
    is up finishes first (2 s at most)."""
    deadline = time.monotonic() + seconds
    known = read is None or await read()
    if known and not in_flight():
        return
    draining(True)
    what = f"{in_flight()} request(s)" if known else "(its load unread: no answer yet)"
    log.info("worker %s draining %s", worker_id, what)
    try:
        while time.monotonic() < deadline and running():
            if known and not in_flight():
                break
            await asyncio.sleep(0.1 if read is not None else 0.05)
            if read is not None:
                known = await read() or known
    finally:
        draining(False)

"""Timeouts: wait for something at most so long, in one way that shutdown can always cancel.

``asyncio.wait_for`` on Python 3.11 can lose a cancellation that arrives while its inner wait
finishes, and a task blocked that way holds hive's shutdown for ever. :func:`within` waits with
``asyncio.wait`` instead, which never swallows the caller's cancellation.

:func:`sleep_to_tick` is the sleep of the periodic per-worker work (liveness probes, load
reads): it ends on the next whole ``TICK`` of the loop's clock at or after the delay, so the
probes of hundreds of workers that fall due within one tick wake the loop once, together, and
their answers come back in a few loop passes, instead of each worker waking it on its own.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

#: Seconds on whose whole multiples the periodic per-worker work wakes.
TICK = 0.5


async def sleep_to_tick(delay: float, tick: float = TICK) -> None:
    """Sleep ``delay`` seconds, and on to the next whole ``tick`` of the loop's clock: at most
    ``tick`` longer, and never more than twice ``delay`` (a period shorter than the tick is
    its own tick)."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    tick = min(tick, delay)
    await asyncio.sleep(math.ceil((now + delay) / tick) * tick - now if tick > 0 else 0)


async def within(awaitable: Awaitable[T], timeout: float | None) -> asyncio.Future[T] | None:
    """The finished future of ``awaitable``, or None when ``timeout`` ran out (it is cancelled)."""
    future = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({future}, timeout=timeout)
    finally:
        if not future.done():
            future.cancel()
    return future if done else None

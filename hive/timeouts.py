"""Timeouts: wait for something at most so long, in one way that shutdown can always cancel.

``asyncio.wait_for`` on Python 3.11 can lose a cancellation that arrives while its inner wait
finishes, and a task blocked that way holds hive's shutdown for ever. :func:`within` waits with
``asyncio.wait`` instead, which never swallows the caller's cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], timeout: float | None) -> asyncio.Future[T] | None:
    """The finished future of ``awaitable``, or None when ``timeout`` ran out (it is cancelled)."""
    future = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({future}, timeout=timeout)
    finally:
        if not future.done():
            future.cancel()
    return future if done else None

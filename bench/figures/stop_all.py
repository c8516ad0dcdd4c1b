"""Figure 7: stopping many workers at once (``POST .../stop?wait=true`` for each, concurrently),
on the hive that figure 6 (``scale.py``) filled with tiny workers."""

from __future__ import annotations

import asyncio
import time

from figures.common import Figure, Settings, check
from harness.daemon import Hive
from harness.stats import summarize


async def figure_stop_all(settings: Settings, hive: Hive, ids: list[str]) -> Figure:
    """Stop ``settings.stop_count`` of the live workers ``ids`` at once: the wall time until
    every request has answered, and each request's time. Then stop the rest."""
    count = min(settings.stop_count, len(ids))
    begun = time.perf_counter()

    async def stop(worker_id: str) -> float:
        started = time.perf_counter()
        await hive.stop_worker(worker_id, wait=True)
        return time.perf_counter() - started

    each = await asyncio.gather(*(stop(w) for w in ids[:count]))
    wall_stop = time.perf_counter() - begun
    await asyncio.gather(*(stop(w) for w in ids[count:]))
    return Figure(
        "7",
        f"stop {count} workers at once: all stopped",
        "s",
        summarize(list(each), keep=False) | {"value": round(wall_stop, 3)},
        target="<= 3 s (100 workers)",
        met=check(wall_stop, "<=", 3) if count == 100 else None,
        stat="value",
        notes=[
            "value: wall time of concurrent POST .../stop?wait=true for each; "
            "p50..max: each request"
        ],
    )

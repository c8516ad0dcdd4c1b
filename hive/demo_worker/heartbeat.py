"""Heartbeats to hive: where they go (from hive's environment) and the loop that sends them.

When hive started the worker (``HIVE_URL``, ``HIVE_WORKER_ID`` and ``HIVE_WORKER_TOKEN`` set), the
worker posts ``{"state": "ready"|"busy", "in_flight": n}`` to
``{HIVE_URL}/v1/workers/{HIVE_WORKER_ID}/heartbeat`` once loaded, every
``HIVE_HEARTBEAT_INTERVAL`` seconds and at once whenever it turns busy or ready again. A failure
is told once on stderr (and again only when it changes), never fatal: hive decides what a
silent worker means.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import TYPE_CHECKING
from urllib.parse import quote

import aiohttp

from hive.demo_worker.output import say, warn

if TYPE_CHECKING:
    from hive.demo_worker.server import DemoWorker

DEFAULT_HEARTBEAT_INTERVAL = 5.0


def heartbeat_target() -> tuple[str, str | None, float] | None:
    """Where heartbeats go, from hive's environment: (base URL, unix socket, interval)."""
    hive_url = os.environ.get("HIVE_URL", "").strip()
    if not hive_url:
        return None
    if not os.environ.get("HIVE_WORKER_ID"):
        warn("demo worker: HIVE_URL is set but HIVE_WORKER_ID is not; not heartbeating")
        return None
    raw = os.environ.get("HIVE_HEARTBEAT_INTERVAL", "")
    try:
        interval = float(raw) if raw else DEFAULT_HEARTBEAT_INTERVAL
    except ValueError:
        interval = -1.0
    if not interval > 0 or interval == float("inf"):
        warn(f"demo worker: HIVE_HEARTBEAT_INTERVAL={raw!r} is not a positive number; using 5")
        interval = DEFAULT_HEARTBEAT_INTERVAL
    if hive_url.startswith("unix://"):
        return "http://localhost", hive_url.removeprefix("unix://"), interval
    return hive_url.rstrip("/"), None, interval


async def heartbeat(
    worker: DemoWorker, base: str, socket_path: str | None, interval: float
) -> None:
    """Report ready or busy to hive every ``interval`` and at once on each change."""
    assert worker.worker_id is not None
    url = f"{base}/v1/workers/{quote(worker.worker_id, safe='')}/heartbeat"
    headers = {"Authorization": f"Bearer {os.environ.get('HIVE_WORKER_TOKEN', '')}"}
    connector = aiohttp.UnixConnector(path=socket_path) if socket_path else None
    timeout = aiohttp.ClientTimeout(total=min(max(interval, 2.0), 10.0))
    last_error: str | None = None
    told_conflict = False
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await worker.loaded.wait()
        while True:
            worker.changed.clear()
            beat = {"state": worker.state, "in_flight": worker.in_flight}
            error: str | None = None
            try:
                async with session.post(url, json=beat, headers=headers) as response:
                    if response.status == 409:
                        if not told_conflict:
                            say("demo worker: hive says this worker is stopped or failed")
                        told_conflict = True
                    elif response.status >= 300:
                        error = f"HTTP {response.status} {(await response.text())[:200]}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            if error is not None and error != last_error:
                warn(f"demo worker: heartbeat to {url} failed ({error}); retrying")
            elif error is None and last_error is not None:
                say("demo worker: heartbeats are answered again")
            last_error = error
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.changed.wait(), interval)

"""Half-alive engines: a worker that answers its health path but makes no progress.

An engine whose model process is stuck (a kernel that never returns, a collective that waits
for ever, a SIGSTOPped vLLM EngineCore) often keeps its HTTP side alive: vLLM's ``/health`` and
``/metrics`` answer in milliseconds while every request hangs. Only the engine's own counters of
work done tell: while it holds requests, they must move.

:class:`ProgressWatch` hears every load read (:mod:`hive.workers.engine_load`: the running count
and a ``progress`` fingerprint, e.g. vLLM's generated tokens and engine steps, a llama-server's
slots' tasks and token counts) and says when a worker has held requests with no change of its
progress for the backend's ``stall_timeout``: the clock starts at the first read that finds
work (never earlier: no read saw when it came) and again at every read that finds progress; an
idle engine, or one whose reads say nothing of progress, has no clock. When the clock runs out,
one more read is made at once and decides: a stall is never called on a read older than the
timeout, whatever the read period. Reads that fail keep
the clock running: an engine that holds requests and cannot say how they go for
``stall_timeout`` is as stuck to its users. The time hive itself did not run
(:class:`hive.workers.stall.LoopWatch`) is left out, so a paused hive blames no engine.

The reads are those the load follower makes anyway (the same page: a stall costs no request
of its own); :func:`until_stalled` only adds them for a worker that heartbeats (its own word on
busy wins, so the follower leaves its engine alone), and decides at the moment the clock runs
out rather than at the next read. Optionally (``deep_probe_period``) it asks an idle engine for
a one-token generation every that many seconds, since an engine that stalled while idle says
nothing until its first user waits.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from hive.config import BackendConfig
from hive.workers.engine_load import Load
from hive.workers.stall import LoopWatch

if TYPE_CHECKING:
    from hive.workers.probes import WorkerProbes

#: The least wait between two looks at the clock (a deadline met early is looked at again).
_MIN_WAIT = 0.05


class ProgressWatch:
    """One worker's stall clock, fed by its load reads."""

    def __init__(self, watch: LoopWatch) -> None:
        self.watch = watch
        self.reset()

    def reset(self) -> None:
        """A new attempt: no clock, nothing seen."""
        #: Since when (``time.monotonic()``) the engine has held requests with no progress.
        self.since: float | None = None
        self.in_flight = 0
        #: When the last read was made (answered or not).
        self.read_at: float | None = None
        self._last: tuple[float, ...] | None = None
        #: Why the last read failed (None: it did not).
        self.failing: str | None = None

    def seen(
        self, load: Load | None, at: float, failure: str | None = None, blind: bool = False
    ) -> None:
        """A load read at ``at``: its answer, or None and why it failed (``blind``: failed on
        hive's side, out of file descriptors: nothing was learnt, and the clock starts over)."""
        if load is None:
            if blind:
                self.since = None if self.since is None else at
                return
            self.failing, self.read_at = failure or "no answer", at
            return
        self.failing, self.read_at = None, at
        if load.progress is None or load.in_flight == 0:
            self.since = None  # idle, or nothing said of progress: no clock
        elif self.since is None or load.progress != self._last:
            self.since = at
        self._last = load.progress
        self.in_flight = load.in_flight

    def due(self, timeout: float) -> float | None:
        """When (``time.monotonic()``) the clock runs out; None while none runs."""
        if self.since is None or timeout <= 0:
            return None
        return self.watch.deadline(self.since, timeout)

    def confirm(self, timeout: float, at: float) -> bool:
        """The clock ran out, and no read was made since: one must be, to decide on."""
        due = self.due(timeout)
        return due is not None and at >= due and (self.read_at is None or self.read_at < due)

    def verdict(self, backend: BackendConfig, at: float) -> str | None:
        """Why the worker stalled (an error beginning ``stalled:``), or None: it stalled when
        its clock ran out and a read made since then found no progress either."""
        due = self.due(backend.stall_timeout)
        if due is None or at < due or self.read_at is None or self.read_at < due:
            return None
        load = backend.load
        n = self.in_flight
        held = f"{n} request{'s' if n != 1 else ''} in flight"
        timeout = f"{backend.stall_timeout:g}s (stall_timeout)"
        if self.failing is not None and load is not None:
            return f"stalled: {held} and {load.path} unanswered for {timeout}; last: {self.failing}"
        what = ", ".join(load.progress) if load is not None and load.progress else "its slots"
        return f"stalled: {held} and no progress for {timeout} ({what} unchanged)"


async def until_stalled(
    probes: WorkerProbes,
    backend: BackendConfig,
    heartbeating: Callable[[], bool],
    model: Callable[[], str],
) -> str:
    """Watch a ready worker's progress; returns why it stalled (cancel to stop watching).

    Never returns for a backend with ``stall_timeout = 0`` or no load endpoint.
    """
    load = backend.load
    if backend.stall_timeout <= 0 or load is None:
        await asyncio.Event().wait()
    assert load is not None
    progress = probes.progress
    slowest = max(load.period, backend.liveness_period)
    wait = load.period
    probed = time.monotonic()
    deep: asyncio.Task[str | None] | None = None
    try:
        while True:
            if heartbeating():  # the follower does not read its engine then: read it here
                before = probes.load
                read = await probes.read_load(backend)
                busy = read is not None and (read.in_flight > 0 or read != before)
                wait = load.period if busy else min(wait * 2, slowest)
            else:
                wait = load.period
            if progress.confirm(backend.stall_timeout, time.monotonic()):
                await probes.read_load(backend)  # decided on what the engine says now
            if (why := progress.verdict(backend, time.monotonic())) is not None:
                return why
            if deep is not None and deep.done():
                why, deep = deep.result(), None
                if why is not None and progress.watch.away_since(probed) == 0:
                    return why
            period, now = backend.deep_probe_period, time.monotonic()
            idle = progress.since is None and not (probes.load and probes.load.in_flight)
            if period is not None and deep is None and idle and now - probed >= period:
                probed = now
                deep = asyncio.create_task(deep_probe(probes.port(), model(), backend))
            due = progress.due(backend.stall_timeout)
            until = wait if due is None else min(wait, due - time.monotonic())
            await asyncio.sleep(max(_MIN_WAIT, until))
    finally:
        if deep is not None:
            deep.cancel()


async def deep_probe(port: int, model: str, backend: BackendConfig) -> str | None:
    """Ask the engine for one token (``POST /v1/completions``); why it stalled when it did not
    answer within ``stall_timeout``, else None (any answer, even an error, is an answer)."""
    body = json.dumps({"model": model, "prompt": "hello", "max_tokens": 1}).encode()
    try:
        key = backend.read_api_key()
    except OSError:
        key = None
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n" + (f"Authorization: Bearer {key}\r\n" if key else "")
    )
    timeout = backend.stall_timeout
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head.encode() + b"\r\n" + body)
            await writer.drain()
            status = await reader.readline()
            if not status:
                return None  # closed: the liveness probe says what that means
    except TimeoutError:
        return (
            f"stalled: a one-token generation (deep probe) got no answer within {timeout:g}s "
            "(stall_timeout)"
        )
    except OSError:
        return None  # refused or reset: the liveness probe's business, not a stall
    finally:
        if writer is not None:
            writer.close()
    return None

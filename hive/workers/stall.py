"""hive's own deafness: how long its event loop did not run, and deadlines that leave it out.

A worker's deadlines (its next heartbeat, its startup timeout, a liveness probe's answer) are
measured on hive's clock. When hive itself does not run (SIGSTOPped, its VM frozen, its loop
blocked by a slow call), a healthy worker's heartbeats wait unread in a socket, and when hive
runs again every deadline has passed at once: hive would take its own silence for the workers'.

:class:`LoopWatch` tells the two apart. It wakes on the loop's half-second ticks (those the
probes already wake on, so it costs no wake-up of its own) and compares when it woke with when
it was due: a wake-up later than :data:`LAG` is a stall, as long as it was late. Stalls are
counted (``hive_loop_stalls_total``, ``hive_loop_stall_seconds_total``), one of a second or more
is logged, and every deadline of a worker is moved out by the time hive stalled since the
deadline's clock started (:meth:`LoopWatch.away_since`). Anything that is about to call a
deadline missed calls :meth:`LoopWatch.check` first (through ``away_since``), so a stall is
seen even before the watch's own tick has run. For :data:`GRACE` after a stall, no deadline
ends: what arrived while hive was away (a heartbeat in a socket's buffer) is read first.

The clock is ``time.monotonic()`` (the loop's): it runs on while hive is SIGSTOPped, which is
what the watch measures, and stands still while the whole machine is suspended, when the
workers stand still too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from hive.timeouts import TICK

if TYPE_CHECKING:
    from hive.state.metrics import Metrics

log = logging.getLogger("hive.stall")

#: Seconds a tick may be late before it counts as a stall of hive's.
LAG = 0.25
#: A stall this long or longer is logged (each one, once).
LOGGED = 1.0
#: Seconds after a stall during which no worker's deadline ends.
GRACE = 1.0
#: Stalls remembered (older ones are older than any deadline that could still ask).
_KEPT = 256


class LoopWatch:
    """How long hive's event loop did not run, and when (``time.monotonic()``)."""

    def __init__(self, metrics: Metrics | None = None, tick: float = TICK) -> None:
        self.metrics = metrics
        self.tick = tick
        #: Stalls seen so far: their number and their seconds.
        self.count = 0
        self.seconds = 0.0
        self._stalls: deque[tuple[float, float]] = deque(maxlen=_KEPT)  # (ended at, seconds)
        self._due: float | None = None  # when the loop should have run the watch next
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._schedule(time.monotonic())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._due = None

    def _schedule(self, now: float) -> None:
        due = (math.floor(now / self.tick) + 1) * self.tick
        self._due = due
        self._handle = asyncio.get_running_loop().call_at(due, self._tick)

    def _tick(self) -> None:
        self.check()
        self._schedule(time.monotonic())

    def check(self) -> None:
        """Notice a stall that has just ended: the loop runs now, later than the watch was due."""
        if self._due is None:
            return
        now = time.monotonic()
        late = now - self._due
        if late < LAG:
            return
        self._due = now  # counted up to here: the tick that is due anyway counts no more
        self.count += 1
        self.seconds += late
        self._stalls.append((now, late))
        if self.metrics is not None:
            self.metrics.loop_stalls.inc()
            self.metrics.loop_stall_seconds.inc(late)
        if late >= LOGGED:
            log.warning(
                "hive was not running for %.1f s (stopped or blocked); "
                "workers' deadlines extended by that",
                late,
            )

    def away_since(self, since: float) -> float:
        """Seconds hive did not run since ``since`` (``time.monotonic()``)."""
        self.check()
        away = 0.0
        for ended, seconds in reversed(self._stalls):
            if ended <= since:
                break
            away += min(seconds, ended - since)
        return away

    def grace_until(self) -> float:
        """Until when (``time.monotonic()``) no deadline ends: :data:`GRACE` after the last
        stall, so that what arrived while hive was away is read first."""
        self.check()
        return self._stalls[-1][0] + GRACE if self._stalls else 0.0

    def deadline(self, started: float, timeout: float) -> float:
        """When a deadline of ``timeout`` seconds from ``started`` ends, the time hive was
        away since then left out."""
        return max(started + timeout + self.away_since(started), self.grace_until())

    async def first(
        self, waits: Iterable[asyncio.Future[Any]], timeout: float
    ) -> set[asyncio.Future[Any]]:
        """``asyncio.wait(waits, timeout, FIRST_COMPLETED)``'s done set, where the timeout
        leaves out the time hive was away; empty when it ran out."""
        waits = list(waits)
        started = time.monotonic()
        while True:
            remaining = self.deadline(started, timeout) - time.monotonic()
            if remaining <= 0:
                return set()
            done, _ = await asyncio.wait(
                waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if done:
                return done


class HangTimer:
    """One worker's heartbeat deadline: hung when no beat came for ``timeout`` seconds of
    hive's running time.

    A beat only moves the deadline; the one timer, when it fires early, sleeps on to the
    deadline. So a worker beating many times a second costs no timer churn, and the hang is
    still found within the timeout of its last beat (plus any time hive was away).
    """

    def __init__(self, watch: LoopWatch, hung: asyncio.Event) -> None:
        self.watch = watch
        self.hung = hung
        self._timer: asyncio.TimerHandle | None = None
        self._beat_at = 0.0
        self._timeout = 0.0

    @property
    def armed(self) -> bool:
        return self._timer is not None

    def arm(self, timeout: float) -> None:
        """A heartbeat came: the worker hangs if none follows within ``timeout``."""
        self._beat_at, self._timeout = time.monotonic(), timeout
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(self._beat_at + timeout, self._due)

    def _due(self) -> None:
        deadline = self.watch.deadline(self._beat_at, self._timeout)
        if time.monotonic() < deadline:  # a beat came since, or hive was away: not yet
            self._timer = asyncio.get_running_loop().call_at(deadline, self._due)
            return
        self.hung.set()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

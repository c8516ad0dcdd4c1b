"""Start-up phases: where each attempt's time to ready went.

An attempt's start-up is cut at the moments hive sees, in order:

- ``hive``: hive's own work, from the attempt's start (the spawn request, or the restart) to
  the process existing (reservations, the journal's write, the containment, the spawn);
- ``process``: from there to the first line the worker writes to its log (an interpreter's
  imports, say);
- the engine's own phases: each ends at the first line of the log that matches its pattern
  (the backend's ``startup_phases``; vLLM's weights, compile, KV cache, ...), and holds what
  happened since the previous cut;
- ``probe``: from the last of those to ready (once the engine says it listens, the readiness
  probe's lag);
- ``register``, after ready: until every router registered it (:mod:`hive.state.registry`).

Up to ``probe`` they sum to the time from the attempt's start to ready, by construction.

The log is the worker's own file (:mod:`hive.workers.logs`): during ``starting`` only, a task
reads what was appended since the attempt's marker every :data:`POLL` seconds, in a thread, at
most :data:`READ_MAX` bytes a time (a flood beyond that is skipped, never queued), and keeps at
most :data:`LINE_KEPT` bytes of a line (the rest of a longer one is not searched): lines of any
length cost bounded memory and time. A line is dated when hive reads it, so each cut is late by
up to :data:`POLL`; at ready the log is read once more, and a line seen only then is dated at
ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from hive.engine_config import PhasePattern
from hive.models import MARKER, StartupPhase

#: Seconds between two reads of a starting worker's log.
POLL = 0.1
#: At most this many bytes are read from the log at a time; more, and the rest is skipped.
READ_MAX = 1 << 20
#: The first this many bytes of a line are searched; the rest of a longer line is not kept.
LINE_KEPT = 4096


class StartupClock:
    """One worker's start-up: the moments of its current attempt, and its log followed for the
    lines that end the engine's phases. ``publish`` hears the phases so far at each new cut."""

    def __init__(self, publish: Callable[[list[StartupPhase]], None]) -> None:
        self._publish = publish
        self._lock = threading.Lock()  # one read of the log at a time
        self._patterns: list[tuple[str, re.Pattern[str]]] = []
        self._path: Path | None = None
        self._shared = False
        self.reset()

    def reset(self) -> None:
        """A new attempt: nothing seen yet."""
        self.begun: float | None = None
        self.executed: float | None = None
        self.ready_at: float | None = None
        self._offset = 0
        self._partial = b""
        self._first: float | None = None
        self._marks: list[tuple[str, float]] = []
        self._seen: set[str] = set()

    # -- moments hive knows (on the loop, but ``exec`` on the spawning thread) --------------------

    def begin(self) -> None:
        """The attempt starts now (a restart; a spawn's start is its record's creation)."""
        self.reset()
        self.begun = time.monotonic()

    def launch(
        self, age: float, log: Path, patterns: Sequence[PhasePattern], shared: bool = False
    ) -> None:
        """The process is about to be spawned; the attempt began ``age`` seconds ago unless
        :meth:`begin` said when; its output goes to ``log`` from its current end (one ``stat``).
        ``shared``: another process writes in that log too (a replacement's successor), so its
        first line says nothing of this one, and no ``process`` cut is made."""
        if self.begun is None:
            self.begun = time.monotonic() - max(0.0, age)
        self._path = log
        self._shared = shared
        self._patterns = [(p.phase, re.compile(p.pattern)) for p in patterns]
        try:
            self._offset = log.stat().st_size
        except OSError:
            self._offset = 0

    def exec(self) -> None:
        """The process exists (called on the thread that spawned it)."""
        self.executed = time.monotonic()

    def ready(self) -> None:
        """The worker is ready: read the log a last time and publish the whole start-up."""
        if self.ready_at is not None or self.begun is None:
            return
        self.ready_at = time.monotonic()
        task = asyncio.get_running_loop().create_task(self._finish())
        _keep(task)

    # -- the log ----------------------------------------------------------------------------------

    async def follow(self) -> None:
        """Read the log as it is written, until cancelled (at ready, exit or a timeout)."""
        if self.ready_at is None:
            self._publish(self.phases())  # hive's own part is known: the process exists
        while self.ready_at is None:
            if await asyncio.to_thread(self._read) and self.ready_at is None:
                self._publish(self.phases())
            await asyncio.sleep(POLL)

    async def _finish(self) -> None:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self._read)
        self._publish(self.phases())

    def _read(self) -> bool:
        """What was appended since the last read, its lines searched; whether a cut was found.
        Blocks (a thread's work)."""
        if self._path is None:
            return False
        with self._lock:
            at = time.monotonic()
            data = self._appended()
            if not data:
                return False
            found = False
            lines = (self._partial + data).split(b"\n")
            self._partial = lines.pop()[:LINE_KEPT]
            for raw in lines:
                line = raw[:LINE_KEPT].decode("utf-8", "replace").strip()
                if not line or line.startswith(MARKER):
                    continue
                if self._first is None and not self._shared:
                    self._first, found = at, True
                for phase, pattern in self._patterns:
                    if phase not in self._seen and pattern.search(line):
                        self._seen.add(phase)
                        self._marks.append((phase, at))
                        found = True
            return found

    def _appended(self) -> bytes:
        """At most :data:`READ_MAX` bytes appended since the last read (a truncated log is read
        from its top; a flood larger than that is skipped to its last part)."""
        assert self._path is not None
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return b""
        try:
            size = os.fstat(fd).st_size
            if size < self._offset:  # capped (truncated in place): its new part is at the top
                self._offset, self._partial = 0, b""
            if size - self._offset > READ_MAX:
                self._offset, self._partial = size - READ_MAX, b""
            data = os.pread(fd, size - self._offset, self._offset) if size > self._offset else b""
        except OSError:
            return b""
        finally:
            os.close(fd)
        self._offset += len(data)
        return data.replace(b"\0", b"")

    # -- the phases -------------------------------------------------------------------------------

    def phases(self) -> list[StartupPhase]:
        """The phases so far: up to the last cut, and to ``probe`` once ready."""
        if self.begun is None or self.executed is None:
            return []
        end = self.ready_at if self.ready_at is not None else float("inf")
        cuts: list[tuple[str, float]] = [("hive", self.executed)]
        if self._first is not None:
            cuts.append(("process", self._first))
        cuts += self._marks
        if self.ready_at is not None:
            cuts.append(("probe", self.ready_at))
        phases, last = [], self.begun
        for phase, at in cuts:
            at = min(max(at, last), end)  # in order, and nothing after ready
            phases.append(StartupPhase(phase=phase, seconds=round(at - last, 3)))
            last = at
        return phases


_TASKS: set[asyncio.Task[None]] = set()


def _keep(task: asyncio.Task[None]) -> None:
    """Hold a fire-and-forget task until it is done (the loop keeps only weak references)."""
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)

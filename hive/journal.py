"""The journal: every worker record on disk, so that a new hive can adopt the running workers.

``<state_dir>/journal.json`` holds, for each worker, its spawn request, its record (state, pid,
port, cores, GPUs...), its heartbeat token and the start time of its process (to tell it from a
recycled pid). It is rewritten whole after each change: written to a temporary file, fsynced,
renamed over the old one, and the directory fsynced, so a crash at any moment leaves either the
old journal or the new one, never a torn one.

Writes happen off the event loop in one writer task; changes that arrive while a write is under
way are folded into the next write. The journal only records; deciding what to adopt is the
supervisor's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hive.models import SpawnRequest, Worker
from hive.process import start_time
from hive.registry import Change, Registry

log = logging.getLogger("hive.journal")

VERSION = 1


@dataclass(frozen=True, slots=True)
class Saved:
    """One worker as the journal remembers it."""

    record: Worker
    spec: SpawnRequest
    token: str
    start_time: float | None


class Journal:
    def __init__(self, path: Path, registry: Registry) -> None:
        self.path = path
        self.registry = registry
        self._dirty = asyncio.Event()
        self._progress = asyncio.Event()
        self._marked = 0
        self._written = 0
        self._loop_thread: int | None = None
        self._writer: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._start_times: dict[tuple[str, int], float | None] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- reading -------------------------------------------------------------------------------

    def load(self) -> list[Saved]:
        """What the last hive left; an unreadable journal is set aside, never fatal."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            self._set_aside(f"cannot read: {exc}")
            return []
        saved = []
        for item in data.get("workers", []) if isinstance(data, dict) else []:
            try:
                saved.append(
                    Saved(
                        record=Worker.model_validate(item["record"]),
                        spec=SpawnRequest.model_validate(item["spec"]),
                        token=str(item["token"]),
                        start_time=item.get("start_time"),
                    )
                )
            except (KeyError, TypeError, ValidationError) as exc:
                log.warning("journal: skipping an entry that does not validate: %s", exc)
        return saved

    def _set_aside(self, why: str) -> None:
        aside = self.path.with_suffix(".json.bad")
        log.error("journal %s %s; moved to %s, starting empty", self.path, why, aside)
        with contextlib.suppress(OSError):
            self.path.replace(aside)

    # -- writing -------------------------------------------------------------------------------

    def start(self) -> None:
        """Follow the registry from now on and write after every change."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._unsubscribe = self.registry.subscribe(self._on_change)
        self._writer = asyncio.create_task(self._write_loop(), name="hive-journal")
        self.mark()

    def _on_change(self, change: Change) -> None:
        if threading.get_ident() == self._loop_thread:
            self.mark()
        elif self._loop is not None:
            self._loop.call_soon_threadsafe(self.mark)

    def mark(self) -> None:
        """Something changed that the journal must hold (a state, a pid...): write soon."""
        self._marked += 1
        self._dirty.set()

    async def flush(self) -> None:
        """Wait until everything marked so far is on disk (hive answers only after that)."""
        if self._writer is None:
            return
        target = self._marked
        while self._written < target and not self._writer.done():
            await self._progress.wait()

    async def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._writer is not None:
            await self.flush()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        self._write(self._snapshot())

    async def _write_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            target = self._marked
            snapshot = self._snapshot()
            try:
                await asyncio.to_thread(self._write, snapshot)
            except OSError as exc:
                log.error("journal: cannot write %s: %s", self.path, exc)
            self._written = target
            self._progress.set()
            self._progress = asyncio.Event()

    def _snapshot(self) -> dict[str, Any]:
        workers = []
        with self.registry.locked() as entries:
            items = list(entries.values())
        for entry in items:
            record = entry.record
            workers.append(
                {
                    "record": json.loads(record.model_dump_json()),
                    "spec": entry.spec.model_dump(mode="json", by_alias=True),
                    "token": entry.token,
                    "start_time": self._start_time(record.id, record.pid),
                }
            )
        return {"version": VERSION, "workers": workers}

    def _start_time(self, worker_id: str, pid: int | None) -> float | None:
        if pid is None:
            return None
        key = (worker_id, pid)
        if key not in self._start_times:
            self._start_times = {k: v for k, v in self._start_times.items() if k[0] != worker_id}
            self._start_times[key] = start_time(pid)
        return self._start_times[key]

    def remember_start_time(self, worker_id: str, pid: int, started: float | None) -> None:
        """For an adopted process: the start time the previous journal vouched for."""
        self._start_times[(worker_id, pid)] = started

    def _write(self, snapshot: dict[str, Any]) -> None:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".json.tmp")
        data = json.dumps(snapshot, separators=(",", ":")).encode()
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

"""What hive has learned of its workers' memory: the peaks of past runs, kept in ``state_dir``.

One entry per *memory key*: the backend, the model, the arguments that change how much memory
the engine takes (:mod:`hive.devices.engine_args` says which) and the GPU share. Each holds the
host and GPU peaks of the last :data:`KEPT` runs that became ready; a spawn that declares no
``memory_mib`` reserves the largest of them (:meth:`MemoryBook.learned`).

The file is ``<state_dir>/memory.json``, read once at start in a thread, and written whole
(temporary file, fsync, rename) in a thread after each change; changes that arrive while one
is written share the next write. A file hive cannot read is set aside as ``memory.json.bad``
and hive starts learning anew: what it learned is a cache, never the truth about a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("hive.memory")

#: Runs remembered per key: the largest of their peaks is what is reserved.
KEPT = 3
#: Keys remembered at most; the least recently used go first.
MAX_KEYS = 1000


@dataclass(frozen=True, slots=True)
class Learned:
    """The largest peaks of the last runs of one key (MiB): host, and GPU (over all its GPUs;
    None when the runs used none), and how many runs they come from."""

    host_mib: int
    gpu_mib: int | None
    runs: int


class MemoryBook:
    """The learned peaks, in memory for lookups under the registry's lock, on disk for the
    next hive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, dict[str, Any]] = {}
        self._writer: asyncio.Task[None] | None = None
        self._write_lock = threading.Lock()
        self._changed: asyncio.Event | None = None

    # -- reading -------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the file (blocking: call from a thread). A missing file is an empty book."""
        try:
            data = json.loads(self.path.read_bytes())
            entries = data["entries"]
            if not isinstance(entries, dict):
                raise ValueError("entries is not an object")
            self._entries = {
                key: entry
                for key, entry in entries.items()
                if isinstance(entry, dict) and isinstance(entry.get("host_mib"), list)
            }
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s cannot be read (%s): learning memory figures anew", self.path, exc)
            with contextlib.suppress(OSError):
                self.path.replace(self.path.with_name(self.path.name + ".bad"))

    def learned(self, key: str) -> Learned | None:
        """The largest of the last runs' peaks for ``key``; None when none was measured."""
        entry = self._entries.get(key)
        if not entry or not entry["host_mib"]:
            return None
        gpu = [g for g in entry.get("gpu_mib", []) if g]
        return Learned(max(entry["host_mib"]), max(gpu) if gpu else None, len(entry["host_mib"]))

    def __len__(self) -> int:
        return len(self._entries)

    # -- learning ------------------------------------------------------------------------------

    def learn(self, key: str, about: dict[str, Any], host_mib: int, gpu_mib: int | None) -> None:
        """One more run of ``key`` peaked at these figures; ``about`` says what the key is made
        of (backend, model, options), for whoever reads the file. Written soon, in a thread."""
        entry = self._entries.pop(key, None) or {"host_mib": [], "gpu_mib": []}
        entry["about"] = about
        entry["host_mib"] = [*entry["host_mib"], host_mib][-KEPT:]
        entry["gpu_mib"] = [*entry.get("gpu_mib", []), gpu_mib or 0][-KEPT:]
        self._entries[key] = entry  # last: the most recently used
        while len(self._entries) > MAX_KEYS:
            del self._entries[next(iter(self._entries))]
        if self._changed is not None:
            self._changed.set()

    def start(self) -> None:
        """Write changes from now on (on the running loop)."""
        self._changed = asyncio.Event()
        self._writer = asyncio.create_task(self._write_loop(), name="hive-memory-book")

    async def close(self) -> None:
        """Write what is not written yet, then stop."""
        if self._writer is None or self._changed is None:
            return
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        if self._changed.is_set():
            try:
                await asyncio.to_thread(self._write, self._snapshot())
            except OSError as exc:  # shutdown goes on; the figures are learned again
                log.warning("cannot write %s: %s", self.path, exc.strerror or exc)

    async def _write_loop(self) -> None:
        assert self._changed is not None
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await asyncio.to_thread(self._write, self._snapshot())
            except OSError as exc:
                log.warning("cannot write %s: %s", self.path, exc.strerror or exc)
                await asyncio.sleep(5.0)
                self._changed.set()

    def _snapshot(self) -> bytes:
        return json.dumps({"version": 1, "entries": self._entries}, indent=1).encode()

    def _write(self, data: bytes) -> None:
        """Atomically: a temporary file, fsync, rename over the old one. One write at a time:
        a write cancelled at shutdown still runs in its thread while the last one starts."""
        with self._write_lock:
            partial = self.path.with_name(f".{self.path.name}.partial")
            with open(partial, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            partial.replace(self.path)

"""Worker log files: one append-only file per worker that hive owns and the worker writes.

The worker's stdout and stderr are the file itself (opened with O_APPEND), so hive never sits in
the data path. To cap a file at ``max_log_bytes``, hive copies it to ``<id>.log.1`` and truncates
it once it passes half the cap: together the two never hold much more than the cap, and the
previous part, often the crash that caused a restart, stays readable. Each start of a worker
appends a ``--- hive:`` line, so the log of an earlier attempt is kept, not overwritten.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

from hive.models import MARKER, base_id

log = logging.getLogger("hive.logs")

#: What starts each line hive writes into a worker's log; readers (the CLI, tests) match it too.
#: How often a log's size is looked at: every 10 s at most, every second at least.
CAP_PERIOD_MIN, CAP_PERIOD_MAX = 1.0, 10.0
_BLOCK = 64 * 1024


class Logs:
    """The directory of worker logs and the operations on one worker's log."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._failing = False
        self._names: dict[str, str] = {}  # worker id -> its log's path, as a string
        self._sizes: dict[str, tuple[float, int]] = {}  # worker id -> (when, size) last seen
        directory.mkdir(parents=True, exist_ok=True, mode=0o750)

    def path(self, worker_id: str) -> Path:
        """A worker's log; a successor (``<id>~<generation>``) writes on in its worker's."""
        return self.directory / f"{base_id(worker_id)}.log"

    def mark(self, worker_id: str, text: str) -> None:
        """Append one line of hive's own, e.g. at each start of the worker."""
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
        try:
            with self.path(worker_id).open("a") as file:
                file.write(f"{MARKER}{stamp} {text}\n")
        except OSError as exc:  # a full disk costs the marker, never the worker
            if not self._failing:
                log.error("cannot write to the worker logs in %s: %s", self.directory, exc)
                self._failing = True
        else:
            if self._failing:
                log.info("worker logs in %s are writable again", self.directory)
                self._failing = False

    def tail(self, worker_id: str, lines: int) -> str:
        """The last ``lines`` lines of the log (reaching into the rotated part if needed)."""
        if lines <= 0:
            return ""
        chunks = []
        wanted = lines
        for path in (self.path(worker_id), self._rotated(worker_id)):
            text = _tail_of(path, wanted)
            chunks.insert(0, text)
            wanted -= text.count("\n")
            if wanted <= 0:
                break
        out = "".join(chunks).splitlines(keepends=True)
        return "".join(out[-lines:])

    def last_line(self, worker_id: str) -> str | None:
        """The worker's last non-empty line, leaving out hive's own markers."""
        for line in reversed(_tail_of(self.path(worker_id), 50).splitlines()):
            line = line.strip()
            if line and not line.startswith(MARKER):
                return line[:500]
        return None

    def cap(self, worker_id: str, now: float | None = None) -> float:
        """Rotate the log if it passed half of ``max_bytes``; returns the seconds until it
        should be looked at again.

        That is :data:`CAP_PERIOD_MAX` for a log that grows slowly, and less, down to
        :data:`CAP_PERIOD_MIN`, for one that grows fast enough to pass the threshold before
        then (half its time to the threshold at its last rate), so a quiet host costs one
        ``stat`` per worker every 10 s, and a chatty worker's log still stays near its cap.
        """
        name = self._names.get(worker_id)
        if name is None:
            name = self._names[worker_id] = str(self.path(worker_id))
        at = time.monotonic() if now is None else now
        threshold = self.max_bytes // 2
        try:
            size = os.stat(name).st_size
            if size > threshold:
                path = self.path(worker_id)
                shutil.copyfile(path, self._rotated(worker_id))
                os.truncate(path, 0)
                self._sizes[worker_id] = (at, 0)
                return CAP_PERIOD_MIN  # it filled half the cap: look again soon
        except FileNotFoundError:
            self._sizes.pop(worker_id, None)
            return CAP_PERIOD_MAX
        last = self._sizes.get(worker_id)
        self._sizes[worker_id] = (at, size)
        if last is None:
            return CAP_PERIOD_MIN  # a first look: soon again, to learn how fast it grows
        if at <= last[0] or size <= last[1]:
            return CAP_PERIOD_MAX
        rate = (size - last[1]) / (at - last[0])
        return max(CAP_PERIOD_MIN, min(CAP_PERIOD_MAX, (threshold - size) / rate / 2))

    def remove(self, worker_id: str) -> None:
        """Delete a worker's log. A successor's id (``<id>~<generation>``) deletes nothing: the
        log it wrote in is its worker's, which goes on."""
        self._names.pop(worker_id, None)
        self._sizes.pop(worker_id, None)
        if base_id(worker_id) != worker_id:
            return
        for path in (self.path(worker_id), self._rotated(worker_id)):
            path.unlink(missing_ok=True)

    async def follow(
        self, worker_id: str, lines: int, done: Callable[[], bool], poll: float = 0.2
    ) -> AsyncIterator[bytes]:
        """The tail, then whatever is appended, until ``done()`` and nothing more is written."""
        yield self.tail(worker_id, lines).encode()
        path = self.path(worker_id)
        position = path.stat().st_size if path.exists() else 0
        while True:
            size = path.stat().st_size if path.exists() else 0
            if size < position:  # rotated or truncated: start over at the top
                position = 0
            if size > position:
                with path.open("rb") as log:
                    log.seek(position)
                    data = log.read(size - position)
                position += len(data)
                yield data
                continue
            if done():
                return
            await asyncio.sleep(poll)

    def _rotated(self, worker_id: str) -> Path:
        return self.directory / f"{base_id(worker_id)}.log.1"


def _tail_of(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as log:
            end = log.seek(0, os.SEEK_END)
            position, data = end, b""
            while position > 0 and data.count(b"\n") <= lines:
                step = min(_BLOCK, position)
                position -= step
                log.seek(position)
                data = log.read(step) + data
    except FileNotFoundError:
        return ""
    text = data.decode(errors="replace")
    kept = text.splitlines(keepends=True)[-lines:]
    return "".join(kept)

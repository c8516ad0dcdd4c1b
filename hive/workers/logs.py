"""Worker log files: one append-only file per worker that hive owns and the worker writes.

The worker's stdout and stderr are the file itself (opened with O_APPEND), so hive never sits in
the data path, and a worker outlives hive with its output still kept. Each start of a worker
appends a ``--- hive:`` line, on a line of its own, so the log of an earlier attempt is kept,
not overwritten.

Nothing here is slow on the event loop. Every read is bounded in bytes, whatever the lines'
lengths or the file's size, and runs in a thread (the ``async`` methods): a tail reads at most
:data:`TAIL_WINDOW` bytes from the end (a line longer than that is cut, and the cut is
marked), a worker's last line at most :data:`LAST_LINE_WINDOW`, a follower at most
:data:`FOLLOW_CHUNK` at a time. Holes of a sparse log read as nothing.

The cap (``max_log_bytes``) is kept by truncating in place: once a log is larger than half of
the cap, its last ``max_log_bytes / 2`` bytes (their data only, never a hole) are copied
to ``<id>.log.1`` and the live file is truncated to 0; the worker's O_APPEND writes go on at
the new end. A sparse log's holes are never copied (SEEK_DATA), so a log that grows by a hole
fills no disk.

A thread of its own, the keeper, looks at the logs of the workers that run: at once when one
starts, then as fast as it grows (:meth:`Logs.cap`), from every :data:`CAP_PERIOD_MAX` down to
every :data:`CAP_PERIOD_MIN`. The two files together stay under twice the cap as long as what
the worker writes between two looks (and during a truncation's copy) stays under the cap:
measured, 100 MB/s against 10-50 MB caps peaked at 1.1-1.9x (docs/behaviour.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from hive.models import MARKER, base_id

log = logging.getLogger("hive.logs")

#: A tail reads at most this many bytes from the end of a log (its two parts together).
TAIL_WINDOW = 1 << 20
#: A worker's last line is looked for in at most this many bytes from the end of its log.
LAST_LINE_WINDOW = 64 * 1024
#: A follower reads what was appended at most this many bytes at a time.
FOLLOW_CHUNK = 1 << 20
#: How often a log's size is looked at: every quarter second at most, every 5 ms at least.
CAP_PERIOD_MIN, CAP_PERIOD_MAX = 0.005, 0.25
#: The keeper thread's nice value, where hive may set it (it needs root to go below 0).
KEEPER_NICE = -5
_BLOCK = 1 << 20


class Logs:
    """The directory of worker logs and the operations on one worker's log.

    The plain methods do file work and block: they are for threads (the ``async`` ones run them
    there) and for callers off the loop (the CLI, tests).
    """

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        generation: Callable[[str], int | None] | None = None,
    ) -> None:
        """``generation``: the generation a worker's marker lines name, where its log is shared
        with a successor (:meth:`hive.state.registry.Registry.log_generation`)."""
        self.directory = directory
        self.max_bytes = max_bytes
        self._generation = generation
        self._failing = False
        self._names: dict[str, str] = {}  # worker id -> its log's path, as a string
        # worker id -> (when, bytes, period) at its last look
        self._looks: dict[str, tuple[float, int, float]] = {}
        self._capped: frozenset[str] = frozenset()  # the workers whose logs are kept capped
        self._wake = threading.Event()
        self._keeper: threading.Thread | None = None
        self._closing = False
        directory.mkdir(parents=True, exist_ok=True, mode=0o750)

    def path(self, worker_id: str) -> Path:
        """A worker's log; a successor (``<id>~<generation>``) writes on in its worker's."""
        return self.directory / f"{base_id(worker_id)}.log"

    def mark(self, worker_id: str, text: str) -> None:
        """Append one line of hive's own, e.g. at each start of the worker: on a line of its
        own, after a newline when the worker's last output (in ``.log.1`` when the log was just
        truncated) did not end with one.

        A few bounded system calls (open, one byte read, one write): cheap enough for the loop.
        """
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
        if self._generation is not None and (generation := self._generation(worker_id)):
            text = f"generation {generation}: {text}"  # which of two processes sharing the log
        line = f"{MARKER}{stamp} {text}\n".encode()
        try:
            fd = os.open(self.path(worker_id), os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                size = os.fstat(fd).st_size
                last = os.pread(fd, 1, size - 1) if size else _last_byte(self._rotated(worker_id))
                if last not in (b"\n", b""):
                    line = b"\n" + line
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:  # a full disk costs the marker, never the worker
            if not self._failing:
                log.error("cannot write to the worker logs in %s: %s", self.directory, exc)
                self._failing = True
        else:
            if self._failing:
                log.info("worker logs in %s are writable again", self.directory)
                self._failing = False

    # -- reading ---------------------------------------------------------------------------------

    async def read_tail(self, worker_id: str, lines: int) -> str:
        """:meth:`tail`, in a thread."""
        return await asyncio.to_thread(self.tail, worker_id, lines)

    async def read_last_line(self, worker_id: str) -> str | None:
        """:meth:`last_line`, in a thread."""
        return await asyncio.to_thread(self.last_line, worker_id)

    def tail(self, worker_id: str, lines: int) -> str:
        """The last ``lines`` lines of the log (reaching into the rotated part if needed),
        read from at most the last :data:`TAIL_WINDOW` bytes of both. Blocks."""
        return self._tail(worker_id, lines)[0]

    def last_line(self, worker_id: str) -> str | None:
        """The worker's last non-empty line, leaving out hive's own markers, looked for in the
        last :data:`LAST_LINE_WINDOW` bytes of its log. Blocks."""
        data, _, _ = _read_end(self.path(worker_id), LAST_LINE_WINDOW)
        for line in reversed(data.decode(errors="replace").splitlines()):
            line = line.strip()
            if line and not line.startswith(MARKER):
                return line[:500]
        return None

    def _tail(self, worker_id: str, lines: int) -> tuple[str, int]:
        """The tail and the live file's size it was read up to."""
        if lines <= 0:
            return "", _size(self.path(worker_id))
        data, whole, end = b"", True, None
        budget = TAIL_WINDOW
        for path in (self.path(worker_id), self._rotated(worker_id)):
            part, whole, size = _read_end(path, budget)
            end = size if end is None else end
            data = part + data
            budget -= len(part)
            if not whole or data.count(b"\n") > lines or budget <= 0:
                break
        every = data.decode(errors="replace").splitlines(keepends=True)
        kept = every[-lines:]
        if kept and not whole and len(kept) == len(every):
            kept[0] = f"{MARKER}(line cut: only its last {TAIL_WINDOW} bytes are read) {kept[0]}"
        return "".join(kept), end or 0

    async def follow(
        self, worker_id: str, lines: int, done: Callable[[], bool], poll: float = 0.2
    ) -> AsyncIterator[bytes]:
        """The tail, then whatever is appended, until ``done()`` and nothing more is written.

        Read in a thread, :data:`FOLLOW_CHUNK` bytes at a time; a log truncated (capped) is
        followed from its top again, and a jump of more than :data:`TAIL_WINDOW` (a hole) is
        skipped to its last window, with a marker saying how much."""
        text, position = await asyncio.to_thread(self._tail, worker_id, lines)
        yield text.encode()
        path = self.path(worker_id)
        while True:
            data, read_to = await asyncio.to_thread(_read_on, path, position)
            if data:
                yield data
            if read_to != position:
                position = read_to
                continue
            if done():
                return
            await asyncio.sleep(poll)

    # -- the cap ---------------------------------------------------------------------------------

    def keep_capped(self, worker_ids: Iterable[str]) -> None:
        """The workers whose logs the keeper looks at from now on (those that run or will)."""
        self._capped = frozenset(worker_ids)

    def started(self, worker_id: str) -> None:
        """A worker is starting: the keeper looks at its log at once, and then as it grows."""
        self._capped = self._capped | {worker_id}
        self._wake.set()

    def start_keeper(self) -> None:
        """Start the keeper: a thread of its own that caps the logs (the loop never waits on
        it, and the looks cost no loop wake-up)."""
        self._closing = False
        self._keeper = threading.Thread(target=self._keep, name="hive-log-cap", daemon=True)
        self._keeper.start()

    async def stop_keeper(self) -> None:
        if self._keeper is not None:
            self._closing = True
            self._wake.set()
            await asyncio.to_thread(self._keeper.join)
            self._keeper = None

    def _keep(self) -> None:
        # Ahead of the workers on a busy host, where hive may raise its priority (root): a
        # flood outruns a keeper that waits for a CPU. A thread's own nice value, on Linux.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), KEEPER_NICE)
        due: dict[str, float] = {}  # worker id -> when its log is due a look
        while not self._closing:
            self._wake.clear()  # a start from here on wakes the wait below at once
            now = time.monotonic()
            capped = self._capped
            for worker_id in due.keys() - capped:
                del due[worker_id]
            for worker_id in capped:
                if due.get(worker_id, 0.0) <= now:
                    try:
                        period = self.cap(worker_id)
                        due[worker_id] = time.monotonic() + period
                    except Exception:  # never the end of the keeper
                        log.exception("capping the log of worker %s failed", worker_id)
                        due[worker_id] = now + CAP_PERIOD_MAX
            wake = min(due.values(), default=now + CAP_PERIOD_MAX)
            self._wake.wait(max(0.0, wake - time.monotonic()))

    def cap(self, worker_id: str, now: float | None = None) -> float:
        """Truncate the log in place once it is larger than half of ``max_bytes``;
        returns the seconds until it should be looked at again. Blocks (a stat, and at most
        ``max_bytes / 2`` bytes copied).

        That is half the time the log's last rate takes to reach the threshold, from
        :data:`CAP_PERIOD_MIN` up to :data:`CAP_PERIOD_MAX`, and at most twice the last period:
        a writer that paused for a few milliseconds (a truncation, the kernel's write-back
        throttling) is not taken for a quiet one, while a quiet host still costs one ``stat``
        per worker every quarter second.
        """
        name = self._names.get(worker_id)
        if name is None:
            name = self._names[worker_id] = str(self.path(worker_id))
        at = time.monotonic() if now is None else now
        threshold = self.max_bytes // 2
        try:
            used = os.stat(name).st_size
        except OSError:  # gone (removed), or unreadable: nothing to cap
            self._looks.pop(worker_id, None)
            return CAP_PERIOD_MAX
        last = self._looks.get(worker_id)
        rate = None  # a first look: soon again, to learn how fast it grows
        if last is not None and at > last[0]:
            grown = used - last[1] if used >= last[1] else used  # less: truncated by another
            rate = grown / (at - last[0])
        if used > threshold:
            try:
                self._truncate(worker_id)
            except OSError as exc:
                log.error("cannot cap the log of worker %s: %s", worker_id, exc)
            used = 0
            at = time.monotonic() if now is None else at  # it grows again from here
        if rate is None or last is None:
            period = CAP_PERIOD_MIN
        else:
            wanted = (threshold - used) / rate / 2 if rate > 0 else CAP_PERIOD_MAX
            period = max(CAP_PERIOD_MIN, min(CAP_PERIOD_MAX, 2 * last[2], wanted))
        self._looks[worker_id] = (at, used, period)
        return period

    def _truncate(self, worker_id: str) -> None:
        """The log's last ``max_bytes / 2`` bytes to ``<id>.log.1`` (their data: holes stay
        holes; fewer when it overshot), then the live file truncated to 0, where the worker's
        next write lands."""
        source = os.open(self.path(worker_id), os.O_RDONLY | os.O_NONBLOCK)
        try:
            info = os.fstat(source)
            if not stat.S_ISREG(info.st_mode):
                return
            end = info.st_size
            # Half the cap; less when the log overshot on disk (a flood between two looks; a
            # sparse log's holes take no room), so that the two together hold at most 1.5
            # times the cap but for what comes meanwhile.
            on_disk = min(end, info.st_blocks * 512)
            keep = max(0, min(self.max_bytes // 2, self.max_bytes * 3 // 2 - on_disk, end))
            start = end - keep
            target = os.open(self._rotated(worker_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                _copy_data(source, target, start, end, start)
                os.ftruncate(target, keep)  # its length, should it end in a hole
            finally:
                os.close(target)
            # What the worker writes during the copy (milliseconds) goes with the truncation.
            os.truncate(self.path(worker_id), 0)
        finally:
            os.close(source)

    def remove(self, worker_id: str) -> None:
        """Delete a worker's log. A successor's id (``<id>~<generation>``) deletes nothing: the
        log it wrote in is its worker's, which goes on. Blocks (a big file's blocks are freed):
        :meth:`discard` runs it in a thread."""
        self._names.pop(worker_id, None)
        self._looks.pop(worker_id, None)
        if base_id(worker_id) != worker_id:
            return
        for path in (self.path(worker_id), self._rotated(worker_id)):
            path.unlink(missing_ok=True)

    async def discard(self, worker_id: str) -> None:
        """:meth:`remove`, in a thread."""
        await asyncio.to_thread(self.remove, worker_id)

    def _rotated(self, worker_id: str) -> Path:
        return self.directory / f"{base_id(worker_id)}.log.1"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _open(path: Path) -> int | None:
    """The log open for reading, never blocking (a FIFO put in its place), or None if it is
    missing or not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _last_byte(path: Path) -> bytes:
    fd = _open(path)
    if fd is None:
        return b""
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, 1, size - 1) if size else b""
    finally:
        os.close(fd)


def _read_end(path: Path, budget: int) -> tuple[bytes, bool, int]:
    """At most ``budget`` bytes from the end of the file, holes left out; whether they begin at
    a line's start (the file's or after a newline); and the file's size."""
    fd = _open(path)
    if fd is None:
        return b"", True, 0
    try:
        size = os.fstat(fd).st_size
        start = max(0, size - budget)
        before = os.pread(fd, 1, start - 1) if start > 0 else b"\n"
        data = os.pread(fd, size - start, start) if size > start else b""
    finally:
        os.close(fd)
    return data.replace(b"\0", b""), before in (b"\n", b"\0"), size  # after a hole: no cut


def _read_on(path: Path, position: int) -> tuple[bytes, int]:
    """What was appended after ``position`` (at most :data:`FOLLOW_CHUNK` bytes, a hole
    skipped), and the position after it."""
    fd = _open(path)
    if fd is None:
        return b"", 0
    try:
        size = os.fstat(fd).st_size
        if size < position:  # truncated (capped): start over at the top
            position = 0
        data = b""
        if size > position:
            position = _next_data(fd, position, size)
            data = os.pread(fd, min(FOLLOW_CHUNK, size - position), position)
    finally:
        os.close(fd)
    return data.replace(b"\0", b""), position + len(data)


def _next_data(fd: int, position: int, size: int) -> int:
    """Where the next data after ``position`` begins: past a hole, if there is one."""
    try:
        return min(os.lseek(fd, position, os.SEEK_DATA), size)
    except OSError as exc:
        return size if exc.errno == errno.ENXIO else position  # only a hole; no SEEK_DATA


def _copy_data(source: int, target: int, start: int, end: int, base: int) -> None:
    """Copy the bytes of ``source`` in [start, end) to ``target``, at their offset less
    ``base``, data only: a hole (SEEK_DATA/SEEK_HOLE) is seeked over, so a sparse log stays
    sparse and small."""
    position = start
    while position < end:
        try:
            data_at = os.lseek(source, position, os.SEEK_DATA)
            hole_at = os.lseek(source, data_at, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
                return
            data_at, hole_at = position, end  # no SEEK_DATA here: copy it all
        if data_at >= end:
            return
        position = data_at
        stop = min(hole_at, end)
        while position < stop:
            chunk = os.pread(source, min(_BLOCK, stop - position), position)
            if not chunk:
                return
            os.pwrite(target, chunk, position - base)
            position += len(chunk)


def shares_log(worker_id: str, ids: Iterable[str]) -> bool:
    """True while another of ``ids`` writes in this worker's log: a replacement's successor
    (``web~2`` writes on in ``web``'s log), or the worker it replaces."""
    base = base_id(worker_id)
    return any(other != worker_id and base_id(other) == base for other in ids)

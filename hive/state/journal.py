"""The journal: every worker record on disk, so that a new hive can adopt the running workers.

``<state_dir>/journal.json`` holds, for each worker, its spawn request, its record (state, pid,
port, cores, GPUs...), its heartbeat token and the start time of its process (to tell it from a
recycled pid). It is rewritten whole after each change, and a write is complete or not done at
all:

1. the new journal goes to ``journal.json.tmp``, every byte of it (short writes are resumed),
   and is fsynced;
2. the current ``journal.json`` is hard-linked as ``journal.json.1.tmp``, renamed over
   ``journal.json.1`` (the previous generation, one write behind);
3. ``journal.json.tmp`` is renamed over ``journal.json`` and the directory is fsynced.

At every instant ``journal.json`` is a complete journal, and so is ``journal.json.1`` once a
second write has happened. On a filesystem without hard links, step 2 renames ``journal.json`` to
``journal.json.1`` instead: ``journal.json`` is then briefly missing, and :meth:`Journal.load`
reads ``journal.json.1``. When any step fails (``ENOSPC``, ``EIO``, ``EDQUOT``...) the temporary
files are removed, ``journal.json`` is left as it was, and the failure is reported:
:meth:`Journal.flush` raises :class:`JournalError` to a caller whose change that write was to
hold, so it can refuse its request, and :attr:`Journal.healthy` / :attr:`Journal.last_error` say
so until a later write succeeds (a failed journal retries on its own every ``retry_interval``).

On load, a ``journal.json`` that cannot be read or parsed (torn, garbage, another version, not a
dict) is moved aside to ``journal.json.bad`` and ``journal.json.1`` is read instead;
:attr:`Journal.loaded_from` says which file the records came from. Entries that do not validate
are skipped one by one.

Writes happen off the event loop in one writer task; changes that arrive while a write is under
way are folded into the next write. The journal only records; deciding what to adopt is the
supervisor's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hive.errors import JournalError
from hive.host.process import start_time
from hive.models import SpawnRequest, Worker
from hive.state.registry import Change, Registry

log = logging.getLogger("hive.journal")

VERSION = 1

#: ``link(2)`` errors that mean "this filesystem has no hard links", not "the write failed".
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


#: One worker as a write holds it: its record, spec, token and process start time.
_Item = tuple[Worker, SpawnRequest, str, float | None]


class _Encoder:
    """The journal's bytes, for the writer's thread: a worker whose record, spec, token and
    start time are the objects of the last write reuses that write's bytes."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[_Item, bytes]] = {}

    def encode(self, items: list[_Item]) -> bytes:
        """The journal's bytes (in the writer's thread). A worker whose record, spec, token and
        start time are the objects of the last write is not serialized again: a write costs
        the workers that changed, not all of them."""
        fragments: dict[str, tuple[_Item, bytes]] = {}
        for item in items:
            record, spec, token, started = item
            cached = self._last.get(record.id)
            if cached is not None and all(a is b for a, b in zip(cached[0], item, strict=True)):
                fragments[record.id] = cached
                continue
            body = b"".join(
                (
                    b'{"record":',
                    record.model_dump_json().encode(),
                    b',"spec":',
                    spec.model_dump_json(by_alias=True).encode(),
                    b',"token":',
                    json.dumps(token).encode(),
                    b',"start_time":',
                    json.dumps(started).encode(),
                    b"}",
                )
            )
            fragments[record.id] = (item, body)
        self._last = fragments
        workers = b",".join(body for _, body in fragments.values())
        return b'{"version":%d,"workers":[%s]}' % (VERSION, workers)


class _Unreadable(Exception):
    """A journal file that exists but cannot be used."""


@dataclass(frozen=True, slots=True)
class Saved:
    """One worker as the journal remembers it."""

    record: Worker
    spec: SpawnRequest
    token: str
    start_time: float | None


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


class Journal:
    """The registry on disk: the writer that follows it, and the loader for the next hive.

    Over 300 lines on purpose: the crash-safe write sequence, its failure handling and the
    generation fallback on load are one protocol, easier to check whole in one place.
    """

    def __init__(self, path: Path, registry: Registry, retry_interval: float = 5.0) -> None:
        self.path = path
        self.registry = registry
        #: While the journal cannot be written, how often it tries again without a new change.
        self.retry_interval = retry_interval
        #: The file :meth:`load` took the records from (``journal.json`` or ``journal.json.1``);
        #: None when there was none to use.
        self.loaded_from: Path | None = None
        #: True when a journal existed but neither generation could be read: the running
        #: workers must be rebuilt from their processes.
        self.lost = False
        self._dirty = asyncio.Event()
        self._progress = asyncio.Event()
        # Progress is counted in marks: one for each change heard and each call of mark(). A
        # write covers the marks made before its snapshot was taken.
        self._marked = 0
        self._heard = 0  # the registry's seq of the last change heard
        self._attempted = 0  # the marks that the last finished write covered
        self._durable = 0  # the marks that the last successful write covered
        self._reason: str | None = None
        self._failures = 0
        self._closing = False
        self._writer: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._start_times: dict[tuple[str, int], float | None] = {}
        #: Serializes each write (only ever from the one writing thread).
        self._encoder = _Encoder()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def previous(self) -> Path:
        """``journal.json.1``: the journal as it was before the last write."""
        return _sibling(self.path, ".1")

    @property
    def _temporary(self) -> Path:
        return _sibling(self.path, ".tmp")

    @property
    def _previous_temporary(self) -> Path:
        return _sibling(self.previous, ".tmp")

    @property
    def healthy(self) -> bool:
        """Whether the last write succeeded (True before the first)."""
        return self._reason is None

    @property
    def last_error(self) -> str | None:
        """Why the last write failed (``cannot write <path>: <reason>``); None when it did not."""
        return None if self._reason is None else f"cannot write {self.path}: {self._reason}"

    # -- reading -------------------------------------------------------------------------------

    def load(self) -> list[Saved]:
        """What the last hive left; an unreadable journal is set aside, never fatal.

        ``journal.json`` first; when it cannot be used (torn, garbage, another version, or
        missing while a previous generation exists) ``journal.json.1``. :attr:`loaded_from` says
        which; neither usable means an empty list, logged as an error.
        """
        self.loaded_from = None
        self.lost = False
        for leftover in (self._temporary, self._previous_temporary):  # a write cut short
            with contextlib.suppress(OSError):
                leftover.unlink()
        try:
            data = self._read(self.path)
        except FileNotFoundError:
            if not self.previous.exists():
                return []  # the first start in this state_dir
            log.warning(
                "journal %s is missing but %s exists (hive stopped in the middle of a write?)",
                self.path,
                self.previous,
            )
        except _Unreadable as exc:
            self._set_aside(self.path, str(exc))
        else:
            self.loaded_from = self.path
            return self._entries(data)
        try:
            data = self._read(self.previous)
        except (FileNotFoundError, _Unreadable) as exc:
            if isinstance(exc, _Unreadable):
                self._set_aside(self.previous, str(exc))
            self.lost = True
            log.error(
                "journal: no usable journal in %s (neither %s nor %s); starting empty, running"
                " workers are rebuilt from their own processes",
                self.path.parent,
                self.path.name,
                self.previous.name,
            )
            return []
        log.warning("journal: loading the previous generation, %s", self.previous)
        self.loaded_from = self.previous
        return self._entries(data)

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        """The parsed journal at ``path``; FileNotFoundError, or _Unreadable saying why."""
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise _Unreadable(f"cannot be read: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise _Unreadable(f"is not valid JSON (torn or garbage): {exc}") from None
        if not isinstance(data, dict):
            raise _Unreadable(f"is not a journal (a JSON {type(data).__name__})")
        if data.get("version") != VERSION:
            raise _Unreadable(f"has version {data.get('version')!r}, not {VERSION}")
        if not isinstance(data.get("workers"), list):
            raise _Unreadable("has no list of workers")
        return data

    @staticmethod
    def _entries(data: dict[str, Any]) -> list[Saved]:
        saved = []
        for item in data["workers"]:
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

    @staticmethod
    def _set_aside(path: Path, why: str) -> None:
        aside = _sibling(path, ".bad")
        log.error("journal %s %s; moved to %s", path, why, aside)
        with contextlib.suppress(OSError):
            path.replace(aside)

    # -- writing -------------------------------------------------------------------------------

    def start(self) -> None:
        """Follow the registry from now on and write after every change."""
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._unsubscribe = self.registry.subscribe(self._on_change)
        self._writer = asyncio.create_task(self._write_loop(), name="hive-journal")
        self.mark()

    def _on_change(self, change: Change) -> None:
        # Every change but the hot fields' is told, on the loop: each one is worth a write.
        self._heard = max(self._heard, change.seq)
        self.mark()

    def mark(self) -> None:
        """Write soon, whatever changed (the registry's changes need no call: they are heard)."""
        self._marked += 1
        self._dirty.set()

    async def flush(self) -> None:
        """Wait until everything marked so far is on disk (hive answers only after that).

        Raises :class:`JournalError` when the write that was to hold it failed: the change is
        not on disk, and the request that made it should be refused.
        """
        if self._writer is None:
            return
        if self.registry.seq > self._heard:
            self.mark()  # a change made but not yet heard (it is on its way to _on_change)
        target = self._marked
        while self._durable < target:
            if self._attempted >= target:  # the write covering ``target`` ended, and failed
                raise JournalError(self.path, self._reason or "unknown error")
            if self._writer.done():  # closing: close() writes the last state itself
                return
            await self._progress.wait()

    async def close(self) -> None:
        """Stop following the registry and write the journal one last time.

        A failure of that last write is logged and shows in :attr:`healthy`; it is not raised,
        so that the rest of hive's shutdown still happens.
        """
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._writer is not None:
            self._closing = True
            self._dirty.set()
            await self._writer  # a write under way ends first: never two at once
            self._writer = None
        target = self._marked
        try:
            self._write(self._encoder.encode(self._snapshot()))
        except JournalError as exc:
            self._record(target, exc)
        else:
            self._record(target, None)

    async def _write_loop(self) -> None:
        try:
            while not self._closing:
                if self._reason is None:
                    await self._dirty.wait()
                else:  # failing: try again now and then, the disk may have room again
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._dirty.wait(), self.retry_interval)
                if self._closing:
                    break
                self._dirty.clear()
                target = self._marked
                try:
                    await asyncio.to_thread(self._serialize_and_write, self._snapshot())
                except JournalError as exc:
                    self._record(target, exc)
                except Exception as exc:  # a bug, not the disk: still no change is durable
                    failure = JournalError(self.path, f"{type(exc).__name__}: {exc}")
                    failure.__cause__ = exc
                    self._record(target, failure)
                else:
                    self._record(target, None)
        finally:
            self._wake()

    def _record(self, target: int, failure: JournalError | None) -> None:
        """How the write that covered marks up to ``target`` ended; logs changes of condition
        only (the first failure, a new reason, the recovery), not every write."""
        self._attempted = max(self._attempted, target)
        if failure is None:
            self._durable = max(self._durable, target)
            if self._reason is not None:
                log.warning(
                    "journal: %s written again, after %d failed write(s)",
                    self.path,
                    self._failures,
                )
            self._reason, self._failures = None, 0
        else:
            if failure.reason != self._reason:
                cause = failure.__cause__
                bug = cause if cause is not None and not isinstance(cause, OSError) else None
                log.error(
                    "journal: %s; changes to workers are not on disk until a write succeeds"
                    " (retrying every %gs)",
                    failure,
                    self.retry_interval,
                    exc_info=bug,
                )
            self._reason = failure.reason
            self._failures += 1
        self._wake()

    def _wake(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    def _snapshot(self) -> list[_Item]:
        """What the next write holds, taken on the loop: the (immutable) records and specs as
        they are now, not yet serialized; :class:`_Encoder` does that off the loop."""
        with self.registry.locked() as entries:
            items = list(entries.values())
        return [
            (e.record, e.spec, e.token, self._start_time(e.record.id, e.record.pid)) for e in items
        ]

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

    def _serialize_and_write(self, items: list[_Item]) -> None:
        self._write(self._encoder.encode(items))

    def _write(self, data: bytes) -> None:
        """Make ``data`` the journal, the current one becoming ``journal.json.1``.

        Complete or not done at all: on failure no temporary file is left, ``journal.json`` is
        as it was, and :class:`JournalError` says which step failed and why.
        """
        directory = self.path.parent
        temporary = self._temporary
        step, moved = "", False
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, data)
                step = "fsync: "
                os.fsync(fd)
            finally:
                os.close(fd)
            step = f"keeping the previous journal as {self.previous.name}: "
            moved = self._keep_previous()
            step = "rename: "
            os.replace(temporary, self.path)
            moved = False
            step = "fsync of the directory: "
            _fsync_directory(directory)
        except OSError as exc:
            for leftover in (temporary, self._previous_temporary):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            if moved:  # no hard links, and journal.json went to .1: put it back
                with contextlib.suppress(OSError):
                    os.replace(self.previous, self.path)
            raise JournalError(self.path, f"{step}{exc.strerror or exc}") from exc

    def _keep_previous(self) -> bool:
        """The current journal becomes ``journal.json.1``; both stay complete journals.

        A hard link renamed over ``.1``, so ``journal.json`` never goes missing. Where the
        filesystem has no hard links, ``journal.json`` is renamed to ``.1`` (True: it moved).
        """
        link = self._previous_temporary
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        try:
            os.link(self.path, link)
        except FileNotFoundError:
            return False  # no journal yet: nothing to keep
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            try:
                os.replace(self.path, self.previous)
            except FileNotFoundError:
                return False
            return True
        os.replace(link, self.previous)
        return False


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is on its way: one call may write only part of them."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "a write made no progress")
        view = view[written:]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

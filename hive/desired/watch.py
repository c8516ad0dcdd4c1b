"""One node's desired set in etcd: read whole, then watched; any end of the watch reads it again.

A watch can end in many ways: etcd goes away, the connection drops, etcd cancels it, a message is
too large to take, a revision was compacted. Whatever the way, the set is read again whole and a
new watch starts from the revision read, after a pause that doubles up to 10 s while it keeps
failing; every end is logged and counted (``restarts``) and :attr:`DesiredWatch.state` says
what is true meanwhile. A watch can also stall without ending (a connection that a network
silently dropped): every :data:`RESYNC` seconds the set is read and compared with what the
watch has, and a difference starts it over. A key that is not text (not UTF-8) is skipped and
logged once, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Literal

from hive.desired.etcd import Etcd, EtcdError, readable, shown

log = logging.getLogger("hive.fleet")

#: Seconds between reads of the whole set that check the watch has missed nothing.
RESYNC = 30.0
#: The longest pause between two attempts while the watch keeps failing.
MAX_PAUSE = 10.0

WatchState = Literal["off", "reading", "watching", "retrying"]


class DesiredWatch:
    """The desired set under ``prefix``: ``desired`` (worker id -> spec bytes), kept current
    while started; ``on_change()`` is called after each change of it."""

    def __init__(
        self, etcd: Etcd, prefix: str, on_change: Callable[[], None], resync: float = RESYNC
    ) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.on_change = on_change
        self.resync = resync
        self.desired: dict[str, bytes] = {}
        self.revision: int | None = None
        #: ``off`` (not started), ``reading`` the whole set, ``watching``, or ``retrying``
        #: after the watch ended (``error`` says why).
        self.state: WatchState = "off"
        self.error: str | None = None
        #: Times a watch ended and the set was read again.
        self.restarts = 0
        self._skipped: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._follow: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="hive-fleet-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.state, self.error = "off", None

    def restart(self, why: str) -> None:
        """End the current watch (if one runs): the set is read again and watched anew."""
        if self._follow is not None and not self._follow.done():
            log.info("fleet: reading the desired set again: %s", why)
            self._follow.cancel()

    # -- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        pause = 1.0
        while True:
            wait = 0.0
            try:
                self.state = "reading"
                await self._read()
                self.state, self.error = "watching", None
                pause = 1.0
                self._follow = asyncio.create_task(self._watch(), name="hive-fleet-follow")
                await self._follow  # returns when the watch is behind: read again at once
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # stop(): this loop ends
                # restart(): read again at once
            except Exception as exc:  # EtcdError, or anything else: never the end of it
                why = str(exc) if isinstance(exc, EtcdError) else f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, EtcdError):
                    log.exception("fleet: the watch of %s failed", self.prefix)
                log.warning(
                    "fleet: the watch of %s ended (%s); reading the set again in %g s",
                    self.prefix,
                    why,
                    pause,
                )
                self.state, self.error = "retrying", why
                wait, pause = pause, min(pause * 2, MAX_PAUSE)
            finally:
                self._follow = None
            self.restarts += 1
            self.revision = None
            await asyncio.sleep(wait)

    async def _read(self) -> None:
        revision, kvs = await self.etcd.range(self.prefix)
        desired = self._readable(kvs)
        # The first read is a change even when the set is empty: what the last hive ran under
        # it (adopted from the journal) must be pruned if etcd no longer names it.
        changed = desired != self.desired or self.revision is None
        self.desired, self.revision = desired, revision
        if changed:
            self.on_change()

    def _readable(self, kvs: dict[str, bytes]) -> dict[str, bytes]:
        found = {}
        for key, value in kvs.items():
            if readable(key):
                found[key.removeprefix(self.prefix)] = value
            else:
                self._skip(key)
        return found

    def _skip(self, key: str) -> None:
        if key not in self._skipped:
            self._skipped.add(key)
            log.error("fleet: desired key %s is not UTF-8 text: skipped", shown(key))

    async def _watch(self) -> None:
        """Follow the changes; every ``resync`` seconds check the watch missed none. Returns
        when it did (the set is then read again); raises when the watch ends."""
        assert self.revision is not None
        stream = asyncio.create_task(self._stream(self.revision + 1))
        try:
            while True:
                done, _ = await asyncio.wait({stream}, timeout=self.resync)
                if stream in done:
                    stream.result()
                    return
                revision, kvs = await self.etcd.range(self.prefix)
                if self._readable(kvs) != self.desired and (self.revision or 0) < revision:
                    log.warning(
                        "fleet: the watch of %s is behind etcd (revision %s < %d); "
                        "reading the set again",
                        self.prefix,
                        self.revision,
                        revision,
                    )
                    return
        finally:
            stream.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await stream

    async def _stream(self, start: int) -> None:
        async for events in self.etcd.watch(self.prefix, start):
            for event in events:
                if not readable(event.key):
                    self._skip(event.key)
                elif event.kind == "delete":
                    self.desired.pop(event.key.removeprefix(self.prefix), None)
                else:
                    self.desired[event.key.removeprefix(self.prefix)] = event.value
                self.revision = max(self.revision or 0, event.revision)
            self.on_change()

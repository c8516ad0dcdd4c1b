"""hive's file descriptors: its limit raised at start, and running out of them told once.

Every worker costs hive a few descriptors for its whole life (a pidfd, the kept-alive probe
connection, its heartbeat connection), and every API client one more. Under a low
``RLIMIT_NOFILE`` they run out: then each ``accept()``, ``open()`` or ``pidfd_open()`` fails
with ``EMFILE`` (``ENFILE`` when the whole host is out). hive must slow down, not spin, and
say so once: :class:`Shortage` logs the first failure of a burst and, once something succeeds
again, how many failed in between.

hive keeps the last :data:`RESERVE` descriptors for its own work, so that running out never
stops it writing its journal and logs or stopping workers: Linux hands out the lowest free
number, so a descriptor numbered within the reserve means every one below it is open, and
whatever would hold it for long (a new connection, an idle probe connection, a new worker's
pidfd) gives it back at once (:func:`in_reserve`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import time

log = logging.getLogger("hive")

#: Errors that say the process (or the host) has no descriptor, or no memory, to give.
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})
#: What asyncio's accept loop treats as running out of a resource.
OUT_OF_RESOURCES = OUT_OF_DESCRIPTORS | {errno.ENOBUFS, errno.ENOMEM}
#: Seconds after a logged shortage during which a new one is counted, not logged.
QUIET = 60.0
#: Descriptors hive keeps for its own work (journal and log writes, reading ``/proc``, stopping
#: workers): new connections, idle probe connections and new workers stop short of them
#: (a quarter of the limit where that is less).
RESERVE = 16


def raise_limit() -> str:
    """Raise hive's soft ``RLIMIT_NOFILE`` to its hard limit (what a systemd service is
    expected to do for itself: its default soft limit is 1024); a sentence for the log."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError) as exc:
        return f"open files: cannot read RLIMIT_NOFILE ({exc})"
    if soft >= hard:
        return f"open files: at most {soft} (RLIMIT_NOFILE)"
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        return f"open files: at most {soft}; cannot raise RLIMIT_NOFILE to {hard} ({exc})"
    return f"open files: at most {hard} (RLIMIT_NOFILE raised from {soft})"


def limit() -> int:
    """hive's soft ``RLIMIT_NOFILE`` now."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def reserve() -> int:
    """How many descriptors hive keeps for its own work under its limit now."""
    return min(RESERVE, limit() // 4)


def in_reserve(fd: int, share: float = 1.0) -> bool:
    """Whether descriptor ``fd`` is among the last ``share`` of hive's :func:`reserve`. Linux
    hands out the lowest free number, so every descriptor below ``fd`` is open: what takes one
    there for long (a connection, a worker) must give it back. ``share`` below 1 lets the
    caller (the operator's unix socket) go further into the reserve than others."""
    ceiling = limit()
    return fd >= ceiling - min(RESERVE, ceiling // 4) * share


def kept_back() -> OSError:
    """The error for a descriptor refused because it is one of the reserve's."""
    return OSError(errno.EMFILE, f"the last {reserve()} are kept for hive itself")


def said_plainly(exc: OSError) -> OSError:
    """``exc``, said plainly when hive has no file descriptor left (``EMFILE``, ``ENFILE``)."""
    if exc.errno not in OUT_OF_DESCRIPTORS:
        return exc
    return OSError(
        exc.errno, f"hive is out of file descriptors ({exc.strerror}; RLIMIT_NOFILE {limit()})"
    )


async def wait_gone(pid: int, every: float = 0.05) -> None:
    """Return once ``pid`` is gone: how a process is watched when hive had no descriptor left
    for its pidfd (``kill(pid, 0)`` needs none)."""
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass
        await asyncio.sleep(every)


class Shortage:
    """Bursts of failures for want of descriptors: the first of a burst is logged, the rest
    counted, and its end logged with the count once something succeeds again. Bursts that
    follow within :data:`QUIET` seconds of a logged one are only counted (descriptors freed
    and spent again, back and forth, make many short bursts): the next logged end says them."""

    def __init__(self) -> None:
        self._since: float | None = None
        self._logged_at: float | None = None
        self._failures = 0

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def failed(self, what: str, exc: OSError) -> None:
        """``what`` (``accepting connections on ...``) failed with ``exc``."""
        self._failures += 1
        if self._since is not None:
            return
        now = self._since = time.monotonic()
        if self._logged_at is not None and now - self._logged_at < QUIET:
            return
        self._logged_at = now
        log.warning(
            "out of file descriptors (%s; RLIMIT_NOFILE %d): %s paused, retried every second, "
            "until some are freed (said once a minute at most)",
            exc.strerror or errno.errorcode.get(exc.errno or 0, exc),
            limit(),
            what,
        )

    def recovered(self) -> None:
        """Something that needed a descriptor got one: a burst, if one was under way, ended."""
        if self._since is None:
            return
        now = time.monotonic()
        if self._logged_at is not None and self._logged_at >= self._since:
            log.warning(
                "file descriptors again after %.1f s (%d refused meanwhile)",
                now - self._since,
                self._failures,
            )
            self._failures = 0
        self._since = None

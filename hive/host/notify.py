"""Tell systemd how hive is doing: a small ``sd_notify(3)`` client on the standard library.

When hive runs as a ``Type=notify`` systemd service (``systemd/hive.service``), systemd puts the
path of a datagram socket in ``$NOTIFY_SOCKET`` and waits for hive to write ``READY=1`` to it
before it calls the service started. The same socket carries a free-text ``STATUS=`` line (shown
by ``systemctl status hive``), ``STOPPING=1`` when shutdown begins, ``EXTEND_TIMEOUT_USEC=`` to ask
for more time while workers are being stopped, and ``WATCHDOG=1`` pings: with ``WatchdogSec=`` in
the unit, systemd sets ``$WATCHDOG_USEC`` and kills and restarts a hive that stops pinging.

Rules a maintainer should know:

- Outside systemd (tests, ``make run``, a terminal) there is no ``$NOTIFY_SOCKET``; every method
  is then a no-op, so callers never check :attr:`Notifier.enabled` first.
- Nothing here raises. A failed send is logged once, at debug level: telling systemd is a
  courtesy, never a reason for hive to fail.
- ``$NOTIFY_SOCKET`` is a filesystem path (``/run/systemd/notify``) or, starting with ``@``, an
  abstract socket name. Other forms (``vsock:``) are not supported and disable the notifier.
- The watchdog applies only when ``$WATCHDOG_PID`` is unset or names this process: a variable
  inherited from a parent is not ours to answer.
- :meth:`Notifier.watchdog_loop` pings from the asyncio event loop, on purpose: if a blocking
  call stalls the loop, the pings stop and systemd restarts hive, which adopts its workers.
- Workers never see these variables: the supervisor scrubs them from a worker's environment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("hive.notify")

#: How long one send may block when systemd's socket queue is full.
SEND_TIMEOUT = 1.0


def _address(value: str) -> str | bytes | None:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value, or None when unusable."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])  # the abstract namespace: a leading NUL byte
    return None


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """``$WATCHDOG_USEC`` when it is meant for this process, else None."""
    pid = environ.get("WATCHDOG_PID", "").strip()
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", "").strip())
    except ValueError:
        return None
    return usec if usec > 0 else None


class Notifier:
    """The service manager's notification socket, or a no-op when there is none.

    Built from ``environ`` (default :data:`os.environ`): ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and
    ``WATCHDOG_PID``.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.socket_name: str | None = raw or None
        self._address = _address(raw) if raw else None
        if raw and self._address is None:
            log.debug("NOTIFY_SOCKET=%r is not a unix socket; not notifying", raw)
        self._watchdog_usec = _watchdog_usec(env) if self._address is not None else None
        self._sock: socket.socket | None = None
        self._failed = False  # an error was logged already
        self._closed = False

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify (hive runs under systemd as ``Type=notify``)."""
        return self._address is not None and not self._closed

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None."""
        if self._watchdog_usec is None or not self.enabled:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    # -- sending -------------------------------------------------------------------------------

    def send_raw(self, text: str) -> bool:
        """Send ``text`` as one datagram; True if it was sent. Never raises."""
        if not self.enabled or self._address is None:
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.settimeout(SEND_TIMEOUT)
                self._sock = sock
            self._sock.sendto(text.encode(), self._address)
        except (OSError, ValueError) as exc:
            if not self._failed:
                self._failed = True
                log.debug(
                    "cannot notify %s (further failures are not logged): %s", self.socket_name, exc
                )
            return False
        return True

    def send(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines, one per keyword, in one datagram: ``send(READY=1)``."""
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\n", " ")  # a newline would start another field
            lines.append(f"{key}={text}")
        return self.send_raw("\n".join(lines))

    # -- the messages hive sends ---------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """Start-up is complete: ``READY=1``, with a ``STATUS=`` line when given."""
        if status is None:
            return self.send(READY=1)
        return self.send(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """A one-line status for ``systemctl status hive``."""
        return self.send(STATUS=text)

    def reloading(self) -> bool:
        """A configuration reload began (``RELOADING=1``); send :meth:`ready` when done."""
        return self.send(
            RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        )

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown began: ``STOPPING=1`` (with ``STATUS=`` when given)."""
        if status is None:
            return self.send(STOPPING=1)
        return self.send(STOPPING=1, STATUS=status)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd's start/stop timeout fires, counted from now."""
        return self.send(EXTEND_TIMEOUT_USEC=max(0, round(seconds * 1_000_000)))

    def watchdog(self) -> bool:
        """One watchdog ping: ``WATCHDOG=1``."""
        return self.send(WATCHDOG=1)

    # -- loops to run as tasks -----------------------------------------------------------------

    async def watchdog_loop(self) -> None:
        """Ping the watchdog every :attr:`watchdog_interval` until cancelled; returns at once
        when systemd set no watchdog for this process."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while self.enabled:
            self.watchdog()
            await asyncio.sleep(interval)

    async def extend_timeout_loop(self, seconds: float) -> None:
        """Keep asking for ``seconds`` more (every ``seconds / 2``) until cancelled: run it while
        a long shutdown step makes progress, so systemd waits exactly as long as hive works."""
        if not self.enabled:
            return
        while self.enabled:
            self.extend_timeout(seconds)
            await asyncio.sleep(seconds / 2)

    def close(self) -> None:
        """Close the socket; later sends are no-ops."""
        self._closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None

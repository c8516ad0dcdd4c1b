"""The connection guard: slow, silent and too many clients cannot take the API from others.

aiohttp bounds a request's size but not how long a client may take to send its headers, nor how
many connections may be open. The guard wraps each listener's protocol factory:

- a connection must have a request under way within ``header_timeout`` seconds of opening, and
  again within ``header_timeout`` of its last answer: one that sends nothing, or dribbles its
  headers byte by byte, is dropped (a request being served, such as an event stream, is never
  cut by the guard);
- at most ``max_connections`` are open over TCP, and as many over the unix socket, each
  counted on its own so that the local operator always gets in. When a listener is full, a new
  connection takes the place of the oldest idle one that has not yet carried an authenticated
  request (:meth:`ConnectionGuard.trust`): a thousand idle strangers cannot keep an
  orchestrator out. Only when every connection is busy or authenticated is the new one
  dropped at once.

The guard also remembers which connections have carried the API token (:meth:`prove`): on
those the token is not held back by the throttle of failed attempts (:mod:`hive.api.throttle`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

log = logging.getLogger("hive.api")


class ConnectionGuard:
    """hive's API connections, and their deadlines."""

    def __init__(self, header_timeout: float, max_connections: int) -> None:
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self._open: dict[asyncio.BaseTransport, _Guarded] = {}
        self._count = {"TCP": 0, "unix socket": 0}
        self._refused = {"TCP": 0, "unix socket": 0}
        self._shed = {"TCP": 0, "unix socket": 0}
        # Connections that have not authenticated, oldest first: the first to make room.
        self._strangers: dict[str, OrderedDict[asyncio.BaseTransport, _Guarded]] = {
            "TCP": OrderedDict(),
            "unix socket": OrderedDict(),
        }

    def open(self, kind: str) -> int:
        """Connections open now over ``TCP`` or the ``unix socket``."""
        return self._count[kind]

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> GuardedFactory:
        return GuardedFactory(factory, self)

    def begin(self, transport: asyncio.BaseTransport | None) -> None:
        """A request on this connection reached hive: no deadline while it is served."""
        guarded = self._open.get(transport) if transport is not None else None
        if guarded is not None:
            guarded.busy += 1
            guarded.disarm()

    def end(self, transport: asyncio.BaseTransport | None) -> None:
        """The request was answered: the next must come within ``header_timeout``."""
        guarded = self._open.get(transport) if transport is not None else None
        if guarded is not None:
            guarded.busy -= 1
            if guarded.busy == 0:
                guarded.arm()

    def trust(self, transport: asyncio.BaseTransport | None) -> None:
        """This connection carried an authenticated request: it is never shed for room."""
        for strangers in self._strangers.values():
            if strangers.pop(transport, None) is not None:  # type: ignore[arg-type]
                return

    def prove(self, transport: asyncio.BaseTransport | None, proven: bool = True) -> None:
        """This connection carried the API token (``proven``), or then a wrong credential."""
        guarded = self._open.get(transport) if transport is not None else None
        if guarded is not None:
            guarded.proven = proven

    def proven(self, transport: asyncio.BaseTransport | None) -> bool:
        """Whether this connection carried the API token, and no wrong credential since."""
        guarded = self._open.get(transport) if transport is not None else None
        return guarded is not None and guarded.proven

    def admit(self, guarded: _Guarded, transport: asyncio.BaseTransport) -> bool:
        """Count a new connection in, making room if its listener is full; or refuse it."""
        kind = _kind(transport)
        if self._count[kind] >= self.max_connections:
            self._make_room(kind)
        if self._count[kind] >= self.max_connections:
            self._refused[kind] += 1
            if self._refused[kind] == 1:  # one line per condition, not one per connection
                log.warning(
                    "%s: %d connections open (http_max_connections): dropping new ones",
                    kind,
                    self._count[kind],
                )
            return False
        if self._refused[kind]:
            log.info("%s: accepting connections again (%d dropped)", kind, self._refused[kind])
            self._refused[kind] = 0
        if self._shed[kind] and self._count[kind] < self.max_connections - 1:
            log.info("%s: room again (%d idle connections closed for it)", kind, self._shed[kind])
            self._shed[kind] = 0
        self._open[transport] = guarded
        self._strangers[kind][transport] = guarded
        self._count[kind] += 1
        return True

    def _make_room(self, kind: str) -> None:
        """Close the oldest idle connection that has not authenticated, if there is one."""
        found = next(((t, g) for t, g in self._strangers[kind].items() if g.busy == 0), None)
        if found is None:
            return
        transport, guarded = found
        self._shed[kind] += 1
        if self._shed[kind] == 1:  # one line per condition, not one per connection
            log.warning(
                "%s: %d connections open (http_max_connections): closing the oldest idle ones "
                "that have not authenticated to make room",
                kind,
                self._count[kind],
            )
        self.forget(transport)
        guarded.close_timer()
        transport.abort()

    def forget(self, transport: asyncio.BaseTransport) -> None:
        if self._open.pop(transport, None) is not None:
            kind = _kind(transport)
            self._count[kind] -= 1
            self._strangers[kind].pop(transport, None)


def _kind(transport: asyncio.BaseTransport) -> str:
    sock = transport.get_extra_info("socket")
    return "unix socket" if sock is not None and sock.family == socket.AF_UNIX else "TCP"


class GuardedFactory:
    """A protocol factory (aiohttp's ``web.Server``) whose protocols the guard watches.

    Everything but the call goes to the wrapped server, which the runner still manages.
    """

    def __init__(self, factory: Callable[[], asyncio.Protocol], guard: ConnectionGuard) -> None:
        self._factory = factory
        self._guard = guard

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self._factory, self._guard)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._factory, name)


class _Guarded(asyncio.Protocol):
    """One connection: aiohttp's protocol inside, with a deadline around it."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], guard: ConnectionGuard) -> None:
        self._factory = factory
        self._guard = guard
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self.busy = 0
        self.proven = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        if not self._guard.admit(self, transport):
            transport.abort()
            return
        self._inner = self._factory()
        self._inner.connection_made(transport)
        self.arm()

    def arm(self) -> None:
        """The next request must come within ``header_timeout``. Arming moves the deadline;
        the one timer, when it fires before the deadline, sleeps on to it: a kept-alive
        connection answering thousands of requests a second costs no timer per request."""
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self._guard.header_timeout
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._expire)

    def disarm(self) -> None:
        self._deadline = None  # the timer, if one is pending, finds nothing due

    def close_timer(self) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._deadline is None or self.busy or self._transport is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._expire)
            return
        self._transport.abort()  # silent, or its headers never came: nothing to answer

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.close_timer()
        if self._transport is not None:
            self._guard.forget(self._transport)
        if self._inner is not None:
            self._inner.connection_lost(exc)

"""hive's listening sockets (TCP and the unix socket), made to run out of descriptors calmly.

When ``accept()`` fails with ``EMFILE`` (or ``ENFILE``, ``ENOBUFS``, ``ENOMEM``), asyncio's
accept loop reports it through the loop's exception handler, with a traceback, stops watching
the listener and retries it a second later. But it goes on trying within the same pass, up to
the backlog (128 times), reporting and scheduling a retry each time, and every retry does the
same: with its descriptors spent, hive logged about 77,000 tracebacks in 25 s.

Here each listener's ``accept()`` lets asyncio see the first failure of a pass (asyncio then
pauses that listener for its one-second retry) and says "nothing to accept" for the rest of
the pass, so a listener costs one failed ``accept()`` a second while descriptors are short; the
connections wait in the kernel's backlog meanwhile. asyncio's report of each failure is
dropped (:func:`quiet_accept_errors`): :class:`hive.host.descriptors.Shortage` logs the burst
once, and its end.

Before it comes to that, a connection that would hold one of the last descriptors hive keeps
for its own work (:data:`hive.host.descriptors.RESERVE`: journal and log writes, stopping
workers) is closed at once and the listener paused the same way; the unix socket, the
operator's way in, may use half of that reserve.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from hive.config import Config
from hive.host.descriptors import OUT_OF_RESOURCES, Shortage, in_reserve, kept_back
from hive.startup import HandshakeFailures, StartupError, claim_socket, server_tls

#: asyncio's message for a failed accept for want of a resource (selector_events).
ASYNCIO_ACCEPT_ERROR = "socket.accept() out of system resource"
#: Connections the kernel queues for a listener while hive does not accept (aiohttp's backlog).
BACKLOG = 128


class Listener(socket.socket):
    """A listening socket whose ``accept()`` fails once per pass when descriptors run out."""

    def __init__(
        self, sock: socket.socket, what: str, shortage: Shortage, share: float = 1.0
    ) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.what = what
        self._shortage = shortage
        self._share = share  # of hive's reserve of descriptors this listener may not take
        self._paused = False

    def accept(self) -> tuple[socket.socket, Any]:
        if self._paused:  # the rest of asyncio's pass: it has already paused this listener
            raise BlockingIOError("out of file descriptors: accepting again in a second")
        try:
            accepted = super().accept()
            if in_reserve(accepted[0].fileno(), self._share):
                accepted[0].close()  # dropped: it would hold one of hive's last descriptors
                raise kept_back()
        except OSError as exc:
            if exc.errno in OUT_OF_RESOURCES:
                self._paused = True
                asyncio.get_running_loop().call_soon(self._unpause)
                self._shortage.failed(f"accepting connections on {self.what}", exc)
            raise
        if self._shortage.ongoing:
            self._shortage.recovered()
        return accepted

    def _unpause(self) -> None:
        self._paused = False


def tcp(host: str, port: int, shortage: Shortage) -> list[Listener]:
    """Sockets bound to ``host:port`` (each address it resolves to), as asyncio's
    ``create_server(reuse_address=True)`` makes them; OSError when one cannot be bound. They
    listen once served (asyncio's server calls ``listen``): until then a connection is refused."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    made: list[Listener] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            made.append(Listener(sock, f"{host}:{port}", shortage))
            made[-1].setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                made[-1].setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            made[-1].bind(address)
            made[-1].setblocking(False)
    except OSError:
        for sock in made:
            sock.close()
        raise
    return made


def unix(path: Path, shortage: Shortage) -> Listener:
    """A listening unix socket at ``path``, born mode 0600 (never briefly wider)."""
    # The operator's way in: it may take half of hive's reserve of descriptors.
    sock = Listener(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), str(path), shortage, 0.5)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Drop asyncio's report of an ``accept()`` that ran out of a resource (a
    :class:`Listener` logs the burst once); every other report goes on as before."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == ASYNCIO_ACCEPT_ERROR:
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


class Ports:
    """hive's API listeners from start to end: :meth:`claim` checks and takes what can fail
    (the TLS files, the TCP port, the unix socket's path) before hive makes anything else (its
    cgroup), :meth:`serve` serves them, :meth:`close` closes what was not served (a runner's
    cleanup closes what was) and removes the socket file it made."""

    def __init__(self, config: Config, count_handshake_failure: Callable[[str], None]) -> None:
        self.config = config
        self.shortage = Shortage()
        self._count = count_handshake_failure
        self._tls: ssl.SSLContext | None = None
        self._tcp: list[Listener] = []
        self._socket_made = False

    def claim(self) -> None:
        """The TLS files loaded, the TCP port bound, the socket's path free of another hive;
        a StartupError that says which when one cannot be."""
        config = self.config
        self._tls = server_tls(config, HandshakeFailures(self._count))
        try:
            self._tcp = tcp(config.listen_host, config.listen_port, self.shortage)
        except OSError as exc:
            raise StartupError(f"cannot listen on {config.listen}: {exc.strerror}") from None
        try:
            claim_socket(config.socket_path)
        except OSError as exc:
            self.close()
            path = config.socket_path
            raise StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        except StartupError:
            self.close()
            raise

    async def serve(self, runner: web.AppRunner) -> None:
        """Serve ``runner`` on the TCP port (with TLS where configured) and the unix socket."""
        config, path = self.config, self.config.socket_path
        try:
            for sock in self._tcp:
                await web.SockSite(runner, sock, ssl_context=self._tls).start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {config.listen}: {exc.strerror}") from None
        try:
            unix_socket = unix(path, self.shortage)
            self._socket_made = True
            await web.SockSite(runner, unix_socket).start()
            path.chmod(0o600)
        except OSError as exc:
            raise StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        for sock in self._tcp:
            sock.close()
        self._tcp = []
        if self._socket_made:
            self.config.socket_path.unlink(missing_ok=True)
            self._socket_made = False

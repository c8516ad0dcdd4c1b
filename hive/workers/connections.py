"""Kept-alive HTTP/1.1 connections to workers, for hive's probes and load reads.

hive asks each worker one small ``GET`` every period (its health path, or its engine's load
endpoint). A full HTTP client costs about 150 µs of CPU a request even on a kept-alive
connection; with hundreds of workers that is most of what an idle hive does. This is the least
that does the job: one connection per worker, kept open between periods, an ``asyncio.Protocol``
that sends one request line and reads one answer (``Content-Length``, chunked, or up to the
close), and nothing else: no redirects, no cookies, no TLS, no proxies. An engine that closes an
idle connection (uvicorn and cpp-httplib do after 5 s) costs a reconnect at the next request;
a request that meets a connection the engine closed just then is sent once more on a new one.
"""

from __future__ import annotations

import asyncio
import contextlib

from hive.host.descriptors import in_reserve

#: Most answers hive reads are a few hundred bytes; a Prometheus page may be some hundred KB.
_MAX_BODY = 8 << 20


class HttpError(Exception):
    """The worker's answer was not HTTP hive can read, or the connection broke."""


class _Answer:
    __slots__ = ("body", "keep_alive", "status")

    def __init__(self, status: int, body: bytes, keep_alive: bool) -> None:
        self.status = status
        self.body = body
        self.keep_alive = keep_alive


class _Connection(asyncio.Protocol):
    """One connection to one worker: one request at a time."""

    def __init__(self, pool: Connections, port: int) -> None:
        self._pool = pool
        self._port = port
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[_Answer] | None = None
        self.closed = False

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._settle(final=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool._forget(self._port, self)
        self._settle(final=True)

    def _settle(self, final: bool) -> None:
        """Hand the waiting request its answer once the buffer holds all of it (or, at the
        close, what it holds, or why it is not an answer)."""
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        try:
            answer = self._parse(final)
        except HttpError as exc:
            waiter.set_exception(exc)
            return
        if answer is not None:
            waiter.set_result(answer)
        elif final:
            waiter.set_exception(HttpError("the worker closed the connection"))

    # -- one request --

    async def get(self, request: bytes) -> _Answer:
        assert self.transport is not None
        self._buffer.clear()
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        try:
            return await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _parse(self, final: bool) -> _Answer | None:
        """The answer in the buffer once it is all there; None while more is to come."""
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if final or len(buffer) > 65536:
                raise HttpError("the worker's answer has no complete HTTP header")
            return None
        head = bytes(buffer[:end]).decode("latin-1")
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise HttpError(f"not an HTTP answer: {lines[0][:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        keep_alive = parts[0] == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        start = end + 4
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = _dechunk(buffer, start)
            if body is None:
                if final:
                    raise HttpError("the worker's chunked answer ended early")
                return None
            return _Answer(status, body, keep_alive)
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > _MAX_BODY:
                raise HttpError(f"unusable Content-Length {length[:20]!r}")
            if len(buffer) - start < int(length):
                if final:
                    raise HttpError("the worker's answer ended early")
                return None
            return _Answer(status, bytes(buffer[start : start + int(length)]), keep_alive)
        if status in (204, 304) or 100 <= status < 200:
            return _Answer(status, b"", keep_alive)
        if not final:  # no length: the body runs to the close
            if len(buffer) - start > _MAX_BODY:
                raise HttpError("the worker's answer is too large")
            return None
        return _Answer(status, bytes(buffer[start:]), False)


def _dechunk(buffer: bytearray, start: int) -> bytes | None:
    """A chunked body from ``start``, or None when its last chunk has not come yet."""
    body = bytearray()
    at = start
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return None
        size_text = bytes(buffer[at:line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HttpError(f"bad chunk size {size_text[:20]!r}") from None
        if size == 0:
            return bytes(body) if buffer.find(b"\r\n\r\n", line_end) >= 0 else None
        chunk_start = line_end + 2
        if len(buffer) < chunk_start + size + 2:
            return None
        body += buffer[chunk_start : chunk_start + size]
        if len(body) > _MAX_BODY:
            raise HttpError("the worker's answer is too large")
        at = chunk_start + size + 2


class Connections:
    """At most one idle kept-alive connection per worker port, on 127.0.0.1."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host
        self._idle: dict[int, _Connection] = {}

    async def get(
        self, port: int, target: str, timeout: float, key: str | None = None
    ) -> tuple[int, bytes]:
        """``GET target`` on the worker at ``port``: the status and the body.

        Raises TimeoutError past ``timeout`` seconds, OSError when the worker cannot be reached,
        :class:`HttpError` when its answer cannot be read.
        """
        request = f"GET {target} HTTP/1.1\r\nHost: {self._host}:{port}\r\n"
        if key:
            request += f"Authorization: Bearer {key}\r\n"
        data = (request + "\r\n").encode("latin-1")
        async with asyncio.timeout(timeout):
            connection = self._idle.pop(port, None)
            if connection is not None and not connection.closed:
                try:
                    return self._done(port, connection, await connection.get(data))
                except HttpError:
                    connection.close()  # closed by the worker as it idled: once more, anew
                except BaseException:
                    connection.close()
                    raise
            connection = await self._open(port)
            try:
                return self._done(port, connection, await connection.get(data))
            except BaseException:
                connection.close()
                raise

    def _done(self, port: int, connection: _Connection, answer: _Answer) -> tuple[int, bytes]:
        if answer.keep_alive and not connection.closed and port not in self._idle:
            if _kept_back(connection):  # not kept idle on one of hive's last descriptors
                connection.close()
                return answer.status, answer.body
            self._idle[port] = connection
        else:
            connection.close()
        return answer.status, answer.body

    async def _open(self, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(
            lambda: _Connection(self, port), self._host, port
        )
        return protocol

    def _forget(self, port: int, connection: _Connection) -> None:
        if self._idle.get(port) is connection:
            del self._idle[port]

    def close(self) -> None:
        for connection in list(self._idle.values()):
            with contextlib.suppress(Exception):
                connection.close()
        self._idle.clear()


def _kept_back(connection: _Connection) -> bool:
    sock = connection.transport.get_extra_info("socket") if connection.transport else None
    return sock is not None and in_reserve(sock.fileno())

"""The HTTP edge against slow and odd clients: deep nesting, silent and dribbling connections,
and more connections than the cap. Each gets a clear answer or is dropped; the API stays usable
for everyone else."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest
from hivetest import Hive, running_hive

from harness.waits import wait_for

CONFIG = "http_header_timeout = 1\nhttp_max_connections = 4\n"


@pytest.fixture(scope="module")
def hive() -> Iterator[Hive]:
    with running_hive(CONFIG) as daemon:
        yield daemon


def closed(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True once the peer closed or reset the connection (whatever it sent before)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def connect(hive: Hive) -> socket.socket:
    return socket.create_connection(("127.0.0.1", hive.port), timeout=10)


async def test_a_deeply_nested_body_is_400(hive: Hive) -> None:
    body = b'{"model": "m", "labels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    async with hive.session() as s, s.post("/v1/workers", data=body) as r:
        assert r.status == 400
        error = (await r.json())["error"]
        assert error["code"] == "invalid" and "nested too deeply" in error["message"]


def test_a_silent_connection_is_dropped(hive: Hive) -> None:
    with connect(hive) as sock:
        started = time.monotonic()
        assert closed(sock)
        assert time.monotonic() - started < 5


def test_dribbled_headers_are_dropped(hive: Hive) -> None:
    with connect(hive) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        dropped = False
        for _ in range(20):  # one byte of a header every 0.2 s: it never ends
            try:
                sock.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                dropped = True
                break
            time.sleep(0.2)
        assert dropped or closed(sock, 1.0)
        assert time.monotonic() - started < 5


def test_a_kept_alive_connection_may_ask_again_then_idles_out(hive: Hive) -> None:
    with connect(hive) as sock:
        for _ in range(2):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            time.sleep(0.5)  # within the timeout: still open
        assert closed(sock)


def test_past_the_cap_an_idle_stranger_makes_room_and_the_unix_socket_still_answers(
    hive: Hive,
) -> None:
    hoarders = [connect(hive) for _ in range(4)]
    try:
        # The listener is full of idle connections that never authenticated: a new one takes
        # the place of the oldest, and is answered.
        with connect(hive) as extra:
            extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert extra.recv(4096).startswith(b"HTTP/1.1 200")
        assert closed(hoarders[0], 5.0)
        # The operator on the unix socket is not counted against TCP's cap.
        done = hive.cli("status")
        assert done.returncode == 0, done.stderr
    finally:
        for sock in hoarders:
            sock.close()
    assert "closing the oldest idle ones that have not authenticated" in hive.log()


def test_past_the_cap_with_every_connection_busy_a_new_one_is_dropped(hive: Hive) -> None:
    streams = []
    try:
        for _ in range(4):  # authenticated and being served: never closed to make room
            sock = connect(hive)
            sock.sendall(
                b"GET /v1/events HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: Bearer {hive.token}\r\n\r\n".encode()
            )
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            streams.append(sock)
        with connect(hive) as extra:
            extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert closed(extra, 5.0)
    finally:
        for sock in streams:
            sock.close()

    # Once the streams are gone, TCP answers again.
    def answers() -> bool:
        with connect(hive) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return sock.recv(4096).startswith(b"HTTP/1.1 200")

    wait_for(answers, timeout=10, what="TCP to answer again")
    assert "dropping new ones" in hive.log()


async def test_an_event_stream_outlives_the_header_timeout(hive: Hive) -> None:
    async with hive.session() as s, s.get("/v1/events") as r:
        assert r.status == 200
        first = await r.content.readline()
        assert first.startswith(b": hive events")
        await asyncio.sleep(1.5)  # past http_header_timeout, while the stream is served
        async with s.get("/health") as h:
            assert h.status == 200
        assert not r.content.at_eof()

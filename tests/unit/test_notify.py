"""hive.notify against real unix datagram sockets: a path in a temp dir, and an abstract one."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hive.host.notify import Notifier

WATCHDOG_USEC = 200_000  # pings every 0.1 s


class Receiver:
    """One bound AF_UNIX datagram socket playing systemd's notification socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value  # what NOTIFY_SOCKET says

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value, **extra}

    def recv(self, timeout: float = 5.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def nothing_pending(self) -> bool:
        self.sock.settimeout(0.05)
        try:
            self.sock.recv(4096)
        except TimeoutError:
            return True
        return False

    async def arecv(self, timeout: float = 5.0) -> tuple[float, str]:
        """The next datagram and when it arrived, without blocking the event loop."""
        self.sock.setblocking(False)
        data = await asyncio.wait_for(
            asyncio.get_running_loop().sock_recv(self.sock, 4096), timeout
        )
        return time.monotonic(), data.decode()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    # A short directory of our own: a socket path must fit in 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix="hive-notify-"))
    path = directory / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield Receiver(sock, str(path))
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"hive-notify-test-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    try:
        yield Receiver(sock, "@" + name)
    finally:
        sock.close()


def notifier(env: dict[str, str]) -> contextlib.closing[Notifier]:
    return contextlib.closing(Notifier(env))


# -- messages ------------------------------------------------------------------------------------


def test_each_message(receiver: Receiver) -> None:
    with notifier(receiver.env()) as n:
        assert n.enabled
        assert n.ready("2 ready, 0 starting")
        assert receiver.recv() == "READY=1\nSTATUS=2 ready, 0 starting"
        assert n.ready()
        assert receiver.recv() == "READY=1"
        assert n.status("3 workers")
        assert receiver.recv() == "STATUS=3 workers"
        assert n.stopping()
        assert receiver.recv() == "STOPPING=1"
        assert n.extend_timeout(2.5)
        assert receiver.recv() == "EXTEND_TIMEOUT_USEC=2500000"
        assert n.watchdog()
        assert receiver.recv() == "WATCHDOG=1"
        assert n.send(STATUS="x", ERRNO=5)
        assert receiver.recv() == "STATUS=x\nERRNO=5"
        assert n.send_raw("FDSTORE=0")
        assert receiver.recv() == "FDSTORE=0"
        assert n.reloading()
        assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", receiver.recv())


def test_a_newline_cannot_smuggle_a_field(receiver: Receiver) -> None:
    with notifier(receiver.env()) as n:
        n.status("one\nREADY=1")
        assert receiver.recv() == "STATUS=one READY=1"


def test_abstract_socket(abstract_receiver: Receiver) -> None:
    with notifier(abstract_receiver.env()) as n:
        assert n.enabled
        assert n.ready("up")
        assert abstract_receiver.recv() == "READY=1\nSTATUS=up"
        assert n.stopping()
        assert abstract_receiver.recv() == "STOPPING=1"


def test_close_makes_it_a_no_op(receiver: Receiver) -> None:
    n = Notifier(receiver.env())
    assert n.status("before")
    assert receiver.recv() == "STATUS=before"
    n.close()
    assert not n.enabled
    assert not n.status("after")
    assert receiver.nothing_pending()
    n.close()  # twice is fine


# -- disabled and failing ------------------------------------------------------------------------


def test_no_notify_socket_is_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    n = Notifier()  # from os.environ
    assert not n.enabled
    assert n.watchdog_interval is None
    assert not n.ready("x")
    assert not n.stopping()
    assert not n.extend_timeout(10)
    n.close()


async def test_disabled_loops_return_at_once() -> None:
    n = Notifier({})
    await asyncio.wait_for(n.watchdog_loop(), 1)
    await asyncio.wait_for(n.extend_timeout_loop(1), 1)


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch, receiver: Receiver) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.env_value)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    with contextlib.closing(Notifier()) as n:
        assert n.enabled
        assert n.watchdog_interval is None
        n.stopping()
        assert receiver.recv() == "STOPPING=1"


@pytest.mark.parametrize("value", ["vsock:2:1234", "relative/path", "@"])
def test_unsupported_socket_is_disabled(value: str) -> None:
    with notifier({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "200000"}) as n:
        assert not n.enabled
        assert n.watchdog_interval is None
        assert not n.ready()


def test_send_errors_never_raise_and_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    missing = Path(tempfile.gettempdir()) / f"hive-no-such-{secrets.token_hex(6)}.sock"
    caplog.set_level(logging.DEBUG, logger="hive.notify")
    with notifier({"NOTIFY_SOCKET": str(missing)}) as n:
        assert n.enabled
        assert not n.ready("x")
        assert not n.status("y")
        assert not n.stopping()
    failures = [r for r in caplog.records if r.name == "hive.notify"]
    assert len(failures) == 1
    assert failures[0].levelno == logging.DEBUG
    assert str(missing) in failures[0].getMessage()


# -- the watchdog --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "interval"),
    [
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "nope"}, None),
    ],
)
def test_watchdog_interval(receiver: Receiver, extra: dict[str, str], interval: float) -> None:
    with notifier(receiver.env(**extra)) as n:
        assert n.watchdog_interval == interval


async def test_watchdog_pings_every_half_period(receiver: Receiver) -> None:
    env = receiver.env(WATCHDOG_USEC=str(WATCHDOG_USEC), WATCHDOG_PID=str(os.getpid()))
    with notifier(env) as n:
        task = asyncio.create_task(n.watchdog_loop())
        try:
            pings = [await receiver.arecv() for _ in range(3)]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert [text for _, text in pings] == ["WATCHDOG=1"] * 3
    half = WATCHDOG_USEC / 2 / 1_000_000
    for (earlier, _), (later, _) in itertools.pairwise(pings):
        # Never much faster than the interval; slower only by scheduling noise (generous, for
        # loaded CI machines: the point is a period of ~0.1 s, not 0 and not seconds).
        assert half * 0.8 <= later - earlier < half * 10


async def test_watchdog_of_another_pid_is_not_ours(receiver: Receiver) -> None:
    env = receiver.env(WATCHDOG_USEC=str(WATCHDOG_USEC), WATCHDOG_PID=str(os.getpid() + 1))
    with notifier(env) as n:
        assert n.enabled  # the rest of the protocol still works
        await asyncio.wait_for(n.watchdog_loop(), 1)  # returns at once, sends nothing
        assert receiver.nothing_pending()


async def test_extend_timeout_loop_repeats(receiver: Receiver) -> None:
    with notifier(receiver.env()) as n:
        task = asyncio.create_task(n.extend_timeout_loop(0.2))
        try:
            messages = [await receiver.arecv() for _ in range(3)]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert [text for _, text in messages] == ["EXTEND_TIMEOUT_USEC=200000"] * 3
    # Sent every 0.1 s: three take at least 0.2 s, received at least 0.1 s apart even when the
    # first one was read late on a loaded machine (receive times, not send times, are known).
    assert messages[2][0] - messages[0][0] >= 0.1

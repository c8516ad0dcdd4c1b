"""hive under a service manager: sd_notify to a NOTIFY_SOCKET the test binds, and SIGHUP reloads."""

from __future__ import annotations

import itertools
import json
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hivetest import Hive, running_hive

from harness.waits import wait_for

pytestmark = pytest.mark.timeout(120)


class NotifySocket:
    """A unix datagram socket standing in for systemd's; remembers every message with its time."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hive-notify-"))
        self.path = self.dir / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def drain(self) -> list[tuple[float, dict[str, str]]]:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.messages
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append((time.monotonic(), fields))

    def has(self, key: str, value: str | None = None) -> list[dict[str, str]]:
        return [m for _, m in self.drain() if key in m and (value is None or m[key] == value)]

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)
        self.dir.rmdir()


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    try:
        yield sock
    finally:
        sock.close()


async def test_ready_status_watchdog_stopping(notify: NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    with running_hive("", env) as hive:
        (ready,) = wait_for(lambda: notify.has("READY", "1"), what="READY=1")
        assert ready["STATUS"].startswith("workers: 0 starting")
        # Pings every half of WATCHDOG_USEC, from the event loop.
        wait_for(lambda: len(notify.has("WATCHDOG", "1")) >= 3, what="3 watchdog pings")
        pings = [t for t, m in notify.drain() if m.get("WATCHDOG") == "1"]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert all(0.1 < gap < 1.0 for gap in gaps), gaps
        # The worker counts follow the workers.
        async with (
            hive.session() as s,
            s.post("/v1/workers", params={"wait": "ready"}, json={"model": "m", "id": "n1"}) as r,
        ):
            assert r.status == 200
        wait_for(
            lambda: any("1 ready" in m.get("STATUS", "") for m in notify.has("STATUS")),
            what="STATUS with 1 ready",
        )
        hive.signal(signal.SIGTERM)
        assert hive.proc is not None and hive.proc.wait(30) == 0
        hive.proc = None
        stopping = notify.has("STOPPING", "1")
        assert stopping and "stopping" in stopping[0]["STATUS"]
        assert notify.has("EXTEND_TIMEOUT_USEC")


def _reloaded(hive: Hive, text: str) -> bool:
    return text in hive.log()


async def test_sighup_applies_a_good_config_and_refuses_a_broken_one() -> None:
    with running_hive("drain_timeout = 5\n") as hive:
        async with hive.session() as s:
            async with s.post(
                "/v1/workers", params={"wait": "ready"}, json={"model": "m", "id": "keeps"}
            ) as r:
                kept = await r.json()
            original = hive.config_path.read_text()

            # A good file: a new backend and a new limit, live; the listen address needs a restart.
            hive.config_path.write_text(
                original.replace("drain_timeout = 5", "drain_timeout = 7").replace(
                    f'listen = "127.0.0.1:{hive.port}"', 'listen = "127.0.0.1:1"'
                )
                + '\n[backends.extra]\ncommand = ["{python}", "-m", "hive.demo_worker", '
                '"--port", "{port}", "--model", "{model}"]\n'
            )
            hive.signal(signal.SIGHUP)
            wait_for(lambda: _reloaded(hive, "reloaded the configuration"), what="reload")
            log = hive.log()
            assert "backends" in log and "drain_timeout" in log
            assert "listen take effect at the next start" in log
            async with s.post(
                "/v1/workers", params={"wait": "ready"},
                json={"model": "m", "id": "new-backend", "backend": "extra"},
            ) as r:  # fmt: skip
                assert r.status == 200, await r.text()
            async with s.get("/v1/workers/keeps") as r:
                assert (await r.json())["pid"] == kept["pid"]  # running workers untouched

            # A broken file: refused whole, the running configuration stays.
            hive.config_path.write_text(
                original.replace("drain_timeout = 5", 'drain_timeout = "soon"')
            )
            hive.signal(signal.SIGHUP)
            wait_for(lambda: _reloaded(hive, "reload refused"), what="refusal")
            assert "drain_timeout" in hive.log().split("reload refused", 1)[1]
            async with s.post(
                "/v1/workers", params={"wait": "ready"},
                json={"model": "m", "id": "still-extra", "backend": "extra"},
            ) as r:  # fmt: skip
                assert r.status == 200, await r.text()
            async with s.get("/health") as r:
                assert r.status == 200


async def test_json_logs_name_every_state_change() -> None:
    hive = Hive()
    try:
        hive.start("--log-format", "json")
        async with (
            hive.session() as s,
            s.post(
                "/v1/workers", params={"wait": "ready"}, json={"model": "m", "id": "logged"}
            ) as r,
        ):
            assert r.status == 200
        assert hive.stop() == 0
        lines = [json.loads(line) for line in hive.log().splitlines() if line.startswith("{")]
        assert lines and all({"time", "level", "logger", "message"} <= set(x) for x in lines)
        messages = [x["message"] for x in lines]
        assert "worker logged: new -> starting" in messages
        assert "worker logged: starting -> ready" in messages
        assert "worker logged: ready -> stopped" in messages
    finally:
        hive.cleanup()

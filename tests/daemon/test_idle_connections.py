"""1,100 idle connections that never authenticate cannot lock an orchestrator out of TCP
(issue 28, point 4): past ``http_max_connections`` hive closes the oldest idle stranger to make
room, and never a connection that has carried an authenticated request."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import requests
from hivetest import Hive, running_hive

from harness.waits import wait_for

pytestmark = pytest.mark.timeout(120)

IDLE = 1100


@pytest.fixture(scope="module")
def hive() -> Iterator[Hive]:
    # A long header deadline: the idle connections stay for the whole test unless shed.
    with running_hive("http_header_timeout = 60\n") as daemon:
        yield daemon


def test_idle_strangers_make_room_for_an_authenticated_client(hive: Hive) -> None:
    known = requests.Session()  # authenticated before the flood, kept alive through it
    known.headers["Authorization"] = f"Bearer {hive.token}"
    assert known.get(f"{hive.url}/v1/node", timeout=10).status_code == 200
    idle: list[socket.socket] = []
    try:
        for _ in range(IDLE):
            idle.append(socket.create_connection(("127.0.0.1", hive.port), timeout=10))
        wait_for(
            lambda: "connections open (http_max_connections)" in hive.log(),
            timeout=60,
            what="hive to hold its cap of TCP connections",
        )
        fresh = requests.get(f"{hive.url}/v1/node", headers=hive.headers, timeout=10)
        assert fresh.status_code == 200
        assert known.get(f"{hive.url}/v1/workers", timeout=10).status_code == 200
        assert "closing the oldest idle ones" in hive.log()
    finally:
        for sock in idle:
            sock.close()
        known.close()
    assert "Traceback" not in hive.log()

"""Ready means the worker's own process answered: a process that takes a loading worker's port
(vLLM binds only once its model is loaded) answers the readiness probe, and hive must not take
it for the worker (issue 25, point 4)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hivetest import TAG, Hive, record

from harness.waits import async_wait_for, wait_for

pytestmark = pytest.mark.timeout(120)

WORKERS = Path(__file__).parent.parent / "workers"
HELD = "is held by another process"


class Foreign:
    """``tests/workers/foreign_listener.py`` on ``port``, tagged, its output in a file."""

    def __init__(self, port: int, out: Path) -> None:
        self.out = out
        with open(out, "wb") as file:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKERS / "foreign_listener.py"), str(port)],
                stdout=file,
                stderr=subprocess.STDOUT,
                env={**os.environ, **TAG.env},
            )
        wait_for(lambda: "listening" in self.text(), 10, what="the foreign listener to listen")

    def text(self) -> str:
        if self.proc.poll() is not None:
            raise AssertionError(f"the foreign listener exited: {self.out.read_text()}")
        return self.out.read_text()

    def answered(self) -> int:
        return self.out.read_text().count("answered ")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def foreign(hive: Hive) -> Iterator[list[Foreign]]:
    started: list[Foreign] = []
    yield started
    for one in started:
        one.close()


async def test_a_foreign_listener_on_a_loading_workers_port_is_not_ready(
    hive: Hive, foreign: list[Foreign]
) -> None:
    body: dict[str, Any] = {
        "id": "loading",
        "model": "m",
        # Binds its port only once loaded, as vLLM does; no heartbeat (that would be its own
        # word that it is ready, which needs no check).
        "args": ["--load-seconds", "8", "--listen-after-load", "--no-heartbeat"],
    }
    async with hive.unix_session() as s:
        async with s.post("/v1/workers", json=body) as r:
            assert r.status == 201, await r.text()
            port = (await r.json())["port"]
        try:
            other = Foreign(port, hive.home / "foreign.out")
            foreign.append(other)

            async def held() -> dict[str, Any] | None:
                worker = await record(s, "loading")
                assert worker["state"] == "starting", worker  # not ready on a foreign answer
                return worker if HELD in (worker["error"] or "") else None

            worker = await async_wait_for(held, 30, what="the record to say who holds the port")
            assert worker["state"] == "starting", worker
            holder = f"port {port} is held by another process (pid {other.proc.pid},"
            assert holder in worker["error"], worker
            # Probe after probe passes on the foreign listener; the worker stays starting.
            answered = other.answered()
            await async_wait_for(lambda: other.answered() >= answered + 2, 10)
            worker = await record(s, "loading")
            assert worker["state"] == "starting" and HELD in worker["error"], worker
            assert worker["ready_at"] is None
            assert hive.log().count(HELD) == 1, hive.log()  # logged once, not per probe

            other.close()

            async def ready() -> dict[str, Any] | None:
                worker = await record(s, "loading")
                assert worker["state"] in ("starting", "ready"), worker
                return worker if worker["state"] == "ready" else None

            worker = await async_wait_for(ready, 60, what="the worker to bind and be ready")
            assert worker["error"] is None, worker
            async with (
                aiohttp.ClientSession() as direct,
                direct.get(f"{worker['url']}/server_info") as r,
            ):
                assert (await r.json())["pid"] == worker["pid"]  # its own process answers
        finally:
            async with s.delete("/v1/workers/loading") as r:
                assert r.status == 200, await r.text()

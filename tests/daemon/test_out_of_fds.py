"""hive out of file descriptors (issue 25, point 7).

Under ``RLIMIT_NOFILE`` 64 (soft and hard: hive cannot raise it), hive spawns demo workers until
its descriptors run out. It must slow down rather than spin, say so in a handful of lines
(before: about 77,000 tracebacks in 25 s), answer again once some are freed, and leave no
worker process behind after SIGTERM (``on_exit = "stop"``, the default).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import pytest
from hivetest import TAG, Hive

from harness.procs import environ_has, tagged_processes
from harness.waits import async_wait_for

pytestmark = pytest.mark.timeout(300)

LIMIT = 64
#: Lines of hive's log that are about descriptors (or a traceback, whatever it is about).
ABOUT_DESCRIPTORS = re.compile(
    r"file descriptors|Too many open files|out of system resource|Traceback", re.IGNORECASE
)
#: hive's words, or the system's, for having run out.
RAN_OUT = re.compile(r"out of file descriptors|Too many open files")


def descriptor_lines(hive: Hive) -> list[str]:
    return [line for line in hive.log().splitlines() if ABOUT_DESCRIPTORS.search(line)]


def workers_running(hive: Hive) -> list[int]:
    """The worker processes of this hive still alive (their environment names its home)."""
    return [
        p.pid
        for p in tagged_processes(TAG)
        if p.pid != (hive.proc.pid if hive.proc else None) and environ_has(p, str(hive.home))
    ]


async def answers_health(hive: Hive) -> bool:
    """A new connection over the unix socket gets ``/health`` 200 within 3 s."""
    try:
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(hive.socket)),
                timeout=aiohttp.ClientTimeout(total=3),
            ) as fresh,
            fresh.get("http://hive/health") as r,
        ):
            return r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def exhaust(hive: Hive) -> list[str]:
    """Spawn workers over one kept-alive connection until hive runs out of descriptors; then
    watch it, free some, and see it answer new connections again. The ids spawned."""
    connector = aiohttp.UnixConnector(path=str(hive.socket), limit=1)
    timeout = aiohttp.ClientTimeout(total=60)
    ids: list[str] = []
    async with aiohttp.ClientSession("http://hive", connector=connector, timeout=timeout) as s:

        async def ran_out() -> bool:
            if RAN_OUT.search(hive.log()):
                return True
            async with s.get("/v1/workers") as r:
                workers: list[dict[str, Any]] = (await r.json())["workers"]
            return any(RAN_OUT.search(w["error"] or "") for w in workers)

        for n in range(4 * LIMIT):
            body = {"id": f"fd-{n}", "model": "m", "restart": "no"}
            async with s.post("/v1/workers", json=body) as r:
                assert r.status in (201, 503), await r.text()
                if r.status == 201:
                    ids.append(body["id"])
            if await ran_out():
                break
        else:
            pytest.fail(f"hive never ran out of descriptors:\n{hive.log()}")

        # Out of descriptors for a while (an observation window: nothing is to happen in it,
        # so there is no event to wait for): the workers' heartbeats keep knocking meanwhile.
        await asyncio.sleep(5)
        async with s.get("/v1/workers") as r:  # the connection hive already had still works
            assert r.status == 200

        # Free some: stop workers until a new connection is answered again.
        async def freed() -> bool:
            if ids:
                async with s.delete(f"/v1/workers/{ids.pop()}") as r:
                    assert r.status == 200, await r.text()
            return await answers_health(hive)

        await async_wait_for(freed, 120, what="hive to answer a new connection again")
    return ids


def test_out_of_descriptors_slows_down_says_so_once_and_leaves_no_worker() -> None:
    # The test's one connection must outlive the wait (hive drops an idle one after 10 s).
    hive = Hive('on_exit = "stop"\nhttp_header_timeout = 300\n')
    hive.wrapper = ["prlimit", f"--nofile={LIMIT}:{LIMIT}", "--"]
    try:
        hive.start()
        asyncio.run(exhaust(hive))
        lines = descriptor_lines(hive)
        spun = [line for line in lines if "Traceback" in line or "system resource" in line]
        assert not spun, hive.log()[-20000:]
        assert len(lines) <= 8, "\n".join(lines[:40])
        assert workers_running(hive), "no worker was left running to stop"
        assert hive.stop() == 0
        assert workers_running(hive) == [], hive.log()
    finally:
        hive.cleanup()

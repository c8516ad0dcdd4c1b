"""hive's own pauses are not the workers' silence: a hive SIGSTOPped for three times
``heartbeat_timeout`` kills or restarts none of its heartbeating workers when it runs again, and
says how long it was away (a log line and the ``hive_loop_stall*`` metrics)."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from hivetest import Hive, record, running_hive, spawn_ready

from harness.waits import async_wait_for

pytestmark = pytest.mark.timeout(180)

TIMEOUT = 2.0  # heartbeat_timeout: the demo worker beats every third of it
CONFIG = f"""
heartbeat_timeout = {TIMEOUT}
restart_delay = 0.2
"""


@pytest.fixture(scope="module")
def hive() -> Iterator[Hive]:
    with running_hive(CONFIG) as daemon:
        yield daemon


def _at(text: str | None) -> float:
    return datetime.fromisoformat(text).timestamp() if text else 0.0


async def test_a_sigstopped_hive_harms_no_heartbeating_worker(hive: Hive) -> None:
    ids = [f"beat-{n}" for n in range(3)]
    async with hive.session() as s:
        before = {wid: await spawn_ready(s, id=wid) for wid in ids}
        await async_wait_for(
            lambda: _all(s, ids, lambda w: w["last_heartbeat_at"] is not None),
            what="every worker to heartbeat",
        )
        hive.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(3 * TIMEOUT)  # the pause itself, not a wait for a result
        finally:
            hive.signal(signal.SIGCONT)
        resumed = time.time()
        # Every worker heartbeats (and is heard) a whole heartbeat_timeout after the pause:
        # any hang hive was going to call on it has been called by then.
        after = await async_wait_for(
            lambda: _all(s, ids, lambda w: _at(w["last_heartbeat_at"]) > resumed + TIMEOUT + 0.5),
            timeout=60,
            what="every worker to heartbeat well after the pause",
        )
        harmed = [
            wid
            for wid in ids
            if after[wid]["pid"] != before[wid]["pid"]
            or after[wid]["restarts"] != 0
            or after[wid]["state"] != "ready"
        ]
        assert not harmed, (
            f"{len(harmed)} of {len(ids)} healthy workers harmed by hive's own pause: "
            + "; ".join(
                f"{w}: {after[w]['restarts']} restarts, {after[w]['error']}" for w in harmed
            )
        )
        lines = re.findall(r"hive was not running for ([\d.]+) s", hive.log())
        assert lines and float(lines[-1]) >= 3 * TIMEOUT - 0.5, hive.log()[-3000:]
        async with s.get("/metrics") as r:
            metrics = await r.text()
        stalls = re.search(r"^hive_loop_stalls_total (\S+)$", metrics, re.M)
        seconds = re.search(r"^hive_loop_stall_seconds_total (\S+)$", metrics, re.M)
        assert stalls and float(stalls.group(1)) >= 1, metrics
        assert seconds and float(seconds.group(1)) >= 3 * TIMEOUT - 0.5, metrics
        for wid in ids:
            async with s.delete(f"/v1/workers/{wid}") as r:
                assert r.status == 200


async def _all(s: Any, ids: list[str], test: Any) -> dict[str, dict[str, Any]] | None:
    records = {wid: await record(s, wid) for wid in ids}
    return records if all(test(w) for w in records.values()) else None

"""A detaching hive (``on_exit = "detach"``, the default) tells a host shutdown from a restart
of hive at SIGTERM, by asking ``shutdown_check`` (``systemctl is-system-running`` in production;
here ``cat`` of a file the test writes, as systemd's manager state reads: ``running`` or
``stopping``). A restart leaves the workers running; a shutdown stops them (out of the routers,
drained, SIGTERM) before hive exits, and the next hive starts each again as its restart policy
says, as it did when a reboot had ended them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil
import pytest
from hivetest import Hive, record, spawn_ready

from harness.waits import async_wait_for

pytestmark = pytest.mark.timeout(180)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_a_restart_of_hive_detaches_and_a_host_shutdown_stops_the_workers(
    tmp_path: Path,
) -> None:
    state = tmp_path / "system-state"
    hive = Hive(f'shutdown_check = ["cat", "{state}"]\nrestart_delay = 0.2\n', on_exit=None)
    try:
        state.write_text("running\n")
        hive.start()
        async with hive.session() as s:
            web = await spawn_ready(s, id="web", restart="on-failure")
            once = await spawn_ready(s, id="once", restart="no")

        # systemctl restart hive: the host runs on, so do the workers; the next hive adopts them
        assert hive.stop() == 0
        assert alive(web["pid"]) and alive(once["pid"])
        hive.start()
        async with hive.session() as s:
            adopted = await record(s, "web")
            assert (adopted["state"], adopted["pid"]) == ("ready", web["pid"])

        # a reboot: hive stops them itself before it exits
        state.write_text("stopping\n")
        assert hive.stop() == 0
        assert not alive(web["pid"]) and not alive(once["pid"])
        assert f"not a host shutdown (cat {state}: running)" in hive.log()  # the restart
        assert "the host is shutting down: every worker is withdrawn" in hive.log()

        # the boot: no answer from the check now (it only matters at SIGTERM)
        state.unlink()
        hive.start()
        async with hive.session() as s:

            async def web_back() -> dict[str, Any] | None:
                r = await record(s, "web")
                return r if r["state"] == "ready" and r["pid"] != web["pid"] else None

            back = await async_wait_for(web_back, timeout=60, what="web started again")
            assert back["restarts"] == 1
            left = await record(s, "once")  # restart = "no": it stays stopped
            assert (left["state"], left["next_restart_at"]) == ("stopped", None)

        # the end of the test is a shutdown too: nothing is left running
        state.write_text("stopping\n")
        assert hive.stop() == 0
        assert not alive(back["pid"])
    finally:
        hive.cleanup()

"""What only the tests add to the harness (``harness/``): this run's tag, a :class:`Hive` that
carries it, and :func:`running_hive`, which checks a daemon's exit.

Every process the tests start carries ``HIVE_TEST_TAG`` in its environment, so that the leak
check in ``conftest.py`` can find any of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import aiohttp

from harness import daemon
from harness.procs import Tag, zombie_children

#: Marks every process started by this test run.
TAG = Tag.new("HIVE_TEST_TAG", "hive-test")


class Hive(daemon.Hive):
    """One ``hive serve`` under test, in its own temp dir, on a free port, tagged with TAG."""

    def __init__(
        self,
        config: str = "",
        env: Mapping[str, str] | None = None,
        on_exit: str | None = "stop",
        port_range: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(config, env, tag=TAG, on_exit=on_exit, port_range=port_range)


@contextlib.contextmanager
def running_hive(
    config: str = "",
    env: Mapping[str, str] | None = None,
    on_exit: str | None = "stop",
    port_range: tuple[int, int] | None = None,
) -> Iterator[Hive]:
    """A started hive that is stopped (and checked for zombies) at the end.

    The tests' hives stop their workers when they stop (``on_exit = "stop"``, unless ``config``
    sets it or ``on_exit`` says otherwise; ``None``: hive's default, ``detach``), so that a
    stopped hive leaves nothing for the leak check to find. ``port_range``: the workers' ports
    (hives of one machine in one fleet must not share a range)."""
    hive = Hive(config, env, on_exit, port_range)
    try:
        hive.start()
        yield hive
        if hive.proc is not None:
            assert zombie_children(hive.pid) == [], "hive left zombie children"
            code = hive.stop()
            assert code == 0, f"hive exited {code}:\n{hive.log()}"
    finally:
        hive.cleanup()


async def spawn_ready(s: aiohttp.ClientSession, **body: Any) -> dict[str, Any]:
    """POST a spawn with ``wait=ready`` and return the record; fails the test unless it is 200."""
    body.setdefault("model", "m")
    async with s.post("/v1/workers", params={"wait": "ready", "timeout": "60"}, json=body) as r:
        data = await r.json()
        assert r.status == 200, data
        return dict(data)


async def record(s: aiohttp.ClientSession, worker_id: str) -> dict[str, Any]:
    """GET one worker's record; fails the test unless it is 200."""
    async with s.get(f"/v1/workers/{worker_id}") as r:
        assert r.status == 200
        return dict(await r.json())

"""A worker's orphan is still the worker's on the unix socket (issue 28's follow-up): a process
double-forked by a worker, re-parented away from it, is no descendant of any process hive
started, yet it is in the worker's cgroup (containment ``cgroup``; here with an empty
environment, so the cgroup alone can tell) or carries the worker's tag (``tags``; re-parented
to hive, the child subreaper). Either says whose it is: its own worker's heartbeat and nothing
else, whatever its parent. And a connection that a process made, handed to the orphan and died
(reaped, so the pid the kernel gives hive names nothing) gets nothing: whoever sends on it
cannot be told."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from containments import KINDS, hive_with_backend
from hivetest import Hive

from harness.waits import wait_for

pytestmark = pytest.mark.timeout(120)

WORKER = Path(__file__).parent.parent / "workers" / "orphaning_worker.py"


@pytest.fixture(scope="module", params=KINDS)
def hive(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hive]:
    out = tmp_path_factory.mktemp("orphans")
    # Under cgroups the orphan drops hive's tag: only its cgroup says whose it is.
    keep = "clear" if request.param == "cgroup" else "keep"
    env = {"ORPHAN_DIR": str(out), "ORPHAN_SOCKET": "{socket}", "ORPHAN_ENV": keep}
    with hive_with_backend(request.param, "orphaning", WORKER, env, out) as daemon:
        yield daemon


async def test_an_orphan_of_a_worker_gets_its_heartbeat_and_nothing_else(hive: Hive) -> None:
    kind: str = hive.kind  # type: ignore[attr-defined]
    worker_id = f"orphaning-{kind}"
    out: Path = hive.out / worker_id  # type: ignore[attr-defined]
    out.mkdir()
    try:
        worker = await hive.spawn(
            {"model": "m", "id": worker_id, "backend": "orphaning"}, wait=True
        )
        (out / "go").write_text("")
        path = out / "orphan.json"
        text = wait_for(lambda: path.exists() and path.read_text(), timeout=60,
                        what="the orphan's report")  # fmt: skip
        orphan: dict[str, Any] = json.loads(text)
        # It re-parented: its parent is neither the worker nor the process that forked it.
        assert orphan["ppid"] not in (worker["pid"], orphan["middle"]), orphan
        if kind == "cgroup":
            assert orphan["environ"] == 0, orphan  # no tag
            assert f"worker.{worker_id}" in orphan["cgroup"], orphan
            assert orphan["ppid"] != hive.pid, orphan  # no subreaper: to init, out of hive's tree
        else:
            assert orphan["ppid"] == hive.pid, orphan  # hive, the child subreaper
        assert orphan["list"] == 403, orphan
        assert orphan["heartbeat"] == 200, orphan  # known as its worker's, not a stray
        # A connection whose maker is gone (it handed the socket to the orphan and was reaped):
        # hive cannot tell whose it was, so it grants nothing.
        assert orphan["handed_off"] == 403, orphan
    finally:
        (out / "go").write_text("")
        await hive.call("DELETE", f"/v1/workers/{worker_id}?force=true", ok=(200, 204, 404))
        await hive.close_http()

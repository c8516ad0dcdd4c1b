"""A worker on the unix socket gets its own heartbeat and nothing else, even when it runs as
root, clears its environment and leaves its cgroup (issue 28, point 9): hive knows its workers
by its own record of the processes it started, walking a peer's parents up to one. And a hive
that runs as root warns at start of every backend whose workers would run as root too."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from containments import KINDS, hive_with_backend
from hivetest import Hive

from harness.waits import wait_for

pytestmark = pytest.mark.timeout(120)

WORKERS = Path(__file__).parent.parent / "workers"


@pytest.fixture(scope="module", params=KINDS)
def hive(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hive]:
    out = tmp_path_factory.mktemp("rogue")
    env = {"ROGUE_DIR": str(out), "ROGUE_SOCKET": "{socket}"}  # the worker calls the socket
    with hive_with_backend(request.param, "rogue", WORKERS / "rogue_worker.py", env, out) as daemon:
        yield daemon


def report(hive: Hive, worker_id: str, name: str) -> dict[str, Any]:
    path = hive.out / worker_id / f"{name}.json"  # type: ignore[attr-defined]
    return dict(json.loads(wait_for(lambda: path.exists() and path.read_text(), timeout=60,
                                    what=f"the {name} probe's report")))  # fmt: skip


async def test_a_worker_that_clears_its_tag_and_leaves_its_cgroup_gets_nothing(
    hive: Hive,
) -> None:
    worker_id = f"rogue-{hive.kind}"  # type: ignore[attr-defined]
    (hive.out / worker_id).mkdir()  # type: ignore[attr-defined]
    try:
        worker = await hive.spawn({"model": "m", "id": worker_id, "backend": "rogue"}, wait=True)
        (hive.out / worker_id / "go").write_text("")  # type: ignore[attr-defined]
        child = report(hive, worker_id, "child")
        assert child["environ"] == 0  # no tag
        if os.geteuid() == 0 and hive.kind == "cgroup":  # type: ignore[attr-defined]
            assert worker_id not in child["cgroup"], child  # out of the worker's cgroup
        assert child["status"] == 403, child
        orphan = report(hive, worker_id, "orphan")
        if hive.kind == "tags":  # type: ignore[attr-defined]
            # Re-parented to hive, the child subreaper: some worker's, and given nothing.
            assert orphan["ppid"] == hive.pid and orphan["status"] == 403, orphan
        assert worker["pid"] != child["ppid"] or child["status"] == 403
    finally:
        (hive.out / worker_id / "go").write_text("")  # type: ignore[attr-defined]
        await hive.call("DELETE", f"/v1/workers/{worker_id}?force=true", ok=(200, 204, 404))
        await hive.close_http()


def test_hive_as_root_warns_of_backends_without_a_user(hive: Hive) -> None:
    if os.geteuid() != 0:
        pytest.skip("hive runs as root only when the tests do")
    line = next((x for x in hive.log().splitlines() if "hive runs as root and backend(s)" in x), "")
    assert "rogue" in line and 'set user = "..."' in line, hive.log()

"""A worker the kernel's OOM killer ended says "out of memory", not only "killed by signal 9":
from its cgroup's ``memory.events`` (cgroup containment with the memory controller), or from the
kernel log (any containment, where hive may read ``/dev/kmsg``)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hivetest import Hive, record, running_hive

from harness.waits import async_wait_for, wait_for

pytestmark = pytest.mark.timeout(120)

WORKER = Path(__file__).parent.parent / "workers" / "oom_worker.py"
V1_MEMORY = Path("/sys/fs/cgroup/memory")


def config(kind: str, mode: str) -> str:
    return f"""
containment = "{kind}"

[backends.hog]
command = ["{{python}}", "{WORKER}", "{mode}"]
health_path = ""
"""


def _kmsg_readable() -> bool:
    try:
        os.close(os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK))
    except OSError:
        return False
    return True


@pytest.fixture
def v1_group() -> Iterator[Path]:
    """A cgroup v1 memory group limited to 64 MiB, removed at the end."""
    if os.geteuid() != 0 or not (V1_MEMORY / "memory.limit_in_bytes").exists():
        pytest.skip("needs root and the cgroup v1 memory controller")
    if not _kmsg_readable():
        pytest.skip("the kernel log (/dev/kmsg) cannot be read here")
    group = V1_MEMORY / f"hive-test-oom-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(64 << 20))
        yield group
    finally:
        wait_for(lambda: not (group / "cgroup.procs").read_text().split(), what="an empty group")
        group.rmdir()


async def _failed(hive: Hive) -> dict[str, object]:
    async with hive.session() as s:
        async with s.post(
            "/v1/workers", json={"model": "m", "id": "hog", "backend": "hog", "restart": "no"}
        ) as r:
            assert r.status == 201, await r.text()

        async def failed() -> dict[str, object] | None:
            body = await record(s, "hog")
            return body if body["state"] == "failed" else None

        body = await async_wait_for(failed, timeout=60, what="the worker to be OOM-killed")
        async with s.delete("/v1/workers/hog") as r:
            assert r.status == 200
        return body


async def test_the_kernel_log_says_out_of_memory(v1_group: Path) -> None:
    with running_hive(config("tags", f"v1:{v1_group}")) as hive:
        body = await _failed(hive)
    error = str(body["error"])
    assert error.startswith("out of memory (the kernel's OOM killer ended its pid"), body
    assert "killed by signal 9 (SIGKILL)" in error


async def test_the_cgroup_says_out_of_memory() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, to set the worker cgroup's memory.max")
    with running_hive(config("auto", "v2")) as hive:
        bases = [Path(b) for b in re.findall(r"containment: cgroup v2 under (\S+)", hive.log())]
        if not bases:
            pytest.skip("no writable cgroup v2 here")
        if "memory" not in (bases[0] / "cgroup.subtree_control").read_text().split():
            pytest.skip("cgroup v2 here has no memory controller to hand to the workers")
        body = await _failed(hive)
    error = str(body["error"])
    assert error.startswith("out of memory (the kernel's OOM killer ended 1 process"), body

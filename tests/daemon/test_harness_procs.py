"""harness/procs.py against a real child process: the tag finds it and the sweep ends it. The
harness's pure parts are in tests/unit/test_harness.py."""

from __future__ import annotations

import os
import subprocess
import sys

from harness.procs import Tag, sweep, tagged_processes
from harness.waits import wait_for


def test_tagged_processes_finds_what_carries_the_tag() -> None:
    tag = Tag.new("X_TAG", "unit")
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], env={**os.environ, **tag.env}
    )
    try:
        found = wait_for(lambda: tagged_processes(tag), timeout=10, what="the tagged child")
        assert [p.pid for p in found] == [child.pid]
        assert tagged_processes(Tag.new("X_TAG", "other")) == []
        assert sweep(tag) == [f"{child.pid} {sys.executable} -c import time; time.sleep(60)"]
        assert child.wait(10) != 0
        assert tagged_processes(tag) == []
    finally:
        child.kill()
        child.wait()

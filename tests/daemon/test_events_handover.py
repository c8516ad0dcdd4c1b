"""``hive events`` during a replacement (issue 29): the old worker's stop and end, and the
successor taking its id, are one line (``chat  handed over to generation 2 (chat~2), ready``),
where ``chat ready -> stopped``, ``stopped -> forgotten`` read as an outage."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hivetest import running_hive

from harness.waits import wait_for

pytestmark = pytest.mark.timeout(180)


def test_a_replacement_is_one_line(tmp_path: Path) -> None:
    with running_hive() as hive:
        env = {**hive.env, "HIVE_URL": f"unix://{hive.socket}"}
        out = tmp_path / "events.out"
        with out.open("wb") as o:
            events = subprocess.Popen(
                [*hive.cli_command(), "events"], env=env, stdout=o, stderr=subprocess.STDOUT
            )
        try:
            spawned = hive.cli("spawn", "m", "--id", "chat")
            assert spawned.returncode == 0, spawned.stderr
            wait_for(lambda: "chat  starting -> ready" in out.read_text(), what="chat ready")
            replaced = hive.cli("replace", "chat", "--model", "m2")
            assert replaced.returncode == 0, replaced.stderr
            wait_for(lambda: "handed over" in out.read_text(), what="the hand-over line")
        finally:
            events.terminate()
            events.wait(30)
        lines = [line.strip().split("  ", 2)[-1] for line in out.read_text().splitlines()]
        chat = [line for line in lines if line.startswith("chat  ")]
        assert chat[-1:] == ["chat  handed over to generation 2 (chat~2), ready"], chat
        assert not [line for line in chat if "stopped" in line or "forgotten" in line], chat
        assert "chat~2  - -> starting" in lines and "chat~2  starting -> ready" in lines

"""The CLI's follow commands when hive dies under them: ``hive logs -f`` and ``hive events``
exit 1 with one sentence saying hive went away (and how to pick up again), never a traceback
of aiohttp's ``ClientPayloadError``."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from hivetest import running_hive

from harness.waits import wait_for

pytestmark = pytest.mark.timeout(180)


def test_follow_commands_say_hive_went_away(tmp_path: Path) -> None:
    with running_hive() as hive:
        env = {**hive.env, "HIVE_URL": f"unix://{hive.socket}"}
        command = hive.cli_command()
        outputs = {
            name: (tmp_path / f"{name}.out", tmp_path / f"{name}.err") for name in ("e", "l")
        }

        def follow(name: str, *args: str) -> subprocess.Popen[bytes]:
            out, err = outputs[name]
            with out.open("wb") as o, err.open("wb") as e:
                return subprocess.Popen([*command, *args], env=env, stdout=o, stderr=e)

        events = follow("e", "events", "--json")
        logs: subprocess.Popen[bytes] | None = None
        try:
            spawned = hive.cli("spawn", "m", "--id", "w")
            assert spawned.returncode == 0, spawned.stderr
            wait_for(lambda: '"to": "ready"' in outputs["e"][0].read_text(), what="events")
            logs = follow("l", "logs", "-f", "w")
            wait_for(lambda: outputs["l"][0].stat().st_size > 0, what="the log's tail")
            hive.kill()
            assert events.wait(60) == 1
            assert logs.wait(60) == 1
        finally:
            for proc in (events, logs):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
        last_id = [line for line in outputs["e"][0].read_text().splitlines() if line][-1]
        event_id = json.loads(last_id)["event_id"]
        assert outputs["e"][1].read_text() == (
            "hive: hive went away while following its events (the connection closed); "
            f"pick up where this left off with: hive events --since {event_id}\n"
        )
        assert outputs["l"][1].read_text() == (
            "hive: hive went away while following w's log (the connection closed); "
            "run it again once hive is back: the worker may still be running\n"
        )


def test_ctrl_c_during_spawn_says_the_worker_keeps_starting(tmp_path: Path) -> None:
    with running_hive() as hive:
        env = {**hive.env, "HIVE_URL": f"unix://{hive.socket}"}
        err = tmp_path / "spawn.err"
        with err.open("wb") as e:
            spawn = subprocess.Popen(
                [*hive.cli_command(), "spawn", "m", "--id", "slow", "--", "--load-seconds", "120"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=e,
            )
        try:
            wait_for(lambda: "slow starting" in err.read_text(), what="spawn's progress")
            spawn.send_signal(signal.SIGINT)
            assert spawn.wait(30) == 130
        finally:
            if spawn.poll() is None:
                spawn.kill()
                spawn.wait()
        assert err.read_text().splitlines()[-1] == (
            "hive: stopped waiting; slow keeps starting: follow it with hive logs -f slow, "
            "or stop it with hive stop slow"
        )
        shown = hive.cli("show", "slow", "--json")
        assert json.loads(shown.stdout)["state"] == "starting"
        assert hive.cli("rm", "--force", "slow").returncode == 0

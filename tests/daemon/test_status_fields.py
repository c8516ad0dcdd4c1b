"""``hive status`` and ``GET /v1/node`` say where hive's files are and how its last reload went
(issue 29: a refused reload was only in the daemon's log); ``hive events -o yaml`` prints YAML
like every other ``-o yaml``."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from hivetest import Hive, running_hive

from harness.waits import async_wait_for, wait_for

pytestmark = pytest.mark.timeout(120)


def status(hive: Hive, *args: str) -> str:
    result = hive.cli("status", *args)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def lines_of(text: str) -> dict[str, str]:
    """``hive status``'s lines by their first word."""
    return {line.split()[0]: line for line in text.splitlines() if line.strip()}


async def reloaded(hive: Hive, after: str, ok: bool) -> dict[str, Any]:
    """SIGHUP, then the node's ``last_reload`` once it is a SIGHUP's after ``after`` with the
    outcome ``ok``."""
    hive.signal(signal.SIGHUP)

    async def outcome() -> dict[str, Any] | None:
        last = (await hive.call("GET", "/v1/node"))["last_reload"]
        fresh = last["trigger"] == "SIGHUP" and last["at"] > after and last["ok"] is ok
        return last if fresh else None

    return await async_wait_for(outcome, timeout=30, what=f"a reload with ok={ok}")  # type: ignore[no-any-return]


async def test_status_shows_files_and_each_reload() -> None:
    with running_hive() as hive:
        try:
            node = await hive.call("GET", "/v1/node")
            assert node["config_file"] == str(hive.config_path)
            assert node["state_dir"] == str(hive.state_dir)
            assert node["token_source"] == "file"
            assert node["token_file"] == str(hive.token_file)
            start = node["last_reload"]
            assert (start["trigger"], start["ok"], start["message"]) == ("start", True, "loaded")
            text = status(hive)
            assert hive.token not in text and hive.token not in status(hive, "-o", "yaml")
            shown = lines_of(text)
            assert shown["config"] == f"config   {hive.config_path}"
            assert shown["state"] == f"state    {hive.state_dir}"
            assert shown["token"] == f"token    file {hive.token_file}"
            assert shown["reload"].startswith("reload   at start, ")
            assert shown["reload"].endswith(" ago: ok: loaded")

            # A declared workers file with a bad worker: the reload is refused, and says why.
            directory = hive.config_path.parent / "workers.d"
            directory.mkdir()
            bad = directory / "bad.toml"
            bad.write_text('[[workers]]\nid = "bad"\nmodel = "m"\ncpus = 0\n')
            refused = await reloaded(hive, start["at"], ok=False)
            why = f"{bad}: worker 'bad': cpus: must be a count of at least 1, or a list of core ids"
            assert refused["message"] == f"declared workers refused, nothing of them applied: {why}"
            shown = lines_of(status(hive))
            assert shown["reload"].startswith("reload   SIGHUP, ")
            assert shown["reload"].endswith(f" ago: REFUSED: {refused['message']}")
            assert (await hive.call("GET", "/v1/workers"))["total"] == 0

            # Fixed (the file removed): the next reload is ok.
            bad.unlink()
            good = await reloaded(hive, refused["at"], ok=True)
            assert good["message"] == "reloaded: nothing changed"
            assert lines_of(status(hive))["reload"].endswith(" ago: ok: reloaded: nothing changed")

            # A configuration file that does not load: refused, the running one stays.
            kept = hive.config_path.read_text()
            hive.config_path.write_text(kept + "retention = -1\n")
            refused = await reloaded(hive, good["at"], ok=False)
            assert refused["message"].startswith(
                f"reload refused, the running configuration stays: {hive.config_path}: retention:"
            ), refused
            hive.config_path.write_text(kept + "retention = 120\n")
            changed = await reloaded(hive, refused["at"], ok=True)
            assert changed["message"] == "reloaded: changed retention"
        finally:
            await hive.close_http()


def following(hive: Hive) -> float:
    """How many clients follow hive's events (its ``hive_event_clients``)."""
    request = urllib.request.Request(f"{hive.url}/metrics", headers=hive.headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    return float(re.search(r"^hive_event_clients (\S+)$", text, re.M)[1])  # type: ignore[index]


def test_events_yaml_is_a_stream_of_yaml_documents(hive: Hive, tmp_path: Path) -> None:
    env = {**hive.env, "HIVE_URL": f"unix://{hive.socket}"}
    outputs = {}
    followers = {}
    for name in ("yaml", "json"):
        outputs[name] = tmp_path / f"events.{name}"
        with outputs[name].open("wb") as out:
            followers[name] = subprocess.Popen(
                [*hive.cli_command(), "events", "-o", name],
                env=env,
                stdout=out,
                stderr=subprocess.PIPE,
            )
    try:
        wait_for(lambda: following(hive) == 2, what="both followers connected")
        spawned = hive.cli("spawn", "m", "--id", "yaml-events")
        assert spawned.returncode == 0, spawned.stderr
        for name in ("yaml", "json"):
            wait_for(lambda n=name: "ready" in outputs[n].read_text(), what=f"-o {name}: ready")
    finally:
        for follower in followers.values():
            follower.terminate()
            follower.wait(30)
        hive.cli("rm", "--force", "yaml-events")
    text = outputs["yaml"].read_text()
    assert text.startswith("---\n"), text
    documents = list(yaml.safe_load_all(text))
    lines = [json.loads(line) for line in outputs["json"].read_text().splitlines()]
    assert documents == lines
    moves = [(d["id"], d["from"], d["to"]) for d in documents if "changed" not in d]
    assert moves[:2] == [("yaml-events", None, "starting"), ("yaml-events", "starting", "ready")]

"""docs/backends.md's worked custom backend, run as the doc shows it, so that the doc cannot rot.

The model server, the ``[backends.echo]`` table, the ``hive spawn`` line, what it prints and the
request with its answer are read verbatim from the doc's blocks (each marked by an
``<!-- example: NAME -->`` comment); the one change is where the script is saved: the doc's
path becomes this test's temp dir."""

from __future__ import annotations

import json
import re
import shlex
import urllib.request
from pathlib import Path

import pytest
from hivetest import running_hive

pytestmark = pytest.mark.timeout(120)

DOC = Path(__file__).parents[2] / "docs" / "backends.md"
#: Where the doc tells the operator to save the script.
SAVED_AS = "/srv/models/echo_server.py"


def examples() -> dict[str, str]:
    """Each ``<!-- example: NAME ... -->`` block of the doc by NAME: the fenced block after it."""
    found = re.findall(
        r"^<!-- example: (\S+)[^\n]*-->\n```[a-z]*\n(.*?)^```$", DOC.read_text(), re.M | re.S
    )
    return dict(found)


def test_the_doc_has_every_block() -> None:
    assert set(examples()) == {"echo_server.py", "hive.toml", "spawn", "spawned", "request"}


def test_the_custom_backend_of_the_doc_spawns_is_ready_and_answers(tmp_path: Path) -> None:
    blocks = examples()
    script = tmp_path / "echo_server.py"
    script.write_text(blocks["echo_server.py"])
    assert SAVED_AS in blocks["hive.toml"], f"the doc's config no longer runs {SAVED_AS}"
    config = blocks["hive.toml"].replace(SAVED_AS, str(script))
    spawn = shlex.split(blocks["spawn"])
    assert spawn[:2] == ["hive", "spawn"], blocks["spawn"]
    # What the doc says spawn prints, with any figure (time, port, core, pid) free to differ.
    printed = re.sub(r"\d+", r"\\d+", re.escape(blocks["spawned"].strip()))
    request, answer = blocks["request"].strip().splitlines()
    curl = shlex.split(request)
    url, data = curl[curl.index("-s") + 1], curl[curl.index("-d") + 1]

    with running_hive(config) as hive:
        result = hive.cli(*spawn[1:])
        assert result.returncode == 0, result.stdout + result.stderr
        assert re.fullmatch(printed, result.stdout.strip()), result.stdout
        worker_id = spawn[spawn.index("--id") + 1]
        record = json.loads(hive.cli("show", worker_id, "--json").stdout)
        assert (record["state"], record["backend"]) == ("ready", "echo")
        assert record["url"] in result.stdout

        base = record["url"]
        with urllib.request.urlopen(f"{base}/health", timeout=10) as response:
            assert response.status == 200
        post = urllib.request.Request(
            url.replace("http://127.0.0.1:18000", base), data=data.encode(), method="POST"
        )
        with urllib.request.urlopen(post, timeout=10) as response:
            assert json.loads(response.read()) == json.loads(answer)

        stopped = hive.cli("stop", worker_id)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr

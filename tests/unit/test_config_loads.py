"""The last reload as ``GET /v1/node`` and ``hive status`` tell it: the configuration's verdict,
then the declared workers' check, which only speaks for the configuration it read."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from hive.cli.tables import node as node_text
from hive.context import ConfigLoads
from hive.models import DeviceSummary, LastReload, Node


def test_a_declared_check_is_the_outcome_of_the_load_it_followed(tmp_path: Path) -> None:
    config = tmp_path / "hive.toml"
    config.write_text("")
    loads = ConfigLoads()
    loads.loaded("start", config, "loaded")
    assert loads.file == config and loads.last is not None and loads.last.ok
    loads.declared("declared workers refused, nothing of them applied: x: empty")
    assert loads.last.trigger == "start" and not loads.last.ok
    assert loads.last.message.endswith("x: empty")

    loads.loaded("SIGHUP", config, "reloaded: nothing changed")
    loads.declared(None)
    assert (loads.last.trigger, loads.last.ok) == ("SIGHUP", True)
    assert loads.last.message == "reloaded: nothing changed"

    # A refused configuration: a pass over the files the old one named does not clear it.
    loads.refused("reload refused, the running configuration stays: hive.toml: bad")
    loads.declared(None)
    assert not loads.last.ok and loads.last.message.endswith("hive.toml: bad")
    assert loads.file == config


def test_no_configuration_file_is_the_defaults(tmp_path: Path) -> None:
    loads = ConfigLoads()
    loads.loaded("start", tmp_path / "absent.toml", "loaded")
    assert loads.file is None
    assert loads.last is not None
    assert loads.last.message == "loaded (no configuration file: defaults)"


def test_status_text_names_the_files_never_the_token() -> None:
    at = datetime.now(UTC)
    node = Node(
        hostname="h",
        version="0",
        started_at=at,
        devices=DeviceSummary(cpus=1, cores=2, gpus=0, gpu_error=None),
        workers={},
        state_dir="/var/lib/hive",
        token_source="HIVE_TOKEN",
        last_reload=LastReload(at=at, trigger="SIGHUP", ok=False, message="refused: a\nb: c"),
    )
    lines = node_text(node).splitlines()
    assert lines[-5:] == [
        "config   none (the defaults)",
        "state    /var/lib/hive",
        "token    from HIVE_TOKEN",
        "reload   SIGHUP, 0s ago: REFUSED: refused: a",
        "         b: c",
    ]
    old = node.model_copy(update={"state_dir": None, "token_source": None, "last_reload": None})
    assert "config" not in node_text(old)  # a hive from before these fields: nothing said

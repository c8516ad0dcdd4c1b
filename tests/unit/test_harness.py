"""The pure parts of the harness that the tests and the bench share (``harness/``)."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest

from harness.env import isolated_env
from harness.net import free_port, port_free, port_in_use
from harness.procs import Tag
from harness.stats import percentile, summarize
from harness.waits import wait_for


def test_percentile_interpolates_linearly() -> None:
    values = [10.0, 20.0, 30.0, 40.0, 50.0]
    assert percentile(values, 0.0) == 10.0
    assert percentile(values, 0.5) == 30.0
    assert percentile(values, 0.95) == pytest.approx(48.0)  # numpy: np.percentile(values, 95)
    assert percentile(values, 1.0) == 50.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([7.0], 0.99) == 7.0
    assert math.isnan(percentile([], 0.5))


def test_summarize_sorts_rounds_and_keeps_samples_in_order() -> None:
    out = summarize([3.0, 1.0, 2.00049])
    assert out == {
        "n": 3,
        "p50": 2.0,
        "p95": 2.9,
        "p99": 2.98,
        "min": 1.0,
        "max": 3.0,
        "mean": 2.0,
        "samples": [3.0, 1.0, 2.0],
    }
    assert "samples" not in summarize([1.0], keep=False)
    assert summarize([]) == {"n": 0, "samples": []}
    assert summarize([], keep=False) == {"n": 0}


def test_tag_is_this_process_and_an_env_entry() -> None:
    tag = Tag.new("X_TAG", "unit")
    assert tag.value.startswith(f"unit-{os.getpid()}-")
    assert tag.env == {"X_TAG": tag.value}
    assert str(tag) == tag.value
    assert Tag.new("X_TAG", "unit") != tag


def test_isolated_env_drops_settings_and_points_everything_home(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HIVE_URL", "XDG_CONFIG_HOME", "NOTIFY_SOCKET", "WATCHDOG_USEC", "BENCH_ONLY"):
        monkeypatch.setenv(name, "leak")
    monkeypatch.setenv("KEEP_ME", "kept")
    home = Path("/tmp/h")
    tag = Tag("X_TAG", "v")
    env = isolated_env(home, tag, {"PYTHONUNBUFFERED": "0", "EXTRA": "1"}, drop=("BENCH_",))
    assert not {"HIVE_URL", "NOTIFY_SOCKET", "WATCHDOG_USEC", "BENCH_ONLY"} & set(env)
    assert env["KEEP_ME"] == "kept"
    assert env["HOME"] == "/tmp/h" and env["XDG_CONFIG_HOME"] == "/tmp/h/config"
    assert env["XDG_RUNTIME_DIR"] == "/tmp/h/run" and env["XDG_STATE_HOME"] == "/tmp/h/state"
    assert env["X_TAG"] == "v"
    assert env["EXTRA"] == "1" and env["PYTHONUNBUFFERED"] == "0"  # extra wins
    assert isolated_env(home, tag)["BENCH_ONLY"] == "leak"  # only dropped when asked


def test_ports_in_use_and_free() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = int(s.getsockname()[1])
        assert port_in_use(port)
        assert not port_free(port)
    assert not port_in_use(port)
    assert port_free(free_port())


def test_wait_for_returns_the_value_or_fails_naming_what() -> None:
    calls = iter([0, "", "done"])
    assert wait_for(lambda: next(calls), timeout=5, interval=0) == "done"
    with pytest.raises(AssertionError, match="the sky to fall"):
        wait_for(lambda: False, timeout=0.05, what="the sky to fall")

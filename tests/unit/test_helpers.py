"""The small helpers that several modules share, each defined once: plain tests, no daemon."""

from __future__ import annotations

import asyncio
import math
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from hive.addresses import connect_host, http_url
from hive.api.app import operations
from hive.api.middleware import validation_message
from hive.api.openapi import build_openapi
from hive.cli.main import build_parser, main
from hive.config import Config, ConfigError, parse_config
from hive.devices.cpu import parse_cpulist
from hive.devices.gpu import GpuSnapshot
from hive.devices.placement import Placer
from hive.models import MARKER, WORKER_ID_PATTERN, WORKER_KEY_PATTERN, Heartbeat, SpawnRequest
from hive.state.registry import Registry
from hive.timeouts import sleep_to_tick
from hive.validation import field_errors
from hive.workers.logs import Logs
from hive.workers.usage import Usage

# -- the worker-id pattern -----------------------------------------------------------------------


@pytest.mark.parametrize("worker_id", ["a", "0", "qwen-1.5b_x", "a" * 63, "m.2-x_y"])
def test_worker_id_pattern_takes(worker_id: str) -> None:
    assert re.match(WORKER_ID_PATTERN, worker_id)
    assert SpawnRequest(model="m", id=worker_id).id == worker_id


@pytest.mark.parametrize("worker_id", ["", "A", "-a", ".a", "_a", "a" * 64, "a/b", "a b", "é"])
def test_worker_id_pattern_refuses(worker_id: str) -> None:
    assert not re.match(WORKER_ID_PATTERN, worker_id)
    with pytest.raises(ValidationError):
        SpawnRequest(model="m", id=worker_id)


def test_openapi_documents_the_same_worker_id_pattern() -> None:
    paths = build_openapi(operations())["paths"]
    patterns = {
        param["schema"]["pattern"]
        for ops in paths.values()
        for op in ops.values()
        for param in op["parameters"]
        if param["in"] == "path" and param["name"] == "id"
    }
    assert patterns == {WORKER_KEY_PATTERN}
    # Every id, and a successor's key, matches it; nothing an id refuses does, but ``~<n>``.
    for good in ("a", "web", "web~2", "a" * 63 + "~10"):
        assert re.match(WORKER_KEY_PATTERN, good)
    for bad in ("", "A", "-a", "a~", "a~x", "~2", "a b"):
        assert not re.match(WORKER_KEY_PATTERN, bad)


# -- the cpulist parser ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cores"),
    [
        ("0", [0]),
        ("0-3", [0, 1, 2, 3]),
        ("0-3,8,10-11", [0, 1, 2, 3, 8, 10, 11]),
        ("8,0-1", [8, 0, 1]),  # in the order given
        ("5-", [5]),
        ("3-1", []),  # an empty range
        ("", []),  # a NUMA node without CPUs
        (" 1, 2 ", [1, 2]),  # int() takes the spaces around a number
    ],
)
def test_parse_cpulist(text: str, cores: list[int]) -> None:
    assert parse_cpulist(text) == cores


@pytest.mark.parametrize("text", ["a", "0,,1", "0,", ",0", "-", "-1", "1-2-3", "0-a", " "])
def test_parse_cpulist_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpulist(text)


def _cpus_option(value: str) -> int | list[int]:
    args = build_parser().parse_args(["spawn", "m", "--cpus", value])
    return args.cpus


def test_cli_cpus_is_a_count_or_a_cpulist() -> None:
    assert _cpus_option("4") == 4
    assert _cpus_option("0-3,8") == [0, 1, 2, 3, 8]
    assert _cpus_option("3-1") == []  # passed on: the spawn checks say why it is refused


@pytest.mark.parametrize("value", ["", " ", "0,", "a-b"])
def test_cli_cpus_refuses(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        _cpus_option(value)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"must be a count of at least 1, or a list of core ids like 0-3,8, not {value!r}" in err


# -- the host to connect to --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "connect"),
    [
        ("0.0.0.0", "127.0.0.1"),
        ("", "127.0.0.1"),
        ("::", "[::1]"),
        ("[::]", "[::1]"),
        ("::1", "[::1]"),
        ("[::1]", "[::1]"),
        ("fd00::7", "[fd00::7]"),
        ("127.0.0.1", "127.0.0.1"),
        ("10.1.2.3", "10.1.2.3"),
        ("node-7.example", "node-7.example"),
        ("localhost", "localhost"),
    ],
)
def test_connect_host(host: str, connect: str) -> None:
    assert connect_host(host) == connect
    assert http_url(host, 7070) == f"http://{connect}:7070"


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("127.0.0.1:7070", "http://127.0.0.1:7070"),
        ("0.0.0.0:8000", "http://127.0.0.1:8000"),
        ("[::]:7070", "http://[::1]:7070"),
        ("[::1]:7071", "http://[::1]:7071"),
        ("hive.local:7070", "http://hive.local:7070"),
    ],
)
def test_config_api_url(listen: str, url: str) -> None:
    assert Config(listen=listen).api_url == url


# -- pydantic errors in hive's words -----------------------------------------------------------


class _Either(BaseModel):
    x: int | list[int]


def _error(model: type[BaseModel], data: dict[str, Any]) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(data)
    return caught.value


def test_field_errors_names_each_field_and_drops_the_value_error_prefix() -> None:
    exc = _error(SpawnRequest, {"model": "-m", "gpus": 0})
    assert field_errors(exc, top="body") == [
        ("model", "must not start with '-' (it would be read as an option)"),
        ("gpus", "must be at least 1"),
    ]


def test_field_errors_of_the_whole_input_name_the_field_their_message_starts_with() -> None:
    exc = _error(Config, {"default_backend": "nope"})
    assert field_errors(exc, top="(top level)") == [
        ("default_backend", "'nope' is not a configured backend")
    ]


def test_field_errors_keeps_or_drops_the_names_of_union_arms() -> None:
    exc = _error(Config, {"backends": {"demo": {"gpu": 5}}})  # gpu: bool | "optional" | "auto"
    assert [field for field, _ in field_errors(exc, top="", drop_type_tags=False)] == [
        "backends.demo.gpu.bool",
        "backends.demo.gpu.literal['optional','auto']",
    ]
    assert field_errors(exc, top="") == [
        ("backends.demo.gpu", "must be true or false, or 'optional' or 'auto'")
    ]
    # A list index is part of the field, not a type tag.
    exc = _error(SpawnRequest, {"model": "m", "args": ["ok", "a\nb"]})
    assert field_errors(exc, top="body") == [("args.1", "must not contain NUL or line breaks")]


def test_the_api_says_each_field_once() -> None:
    exc = _error(SpawnRequest, {"model": "m", "port": 1, "env": {"1A": "x"}, "extra": 1})
    message, fields = validation_message(exc)
    assert message == (
        "port: must be at least 1024; "
        "env: '1A' is not a valid environment variable name; "
        "extra: unknown key"
    )
    assert [f["field"] for f in fields] == ["port", "env", "extra"]
    assert validation_message(_error(Heartbeat, {}))[0] == "state: is required"
    # Both arms of a union fail: one entry, one sentence.
    message, fields = validation_message(_error(_Either, {"x": "a"}))
    assert message == "x: must be a whole number, or a list"
    assert fields == [{"field": "x", "message": message.removeprefix("x: ")}]
    exc = _error(Config, {"backends": {"demo": {"gpu": 5}}})
    assert [f["field"] for f in validation_message(exc)[1]] == ["backends.demo.gpu"]


def test_a_config_file_error_names_the_file_and_each_key() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config('listen = "x"\nstop_timeout = 0\n', "/etc/hive.toml")
    assert str(caught.value) == (
        "/etc/hive.toml: listen: must be HOST:PORT, got 'x'\n"
        "/etc/hive.toml: stop_timeout: must be more than 0"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config('default_backend = "nope"\n', "h.toml")
    assert str(caught.value) == "h.toml: default_backend: 'nope' is not a configured backend"


def test_serve_names_a_bad_listen_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HIVE_CONFIG", raising=False)
    config = tmp_path / "hive.toml"
    config.write_text("")
    assert main(["serve", "--config", str(config), "--listen", "nowhere"]) == 1
    assert capsys.readouterr().err == "hive: --listen: must be HOST:PORT, got 'nowhere'\n"


# -- the log marker ----------------------------------------------------------------------------


def test_marker_lines_are_hives_own(tmp_path: Path) -> None:
    logs = Logs(tmp_path, 1 << 20)
    with logs.path("w").open("a") as log:
        log.write("loading\n")
    logs.mark("w", "attempt 1: python -m demo")
    with logs.path("w").open("a") as log:
        log.write("serving on 18000\n")
    logs.mark("w", "stopped: exited with code 0")
    lines = logs.tail("w", 10).splitlines()
    assert [line.startswith(MARKER) for line in lines] == [False, True, False, True]
    assert lines[1].endswith(" attempt 1: python -m demo")
    assert MARKER == "--- hive: "  # the docs and README show it; workers' logs are read by people
    assert logs.last_line("w") == "serving on 18000"  # the worker's, never a marker


def test_a_quiet_log_is_looked_at_every_quarter_second_a_fast_one_sooner(tmp_path: Path) -> None:
    logs = Logs(tmp_path, max_bytes=100_000)  # truncated past 50,000 bytes
    path = logs.path("w")
    path.write_text("")
    assert logs.cap("w", now=0.0) == 0.005  # first look: soon again, to learn its rate
    # It did not grow: looked at less and less often, the period doubling up to 0.25 s.
    periods = [logs.cap("w", now=float(second)) for second in range(1, 8)]
    assert periods == [0.01, 0.02, 0.04, 0.08, 0.16, 0.25, 0.25]
    path.write_text("x" * 1_000)  # 1,000 bytes in 10 s: 49 s from the threshold
    assert logs.cap("w", now=17.0) == 0.25
    path.write_text("x" * 41_000)  # 40,000 bytes in 0.1 s: 9,000 left, 22.5 ms away
    assert logs.cap("w", now=17.1) == pytest.approx(0.01125)
    path.write_text("x" * 60_000)  # past the threshold: its last half cap kept aside
    assert logs.cap("w", now=17.2) == pytest.approx(0.0225)  # at most twice the last period
    assert path.stat().st_size == 0 and (tmp_path / "w.log.1").stat().st_size == 50_000


async def test_figures_are_refreshed_only_while_someone_reads_them() -> None:
    registry = Registry()
    placer = Placer([], GpuSnapshot)
    usage = Usage(registry, placer, GpuSnapshot, interval=0.05)
    usage.start()
    try:
        assert usage._watched()  # the first three periods after start
        usage._read_at -= usage.watched_for + 1  # nobody has read them for longer
        assert not usage._watched()  # and no GPU in use: the loop reads nothing
        assert usage._wake is not None and not usage._wake.is_set()
        usage.wanted()  # a list, a record or a scrape
        assert usage._watched() and usage._wake.is_set()  # refreshed now, then every interval
    finally:
        await usage.close()


# -- the probes' tick --------------------------------------------------------------------------


async def test_probes_due_in_one_tick_wake_together() -> None:
    # Twenty probe loops that began 5 ms apart just after a tick, each sleeping its period of
    # 0.6 s: all are due within the same later tick, so they wake in one loop pass, on that
    # tick, and none before its period has passed (on their own, each 5 ms after the last).
    loop = asyncio.get_running_loop()
    now = loop.time()
    await asyncio.sleep(math.ceil(now / 0.5) * 0.5 - now + 0.001)
    woke: list[tuple[float, float]] = []

    async def probe(begun: float) -> None:
        await sleep_to_tick(0.6, tick=0.5)
        woke.append((begun, loop.time()))

    tasks = []
    for _ in range(20):
        tasks.append(asyncio.create_task(probe(loop.time())))
        await asyncio.sleep(0.005)
    await asyncio.gather(*tasks)
    begun = sorted(b for b, _ in woke)
    assert begun[-1] - begun[0] < 0.39, "the loop was too slow to start them within one tick"
    assert all(at >= b + 0.6 for b, at in woke)
    times = sorted(at for _, at in woke)
    assert times[-1] - times[0] < 0.005, times


async def test_a_period_shorter_than_the_tick_is_not_stretched_to_it() -> None:
    # Begun just after a tick: stretched to the half-second tick it would sleep ~0.5 s; as its
    # own tick, at most twice its period.
    loop = asyncio.get_running_loop()
    now = loop.time()
    await asyncio.sleep(math.ceil(now / 0.5) * 0.5 - now + 0.001)
    begun = loop.time()
    await sleep_to_tick(0.05, tick=0.5)
    assert 0.05 <= loop.time() - begun < 0.25

"""Engine load reports (hive.load), the load-related backend settings, and the launch
placeholders for a worker's share of GPU memory and its engine's environment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from records import record

from hive.config import BackendConfig, Config, ConfigError, LoadConfig, parse_config
from hive.models import Entry, SpawnRequest, State, Worker
from hive.state.registry import Registry
from hive.workers.engine_load import Load, LoadError, parse
from hive.workers.launch import build_launch, memory_fraction

LLAMA = LoadConfig(path="/slots", format="llama-server")
SGLANG = LoadConfig(path="/v1/loads?include=core", format="sglang")
VLLM = LoadConfig(
    path="/metrics",
    format="prometheus",
    running=["vllm:num_requests_running"],
    waiting=["vllm:num_requests_waiting"],
)

#: Two slots as llama-server's /slots answers them (fields trimmed), one of them working.
SLOTS = b"""[
 {"id": 0, "id_task": 12, "n_ctx": 128, "is_processing": true, "params": {"n_predict": -1}},
 {"id": 1, "id_task": -1, "n_ctx": 128, "is_processing": false, "params": {"n_predict": -1}}
]"""

#: vLLM's /metrics, in part: one engine serving one model name, and a second engine.
METRICS = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="org/m"} 3.0
vllm:num_requests_running{engine="1",model_name="org/m"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="org/m"} 2.0
vllm:num_requests_running_total_bogus 99
python_gc_objects_collected_total{generation="0"} 1234.0
"""


def test_llama_server_slots_count_the_ones_processing() -> None:
    assert parse(LLAMA, SLOTS) == Load(running=1, waiting=0)
    assert parse(LLAMA, b"[]").in_flight == 0


def test_sglang_load_sums_the_ranks() -> None:
    # SGLang 0.5's /v1/loads (fields trimmed).
    loads = (
        b'{"timestamp": "2026-12-02T00:00:00", "version": "0.5.23", "num_accelerators": 2,'
        b' "loads": [{"dp_rank": 0, "num_running_reqs": 4, "num_waiting_reqs": 3,'
        b' "token_usage": 0.2, "memory": {"kv_cache_gb": 40}},'
        b' {"dp_rank": 1, "num_running_reqs": 1, "num_waiting_reqs": 0}]}'
    )
    assert parse(SGLANG, loads) == Load(running=5, waiting=3)
    # The older /get_load.
    body = (
        b'[{"dp_rank": 0, "num_reqs": 2, "num_waiting_reqs": 1, "num_tokens": 90},'
        b' {"dp_rank": 1, "num_reqs": 3, "num_waiting_reqs": 0, "num_tokens": 10}]'
    )
    assert parse(SGLANG, body) == Load(running=5, waiting=1)
    assert parse(SGLANG, b'{"num_reqs": 1}') == Load(running=1)


def test_prometheus_sums_every_label_set_of_the_named_metrics() -> None:
    load = parse(VLLM, METRICS)
    assert load == Load(running=4, waiting=2)
    assert load.in_flight == 6
    no_waiting = parse(VLLM, b"vllm:num_requests_running 1\n")
    assert no_waiting == Load(running=1, waiting=0)


@pytest.mark.parametrize(
    ("config", "body", "message"),
    [
        (LLAMA, b"<html>", "/slots did not answer JSON"),
        (LLAMA, b'{"error": "slots disabled"}', "/slots did not answer a list of slots"),
        (SGLANG, b'[{"load": 1}]', "/v1/loads.include=core did not answer SGLang's load"),
        (SGLANG, b'{"loads": [{"num_running_reqs": "4"}]}', "did not answer SGLang's load"),
        (VLLM, b"process_cpu_seconds_total 4.5\n", "/metrics has no sample of vllm:num_requests"),
        (VLLM, b"vllm:num_requests_running NaN\n", "/metrics has no sample of"),
    ],
)
def test_an_answer_that_is_not_a_load_report_is_an_error(
    config: LoadConfig, body: bytes, message: str
) -> None:
    with pytest.raises(LoadError, match=message):
        parse(config, body)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('path = "slots"\nformat = "llama-server"', "load.path: must start with '/'"),
        ('path = "/metrics"\nformat = "prometheus"', "running: name the metric"),
        ('path = "/slots"\nformat = "llama-server"\nrunning = ["x"]', "for format"),
        ('path = "/slots"\nformat = "slots"', "load.format"),
        ('path = "/slots"\nformat = "llama-server"\nperiod = 0', "load.period"),
    ],
)
def test_a_bad_load_table_names_the_key(table: str, message: str) -> None:
    text = f'[backends.x]\ncommand = ["x"]\n[backends.x.load]\n{table}\n'
    with pytest.raises(ConfigError, match=message):
        parse_config(text, "hive.toml")


def test_the_builtin_engines_say_where_their_load_is() -> None:
    backends = Config().backends
    assert backends["llama-server"].load == LLAMA
    assert backends["sglang"].load == SGLANG
    assert backends["demo"].load == SGLANG
    assert backends["vllm"].load is not None
    assert backends["vllm"].load.running == ["vllm:num_requests_running"]


# -- the registry: busy from the engine --------------------------------------------------------


def test_engine_load_drives_ready_and_busy_and_tells_only_state_changes() -> None:
    reg = Registry()
    fields = worker(state=State.STARTING).model_dump(exclude={"state", "created_at"})
    reg.add(SpawnRequest(model="m"), "tok", lambda entries: fields)
    assert reg.engine_load("w", 2) is None  # starting: not the engine's to change
    reg.became_ready("w")
    heard: list[tuple[State | None, State | None]] = []
    reg.subscribe(lambda change: heard.append((change.from_, change.to)))
    busy = reg.engine_load("w", 2)
    assert busy is not None and (busy.state, busy.in_flight) == (State.BUSY, 2)
    assert reg.get("w").in_flight == 2
    reg.engine_load("w", 5)
    assert reg.get("w").in_flight == 5
    ready = reg.engine_load("w", 0)
    assert ready is not None and (ready.state, ready.in_flight) == (State.READY, 0)
    assert heard == [(State.READY, State.BUSY), (State.BUSY, State.READY)]


# -- launch: a share of GPU memory, an engine's own environment -------------------------------


def worker(**fields: Any) -> Worker:
    """A starting vLLM record on GPU-0 (test_policies' record, with these fields)."""
    return record(**{"backend": "vllm", "device": "GPU-0", "state": State.STARTING, **fields})


def test_memory_fraction_rounds_down_so_the_engine_stays_in_its_share() -> None:
    assert memory_fraction(20_000, 143_771) == "0.139"
    assert memory_fraction(40_960, 81_920) == "0.500"
    assert memory_fraction(90_000, 81_920) == "1.000"
    assert memory_fraction(None, 81_920) == memory_fraction(1000, None) == ""


def test_share_args_only_for_a_worker_given_a_share(tmp_path: Path) -> None:
    backends = Config().backends
    vllm, sglang = backends["vllm"], backends["sglang"]
    share = SpawnRequest(model="org/m", device="GPU-0", gpu_memory_mib=20_000)
    on_gpu = Entry(worker(gpus=["GPU-u0"]), share, "t")
    argv = build_launch(on_gpu, vllm, Config(), "u", tmp_path, {}, gpu_total_mib=143_771).argv
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.139"
    argv = build_launch(on_gpu, sglang, Config(), "u", tmp_path, {}, gpu_total_mib=81_920).argv
    assert argv[argv.index("--mem-fraction-static") + 1] == "0.244"
    whole = Entry(worker(gpus=["GPU-u0"]), SpawnRequest(model="org/m", device="GPU-0"), "t")
    argv = build_launch(whole, vllm, Config(), "u", tmp_path, {}, gpu_total_mib=143_771).argv
    assert "--gpu-memory-utilization" not in argv


def test_the_model_id_the_router_sees_is_the_spawned_model(tmp_path: Path) -> None:
    backends = Config().backends
    spec = SpawnRequest(model="org/m")
    for name, flag in [
        ("vllm", "--served-model-name"),
        ("sglang", "--served-model-name"),
        ("llama-server", "--alias"),
    ]:
        entry = Entry(worker(backend=name), spec, "t")
        argv = build_launch(entry, backends[name], Config(), "u", tmp_path, {}).argv
        assert argv[argv.index(flag) + 1] == "org/m", name


def test_a_backend_venv_gives_the_interpreter_and_comes_first_on_path(tmp_path: Path) -> None:
    venv = tmp_path / "engine-venv"
    (venv / "bin").mkdir(parents=True)
    for name in ("python", "vllm"):
        (venv / "bin" / name).write_text("#!/bin/sh\n")
        (venv / "bin" / name).chmod(0o755)
    entry = Entry(worker(backend="x"), SpawnRequest(model="m"), "t")
    env = {"PATH": "/usr/bin:/bin"}
    python = BackendConfig(command=["{python}", "-m", "engine"], venv=venv)
    launch = build_launch(entry, python, Config(), "u", tmp_path, env)
    assert launch.argv[0] == str(venv / "bin" / "python")
    assert launch.env["PATH"] == f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin"
    assert launch.env["VIRTUAL_ENV"] == str(venv)
    script = BackendConfig(command=["vllm", "serve", "{model}"], venv=venv)
    assert build_launch(entry, script, Config(), "u", tmp_path, env).argv[0] == str(
        venv / "bin" / "vllm"
    )
    missing = BackendConfig(command=["no-such-engine"], venv=venv)
    assert build_launch(entry, missing, Config(), "u", tmp_path, env).argv[0] == "no-such-engine"

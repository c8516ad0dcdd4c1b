"""The supervisor's policies as plain functions, without a daemon: the restart back-off, the
launch's argv and environment, and the registry's named writes."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from records import record

from hive.config import BackendConfig, Config
from hive.errors import NoCapacity
from hive.models import Entry, SpawnRequest, State, Worker
from hive.state.registry import Figures, IllegalTransition, Registry, now
from hive.workers.launch import SCRUBBED_ENV, build_launch
from hive.workers.ports import PortPool, ephemeral_overlap, port_is_free
from hive.workers.restart import Backoff, Outcome, next_delay

CONFIG = Config(restart_delay=1, restart_delay_max=8, restart_reset_after=100)


# -- the restart back-off ----------------------------------------------------------------------


def test_back_off_doubles_up_to_the_cap() -> None:
    backoff, delays = Backoff(), []
    for _ in range(6):
        decision = next_delay(Outcome.FAILED, record(), CONFIG, backoff, now=0.0)
        assert decision.delay is not None and decision.gave_up is None
        delays.append(decision.delay)
        backoff = decision.backoff
    assert delays == [1, 2, 4, 8, 8, 8]


def test_back_off_resets_after_a_stable_attempt() -> None:
    backoff = Backoff(delay=8, ready_since=10.0)
    assert next_delay(Outcome.FAILED, record(), CONFIG, backoff, now=109.0).delay == 8
    assert next_delay(Outcome.FAILED, record(), CONFIG, backoff, now=110.0).delay == 1


@pytest.mark.parametrize(
    ("policy", "outcome", "restarts"),
    [
        ("no", Outcome.FAILED, False),
        ("on-failure", Outcome.FAILED, True),
        ("on-failure", Outcome.EXITED, False),
        ("always", Outcome.EXITED, True),
        ("always", Outcome.STOPPED, False),
    ],
)
def test_the_policy_decides(policy: str, outcome: Outcome, restarts: bool) -> None:
    decision = next_delay(outcome, record(restart=policy), CONFIG, Backoff(), now=0.0)
    assert (decision.delay is not None) is restarts


def test_a_worker_asked_to_stop_is_never_restarted() -> None:
    worker = record(restart="always", desired="stopped")
    assert next_delay(Outcome.FAILED, worker, CONFIG, Backoff(), now=0.0).delay is None


def test_max_restarts_gives_up_and_says_why() -> None:
    config = CONFIG.model_copy(update={"max_restarts": 3})
    assert next_delay(Outcome.FAILED, record(restarts=2), config, Backoff(), 0.0).delay == 1
    decision = next_delay(
        Outcome.FAILED, record(restarts=3, error="exited with code 1"), config, Backoff(), 0.0
    )
    assert decision.delay is None
    assert decision.gave_up == "exited with code 1; gave up after 3 restarts"


# -- the launch --------------------------------------------------------------------------------


def entry(spec: SpawnRequest, **fields: Any) -> Entry:
    return Entry(record(state=State.STARTING, **fields), spec, "the-token")


def test_launch_fills_placeholders_and_appends_args(tmp_path: Path) -> None:
    backend = BackendConfig(command=["serve", "{model}", "--port", "{port}", "-t", "{ncpus}"])
    spec = SpawnRequest(model="org/m", args=["--extra", "1"])
    launch = build_launch(
        entry(spec, cpus=[0, 1, 2]), backend, CONFIG, "http://hive", tmp_path / "w.log", {}
    )
    assert launch.argv == ["serve", "org/m", "--port", "18000", "-t", "3", "--extra", "1"]
    assert launch.log_path == tmp_path / "w.log"
    assert launch.cpus == frozenset({0, 1, 2})


def test_launch_environment_layers_and_scrubs(tmp_path: Path) -> None:
    backend = BackendConfig(command=["x"], env={"A": "backend", "B": "backend"})
    spec = SpawnRequest(model="m", env={"B": "request"}, cpus=2)
    inherited = {name: "hive's" for name in SCRUBBED_ENV} | {"PATH": "/bin", "A": "host"}
    launch = build_launch(
        entry(spec, cpus=[4, 5], gpus=["GPU-u1", "GPU-u2"]),
        backend,
        CONFIG,
        "http://127.0.0.1:7070",
        tmp_path / "w.log",
        inherited,
    )
    env = launch.env
    assert not set(SCRUBBED_ENV) & set(env)
    assert (env["PATH"], env["A"], env["B"]) == ("/bin", "backend", "request")
    assert env["HIVE_WORKER_ID"] == "w"
    assert env["HIVE_WORKER_TOKEN"] == "the-token"
    assert env["HIVE_URL"] == "http://127.0.0.1:7070"
    assert env["HIVE_HEARTBEAT_INTERVAL"] == "5"
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-u1,GPU-u2"
    assert env["OMP_NUM_THREADS"] == "2"


def test_launch_without_cores_leaves_affinity_and_threads_alone(tmp_path: Path) -> None:
    launch = build_launch(
        entry(SpawnRequest(model="m")), BackendConfig(command=["x"]), CONFIG, "u", tmp_path, {}
    )
    assert launch.cpus is None
    assert "OMP_NUM_THREADS" not in launch.env
    assert launch.env["CUDA_VISIBLE_DEVICES"] == ""


# -- the registry's named writes ---------------------------------------------------------------


def fresh(reg: Registry, wid: str = "w") -> Worker:
    fields = record(id=wid).model_dump(exclude={"state", "created_at"})
    return reg.add(SpawnRequest(model="m"), "tok", lambda entries: fields)


def test_a_misspelled_field_is_an_error_at_the_call() -> None:
    reg = Registry()
    fresh(reg)
    with pytest.raises(ValueError, match="no field 'in_fligth'"):
        reg.update("w", in_fligth=3)
    with pytest.raises(ValueError, match="no field"):
        reg.transition("w", State.READY, redy_at=now())
    with pytest.raises(ValueError, match="no field"):
        reg.update_many({"w": {"rss": 1}})
    assert reg.get("w").state == State.STARTING


def test_an_attempt_ends_once_and_clears_what_the_process_held() -> None:
    reg = Registry()
    fresh(reg)
    reg.attempt_started("w", 4242)
    reg.record_usage({"w": Figures(rss_bytes=10, cpu_percent=1.5, gpu_memory_used_mib=7)})
    reg.heartbeat("w", State.BUSY, in_flight=2)
    ended = reg.attempt_ended("w", State.FAILED, exit_code=3, error="exited with code 3")
    assert ended is not None
    assert (ended.state, ended.pid, ended.exit_code, ended.in_flight) == (
        State.FAILED,
        None,
        3,
        None,
    )
    assert (ended.rss_bytes, ended.cpu_percent, ended.gpu_memory_used_mib) == (None, None, None)
    assert ended.stopped_at is not None
    # A second end (a stop racing a crash) changes nothing.
    assert reg.attempt_ended("w", State.STOPPED, exit_code=0, error=None) is None
    assert reg.get("w") is ended
    with pytest.raises(ValueError):
        reg.attempt_ended("w", State.READY, exit_code=None, error=None)


def test_a_heartbeat_makes_a_starting_worker_ready_then_busy() -> None:
    reg = Registry()
    fresh(reg)
    heard: list[tuple[State | None, State | None]] = []
    reg.subscribe(lambda change: heard.append((change.from_, change.to)))
    busy = reg.heartbeat("w", State.BUSY, in_flight=1)
    assert busy.state == State.BUSY and busy.ready_at is not None and busy.in_flight == 1
    assert heard == [(State.STARTING, State.READY), (State.READY, State.BUSY)]
    assert reg.heartbeat("w", State.BUSY, in_flight=4).in_flight == 4
    assert len(heard) == 2


def test_begin_attempt_only_from_a_resting_state() -> None:
    reg = Registry()
    fresh(reg)
    with pytest.raises(IllegalTransition):
        reg.begin_attempt("w", lambda entries: {}, restarts=1)
    reg.attempt_ended("w", State.FAILED, exit_code=1, error="boom")
    reg.restart_due("w", now())
    again = reg.begin_attempt("w", lambda entries: {"port": 18001}, restarts=1)
    assert (again.state, again.port, again.restarts) == (State.STARTING, 18001, 1)
    assert (again.error, again.exit_code, again.next_restart_at) == (None, None, None)


def test_desired_stopped_cancels_a_due_restart() -> None:
    reg = Registry()
    fresh(reg)
    reg.attempt_ended("w", State.FAILED, exit_code=1, error="boom")
    reg.restart_due("w", now())
    stopped = reg.set_desired("w", "stopped")
    assert (stopped.desired, stopped.next_restart_at) == ("stopped", None)
    assert reg.set_desired("w", "stopped") is stopped


def test_router_status_merges_per_router_and_ignores_a_forgotten_worker() -> None:
    reg = Registry()
    fresh(reg)
    reg.router_status("w", "http://r1", "registered")
    reg.router_status("w", "http://r2", "pending: HTTP 503")
    assert reg.get("w").routers == {"http://r1": "registered", "http://r2": "pending: HTTP 503"}
    assert reg.router_status("ghost", "http://r1", "registered") is None


# -- ports -------------------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["::1", "::", "127.0.0.1"])
def test_a_port_held_by_a_foreign_listener_is_skipped(address: str) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        foreign = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        pytest.skip(f"no {family.name} here")
    with foreign:
        if family == socket.AF_INET6:
            foreign.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        foreign.bind((address, 0))
        foreign.listen()
        held = foreign.getsockname()[1]
        assert not port_is_free(held)
        with pytest.raises(NoCapacity):  # the range's only port is taken: it is skipped
            PortPool(held, held).allocate({}, "w")
    assert port_is_free(held)


def test_a_command_that_cannot_run_is_not_retried_whatever_the_policy() -> None:
    worker = record(restart="always", error="cannot start 'x': No such file or directory")
    decision = next_delay(Outcome.UNRUNNABLE, worker, CONFIG, Backoff(), now=0.0)
    assert decision.delay is None
    assert decision.gave_up == (
        "cannot start 'x': No such file or directory; not retried: fix the backend's command"
    )


def test_a_port_range_among_the_ephemeral_ports_is_named(tmp_path: Path) -> None:
    source = tmp_path / "ip_local_port_range"
    source.write_text("32768\t60999\n")
    why = ephemeral_overlap(33000, 33999, source)
    assert why is not None and "overlaps the ephemeral ports 32768-60999" in why
    assert ephemeral_overlap(18000, 18999, source) is None
    assert ephemeral_overlap(20000, 32768, source) is not None  # one port in common is enough
    assert ephemeral_overlap(18000, 18999, tmp_path / "missing") is None

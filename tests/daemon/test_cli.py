"""The installed ``hive`` command, run as a subprocess against a real daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest
from hivetest import Hive

from harness.waits import wait_for

pytestmark = pytest.mark.timeout(120)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def failed(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].strip(), result.stderr
    return result.stderr


def test_spawn_list_show_logs_stop_rm(hive: Hive) -> None:
    out = ok(hive.cli("spawn", "tiny-model", "--id", "cli-a", "--label", "team=x"))
    assert "cli-a ready" in out and "http://127.0.0.1:" in out

    listing = ok(hive.cli("list"))
    header, *rows = listing.splitlines()
    assert header.split()[:5] == ["ID", "MODEL", "BACKEND", "ROLE", "DEVICE"]
    row = next(r for r in rows if r.startswith("cli-a "))
    assert "tiny-model" in row and "demo" in row and "ready" in row

    data = json.loads(ok(hive.cli("list", "--json", "--state", "ready")))
    assert [w["id"] for w in data["workers"]] == ["cli-a"] and data["total"] == 1
    assert json.loads(ok(hive.cli("list", "--json", "--model", "other")))["total"] == 0

    shown = ok(hive.cli("show", "cli-a"))
    assert "state" in shown and "ready" in shown and "team=x" in shown
    record = json.loads(ok(hive.cli("show", "cli-a", "--json")))
    assert record["labels"] == {"team": "x"} and psutil.pid_exists(record["pid"])

    logs = ok(hive.cli("logs", "cli-a", "-n", "20"))
    assert "ready_at=" in logs

    out = ok(hive.cli("stop", "cli-a"))
    assert "cli-a stopped" in out
    assert not psutil.pid_exists(record["pid"])
    assert json.loads(ok(hive.cli("show", "cli-a", "--json")))["state"] == "stopped"

    ok(hive.cli("rm", "cli-a"))
    failed(hive.cli("show", "cli-a"))


def test_spawn_passes_args_after_double_dash(hive: Hive) -> None:
    ok(hive.cli("spawn", "m", "--id", "cli-args", "--", "--latency-ms", "7"))
    record = json.loads(ok(hive.cli("show", "cli-args", "--json")))
    assert psutil.Process(record["pid"]).cmdline()[-2:] == ["--latency-ms", "7"]
    ok(hive.cli("rm", "--force", "cli-args"))


def test_spawn_failure_shows_error_and_log_tail(hive: Hive) -> None:
    result = hive.cli(
        "spawn", "m", "--id", "cli-dies", "--restart", "no", "--", "--fail-after", "0"
    )
    err = failed(result)
    assert "exited with code 3" in err
    assert "simulated failure" in err
    assert "last lines of cli-dies's log" in err
    ok(hive.cli("rm", "cli-dies"))


def test_no_wait_restart_and_stop_all(hive: Hive) -> None:
    out = ok(hive.cli("spawn", "m", "--id", "cli-b", "--no-wait"))
    assert "cli-b starting" in out
    ok(hive.cli("spawn", "m", "--id", "cli-c"))
    first = json.loads(ok(hive.cli("show", "cli-c", "--json")))["pid"]
    out = ok(hive.cli("restart", "cli-c"))
    assert "cli-c ready" in out
    again = json.loads(ok(hive.cli("show", "cli-c", "--json")))
    assert again["pid"] != first and again["restarts"] == 1

    out = ok(hive.cli("stop", "--all"))
    assert "cli-b stopped" in out and "cli-c stopped" in out
    states = {w["id"]: w["state"] for w in json.loads(ok(hive.cli("list", "--json")))["workers"]}
    assert states["cli-b"] == "stopped" and states["cli-c"] == "stopped"
    ok(hive.cli("rm", "cli-b", "cli-c"))
    empty = hive.cli("list")
    assert (empty.returncode, empty.stdout, empty.stderr) == (0, "", "hive: no workers\n")


def test_rm_refuses_a_running_worker_without_force(hive: Hive) -> None:
    ok(hive.cli("spawn", "m", "--id", "cli-run"))
    err = failed(hive.cli("rm", "cli-run"))
    assert "--force" in err
    assert json.loads(ok(hive.cli("show", "cli-run", "--json")))["state"] == "ready"
    ok(hive.cli("rm", "--force", "cli-run"))
    failed(hive.cli("show", "cli-run"))


def test_logs_follow_ends_when_the_worker_stops(hive: Hive) -> None:
    ok(hive.cli("spawn", "m", "--id", "cli-f"))
    env = {**hive.env, "HIVE_URL": f"unix://{hive.socket}"}
    hive_cmd = [os.path.join(os.path.dirname(sys.executable), "hive")]
    follower = subprocess.Popen(
        [*hive_cmd, "logs", "-f", "cli-f"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        ok(hive.cli("stop", "cli-f"))
        out, _ = follower.communicate(timeout=30)
        assert follower.returncode == 0
        assert "ready_at=" in out
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    ok(hive.cli("rm", "cli-f"))


def test_devices_and_status(hive: Hive) -> None:
    out = ok(hive.cli("devices"))
    assert out.splitlines()[0].split()[:3] == ["CPU", "CORES", "MEMORY"]
    assert "CPU-0" in out and "GPUs: none" in out
    data = json.loads(ok(hive.cli("devices", "--json")))
    assert data["gpus"] == [] and data["cpus"][0]["id"] == "CPU-0"
    out = ok(hive.cli("status"))
    assert out.startswith("hive ") and "workers" in out
    # Where hive answers, so nobody has to guess the socket's path.
    assert f"api      {hive.url} and unix socket {hive.socket}" in out
    node = json.loads(ok(hive.cli("status", "--json")))
    assert node["devices"]["cpus"] >= 1
    assert (node["api_url"], node["socket"]) == (hive.url, str(hive.socket))


def test_tcp_with_and_without_token(hive: Hive) -> None:
    tcp = {"HIVE_URL": hive.url}
    ok(hive.cli("list", env={**tcp, "HIVE_TOKEN": hive.token}))
    ok(hive.cli("--url", hive.url, "--token", hive.token, "status"))
    ok(hive.cli("status", "--url", hive.url, "--token", hive.token))  # global after subcommand
    err = failed(hive.cli("list", env={**tcp, "HIVE_TOKEN": "wrong"}))
    assert "token" in err.lower()


def test_serve_refuses_client_options(hive: Hive) -> None:
    err = failed(hive.cli("--url", hive.url, "serve"), code=2)
    assert "hive serve takes --listen and --socket" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["spawn"],
        ["spawn", "m", "--label", "novalue"],
        ["spawn", "m", "--cpus", "a-b"],
        ["spawn", "m", "--restart", "sometimes"],
        ["list", "--state", "sleeping"],
        ["stop"],
        ["stop", "x", "--all"],
        ["logs", "x", "-n", "-3"],
        ["list", "--", "x"],
    ],
)
def test_usage_errors_exit_2(hive: Hive, argv: list[str]) -> None:
    result = hive.cli(*argv)
    failed(result, code=2)


def test_refused_spawn_exits_1_with_the_field(hive: Hive) -> None:
    err = failed(hive.cli("spawn", "m", "--device", "gpu"))
    assert "GPU" in err
    err = failed(hive.cli("show", "nobody"))
    assert "nobody" in err
    ids = [w["id"] for w in json.loads(ok(hive.cli("list", "--json")))["workers"]]
    assert all(w.startswith(("cli-", "t")) for w in ids)


ID_RULE = "must be 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--cpus", "0"], "hive: --cpus: must be a count of at least 1, or a list of core ids"),
        (
            ["--device", "TPU-0"],
            "hive: --device: must be auto, cpu, gpu, CPU-<n>, GPU-<n> or a GPU UUID",
        ),
        (["--id", "Qwen-A"], f"hive: --id: {ID_RULE}"),
        (["--id", "Bad Id"], f"hive: --id: {ID_RULE}"),
        (["--gpu-memory", "0"], "hive: --gpu-memory: must be at least 1"),
    ],
)
def test_spawn_says_what_a_field_may_be_before_sending(
    hive: Hive, argv: list[str], line: str
) -> None:
    err = failed(hive.cli("spawn", "m", *argv), code=2)
    assert err.strip() == line
    ids = [w["id"] for w in json.loads(ok(hive.cli("list", "--json")))["workers"]]
    assert "Qwen-A" not in ids and "Bad Id" not in ids


def test_stop_and_rm_report_each_id_and_how_many_succeeded(hive: Hive) -> None:
    ok(hive.cli("spawn", "m", "--id", "cli-each"))
    result = hive.cli("stop", "cli-each", "nosuch")
    err = failed(result)
    assert result.stdout == "cli-each stopped\n"
    assert err.splitlines() == [
        "hive: nosuch: no such worker",
        "hive: stopped 1 of 2 workers; 1 failed",
    ]
    result = hive.cli("rm", "cli-each", "nosuch")
    err = failed(result)
    assert result.stdout == "cli-each removed\n"
    assert err.splitlines()[-1] == "hive: removed 1 of 2 workers; 1 failed"
    failed(hive.cli("show", "cli-each"))


@pytest.mark.parametrize(
    ("argv", "env", "source"),
    [
        (["--url", "localhost:7070"], {}, "--url 'localhost:7070'"),
        ([], {"HIVE_URL": "localhost:7070"}, "HIVE_URL 'localhost:7070'"),
        ([], {"HIVE_URL": "ftp://x"}, "HIVE_URL 'ftp://x'"),
    ],
)
def test_a_url_hive_cannot_use_is_a_usage_error_naming_its_source(
    hive: Hive, argv: list[str], env: dict[str, str], source: str
) -> None:
    err = failed(hive.cli(*argv, "list", env=env), code=2)
    assert err.strip() == (
        f"hive: {source} is not a hive URL: use http://HOST:PORT, https://HOST:PORT "
        "or unix:///path/to/hive.sock"
    )


def test_unreachable_hive_is_one_line(hive: Hive) -> None:
    err = failed(hive.cli("list", env={"HIVE_URL": "http://127.0.0.1:9"}))
    assert err.strip() == (
        "hive: cannot reach hive at http://127.0.0.1:9 (from HIVE_URL): connection refused; "
        "is it running? start it with: hive serve"
    )


def test_unreachable_by_default_names_the_socket_then_the_url(hive: Hive) -> None:
    config = hive.home / "client.toml"
    config.write_text(f'listen = "127.0.0.1:9"\nsocket = "{hive.home}/none.sock"\n')
    err = failed(hive.cli("list", env={"HIVE_URL": "", "HIVE_CONFIG": str(config)}))
    assert err.strip() == (
        f"hive: cannot reach hive: no socket at {hive.home}/none.sock, and "
        "http://127.0.0.1:9: connection refused; start it with: hive serve, "
        "or point --url or HIVE_URL at a running hive"
    )


def test_a_refused_token_says_where_it_came_from(hive: Hive) -> None:
    tcp = {"HIVE_URL": hive.url}
    fix = "pass the one in hive's token file with --token or HIVE_TOKEN"
    err = failed(hive.cli("list", env={**tcp, "HIVE_TOKEN": "wrong"}))
    assert err.strip() == f"hive: hive refused the token from HIVE_TOKEN (invalid token); {fix}"
    err = failed(hive.cli("list", "--token", "wrong", env=tcp))
    assert "the token from --token (invalid token)" in err
    stale = hive.home / "stale-token"
    stale.write_text("wrong\n")
    config = hive.home / "token-client.toml"
    config.write_text(f'token_file = "{stale}"\n')
    err = failed(hive.cli("list", env={**tcp, "HIVE_CONFIG": str(config)}))
    assert f"the token from {stale} (invalid token)" in err
    config.write_text(f'token_file = "{hive.home}/no-token"\n')
    err = failed(hive.cli("list", env={**tcp, "HIVE_CONFIG": str(config)}))
    assert "none was found" in err and f"{hive.home}/no-token" in err


def test_serve_refuses_a_bad_config(hive: Hive) -> None:
    bad = hive.home / "bad.toml"
    bad.write_text('stop_timeout = "soon"\n')
    err = failed(hive.cli("serve", "--config", str(bad)))
    assert "stop_timeout" in err and str(bad) in err
    err = failed(hive.cli("serve", "--config", str(hive.home / "missing.toml")))
    assert "missing.toml" in err


def test_sigterm_stops_every_worker_and_exits_0() -> None:
    from hivetest import running_hive

    with running_hive() as daemon:
        ok(daemon.cli("spawn", "m", "--id", "t1"))
        ok(daemon.cli("spawn", "m", "--id", "t2", "--no-wait"))
        pids = [json.loads(ok(daemon.cli("show", w, "--json")))["pid"] for w in ("t1", "t2")]
        daemon.signal(signal.SIGTERM)
        assert daemon.proc is not None
        assert daemon.proc.wait(30) == 0
        daemon.proc = None
        wait_for(lambda: not any(psutil.pid_exists(p) for p in pids), 10, what="workers gone")
        assert not daemon.socket.exists()


def test_control_characters_are_shown_escaped(hive: Hive) -> None:
    """A model name or label cannot move the cursor or recolour the operator's terminal."""
    evil = "m\x1b[31mred\x07"
    ok(hive.cli("spawn", evil, "--id", "evil", "--label", "k=v\x1b[2J", "--no-wait"))
    for args in (("list",), ("show", "evil")):
        out = ok(hive.cli(*args))
        assert "\x1b" not in out and "\x07" not in out
        assert "m\\x1b[31mred\\x07" in out
    assert "k=v\\x1b[2J" in ok(hive.cli("show", "evil"))
    ok(hive.cli("rm", "--force", "evil"))


def test_an_interrupted_follow_leaves_no_error_in_hive_log(hive: Hive) -> None:
    ok(hive.cli("spawn", "m", "--id", "followed"))
    follower = subprocess.Popen(
        [*hive.cli_command(), "logs", "followed", "-f"],
        env={**hive.env, "HIVE_URL": f"unix://{hive.socket}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline()  # following
        follower.send_signal(signal.SIGINT)
        follower.wait(30)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    before = hive.log()
    ok(hive.cli("stop", "followed"))  # hive's stop marker: the next line for the gone follower
    ok(hive.cli("rm", "followed"))
    after = hive.log()[len(before) :]
    assert "Traceback" not in after and "Cannot write" not in after, after


def test_kubectl_habits_quiet_wide_yaml_start_and_a_failed_stop(hive: Hive) -> None:
    ok(hive.cli("spawn", "m", "--id", "hab-a", "--label", "team=x"))
    result = hive.cli(
        "spawn", "m", "--id", "hab-dies", "--restart", "no", "--", "--fail-after", "0"
    )
    failed(result)
    assert sorted(ok(hive.cli("ls", "-q")).split()) == ["hab-a", "hab-dies"]

    header, *rows = ok(hive.cli("list", "-o", "wide")).splitlines()
    assert header.split()[-7:] == ["CPU", "RSS", "GPUS", "GPU", "MEM", "LABELS", "ERROR"]
    dies = next(row for row in rows if row.startswith("hab-dies"))
    assert "exited with code 3" in dies
    assert "team=x" in next(row for row in rows if row.startswith("hab-a"))

    yaml_text = ok(hive.cli("show", "hab-a", "-o", "yaml"))
    assert "id: hab-a\n" in yaml_text and "labels:\n  team: x\n" in yaml_text
    assert json.loads(ok(hive.cli("show", "hab-a", "-o", "json")))["id"] == "hab-a"

    out = ok(hive.cli("stop", "hab-dies"))  # not "hab-dies failed", which reads as the stop
    assert out.startswith("hab-dies stopped: it had failed (exited with code 3"), out
    assert out.rstrip().endswith("; hive will not restart it"), out

    assert ok(hive.cli("start", "hab-a")) == "hab-a is already ready\n"
    ok(hive.cli("stop", "hab-a"))
    assert "hab-a ready" in ok(hive.cli("start", "hab-a"))
    ok(hive.cli("rm", "--force", "hab-a", "hab-dies"))

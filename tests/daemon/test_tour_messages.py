"""What a new operator's tour met that needed hive's source to understand (issue 29's last
round): each message here was found by walking the README's tour from a fresh clone, and each
is checked by its exact text, through the installed ``hive`` command against a real hive."""

from __future__ import annotations

from hivetest import Hive

from harness.net import free_port
from harness.waits import wait_for


def test_a_fleet_command_without_etcd_says_so_in_a_sentence(hive: Hive) -> None:
    """Before: ``etcd unreachable: http://...: ClientConnectorError: Cannot connect to host
    127.0.0.1:PORT ssl:default [Connect call failed ('127.0.0.1', PORT)]``."""
    url = f"http://127.0.0.1:{free_port()}"
    result = hive.cli("fleet", "--etcd", url, "ls")
    assert result.returncode == 1
    assert result.stderr == (
        f"hive: etcd unreachable: {url}: connection refused (the URL is from --etcd)\n"
    )
    assert result.stdout == ""


def test_a_fleet_command_at_something_that_is_not_etcd_says_so(hive: Hive) -> None:
    """--etcd at hive's own port (a JSON error of another shape): before, the error's dict was
    printed as Python writes it (``{'code': 'not_found', 'message': 'Not Found'}``)."""
    result = hive.cli("fleet", "--etcd", hive.url, "ls")
    assert result.returncode == 1
    assert result.stderr == (
        f"hive: {hive.url}/v3/kv/range: what answers there is not etcd (HTTP 404)\n"
    )


def test_https_at_a_plain_hive_says_to_use_http(hive: Hive) -> None:
    """Before: ``TLS failed (Cannot connect to host ... [[SSL: WRONG_VERSION_NUMBER] wrong
    version number (_ssl.c:1006)]); for mutual TLS pass this client's --cert and --key; is it
    running? start it with: hive serve``."""
    url = hive.url.replace("http://", "https://")
    result = hive.cli("--url", url, "list")
    assert result.returncode == 1
    assert result.stderr == (
        f"hive: cannot reach hive at {url} (from --url): it does not speak TLS there; if hive "
        "listens without TLS, use an http:// URL\n"
    )


def test_a_name_that_does_not_resolve_is_said_so(hive: Hive) -> None:
    """Before: ``unknown error -2; is it running? start it with: hive serve``."""
    result = hive.cli("--url", "http://nosuch.invalid:7070", "list")
    assert result.returncode == 1
    assert result.stderr.startswith(
        "hive: cannot reach hive at http://nosuch.invalid:7070 (from --url): cannot resolve the "
        "name 'nosuch.invalid' ("
    ), result.stderr
    assert "is it running" not in result.stderr and result.stderr.count("\n") == 1


def test_a_url_at_a_model_server_is_not_taken_for_hive(hive: Hive) -> None:
    """--url at a worker's URL (the URL column of hive list): its OpenAI-style 404 was read as
    hive's, and the CLI printed ``hive: Not Found``."""
    spawned = hive.cli("spawn", "m", "--id", "tour-worker")
    assert spawned.returncode == 0, spawned.stderr
    try:
        url = spawned.stdout.split(" at ", 1)[1].split()[0]
        result = hive.cli("--url", url, "list")
        assert result.returncode == 1
        assert result.stderr == (
            f"hive: {url} is not hive: it answered GET /v1/workers with an error of another "
            "program ('Not Found') (HTTP 404), where hive answers its own errors\n"
        )
    finally:
        hive.cli("rm", "--force", "tour-worker")


def test_events_since_is_checked_before_it_is_sent(hive: Hive) -> None:
    """Before: the API's refusal, a regular expression (``last_event_id: must match the
    pattern ^(?:[0-9a-z]{1,32}-)?[0-9]{1,18}$``); and a --since at a hive that does not run
    said hive 'went away while following its events', as if it had been reached."""
    result = hive.cli("events", "--since", "x")
    assert result.returncode == 2
    assert result.stderr.startswith(
        "hive: argument --since: expected an event id as hive events --json prints it (its "
        "event_id, <instance>-<seq>, e.g. 3f2a9c-41), got 'x'\n"
    )
    url = f"http://127.0.0.1:{free_port()}"
    result = hive.cli("--url", url, "events", "--since", "3f2a9c-41")
    assert result.returncode == 1
    assert result.stderr == (
        f"hive: cannot reach hive at {url} (from --url): connection refused; is it running? "
        "start it with: hive serve\n"
    )


def test_after_a_replace_the_log_says_which_generation_stopped(hive: Hive) -> None:
    """A worker and its successor share one log. hive's lines did not say whose they were, so
    after ``hive replace`` the log read as if the new worker had stopped: its ``attempt 1``
    line, then the old one's ``stopped: exited with code 0`` (the tour's ``hive logs``)."""
    assert hive.cli("spawn", "m", "--id", "tour-gen").returncode == 0
    try:
        replaced = hive.cli("replace", "tour-gen", "--", "--load-seconds", "0.2")
        assert replaced.returncode == 0, replaced.stderr

        def markers() -> list[str]:
            text = hive.worker_log("tour-gen").read_text(errors="replace")
            return [line.split(" ", 3)[3] for line in text.splitlines() if line.startswith("---")]

        wait_for(
            lambda: "generation 1: stopped: exited with code 0" in markers(),
            timeout=30,
            what=f"the old generation's stop, named (markers: {markers()})",
        )
        lines = markers()
        assert lines[0].startswith("attempt 1: "), lines  # never replaced then: as before
        assert lines[1].startswith("generation 2: attempt 1: "), lines
        assert lines.index("generation 1: stopped: exited with code 0") > 1, lines
        shown = hive.cli("logs", "tour-gen")
        assert "generation 1: stopped: exited with code 0" in shown.stdout
    finally:
        hive.cli("rm", "--force", "tour-gen")

"""What a new operator's tour met that needed hive's source to understand (issue 29's last
round): each message here was found by walking the README's tour from a fresh clone, and each
is checked by its exact text, through the installed ``hive`` command against a real hive."""

from __future__ import annotations

from hivetest import Hive

from harness.net import free_port


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

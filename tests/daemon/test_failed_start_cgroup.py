"""A ``hive serve`` whose start fails exits 1 with its one sentence and leaves no cgroup of its own.

A TLS file that cannot be used, an API port in use and a token too short are found before hive
makes its cgroup (its log never names one); a unix socket that cannot be bound fails after it,
and what hive made is removed on the way out. The harness removes a hive's cgroups when it cleans
up, so each test looks before that."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from containments import cgroups_here
from hivetest import Hive

from hive.host.containment import instance_of

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not cgroups_here(), reason="no writable cgroup v2 here"),
]

CONTAINMENT = 'containment = "cgroup"\n'  # never tags by a fall back: this is about cgroups


def fails(hive: Hive) -> str:
    """Run ``hive serve`` to its exit: 1, with no traceback; returns its one error sentence."""
    proc = hive.launch()
    code = proc.wait(60)
    hive.proc = None
    log = hive.log()
    assert code == 1, log
    assert "Traceback" not in log, log
    errors = re.findall(r" ERROR hive: (.*)", log)
    assert len(errors) == 1, log
    return errors[0]


def cgroups_of(hive: Hive) -> list[Path]:
    """``hive.<instance>`` cgroups of this hive (find /sys/fs/cgroup -maxdepth 3)."""
    name = f"hive.{instance_of(hive.state_dir)}"
    root = Path("/sys/fs/cgroup")
    return [*root.glob(name), *root.glob(f"*/{name}"), *root.glob(f"*/*/{name}")]


def test_a_tls_file_that_cannot_be_used_fails_before_any_cgroup(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    hive = Hive(f'{CONTAINMENT}tls_cert_file = "{junk}"\ntls_key_file = "{junk}"\n')
    try:
        error = fails(hive)
        assert error.startswith(f"cannot use the TLS files: tls_cert_file {junk} "), error
        assert "containment:" not in hive.log(), "hive made its cgroup before the TLS check"
        assert cgroups_of(hive) == []
    finally:
        hive.cleanup()


def test_an_api_port_in_use_fails_before_any_cgroup() -> None:
    hive = Hive(CONTAINMENT)
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", hive.port))
        taken.listen()
        try:
            error = fails(hive)
            assert error == f"cannot listen on 127.0.0.1:{hive.port}: Address already in use"
            assert "containment:" not in hive.log(), "hive made its cgroup before binding"
            assert cgroups_of(hive) == []
        finally:
            hive.cleanup()


def test_a_short_token_fails_before_any_cgroup() -> None:
    hive = Hive(CONTAINMENT)
    try:
        hive.token_file.parent.mkdir(parents=True, mode=0o700)
        hive.token_file.write_text("short\n")
        assert fails(hive) == (
            f"the token file {hive.token_file} holds a token of 5 characters; hive needs at "
            "least 16 (make one with: openssl rand -base64 32)"
        )
        assert "containment:" not in hive.log()
        assert cgroups_of(hive) == []
    finally:
        hive.cleanup()


def test_a_socket_that_cannot_be_bound_removes_the_cgroup_made() -> None:
    hive = Hive(CONTAINMENT)
    try:
        # Longer than a unix socket's path may be (108 bytes): found only when it is bound.
        long = hive.home / ("d" * 110) / "hive.sock"
        text = hive.config_path.read_text()
        hive.config_path.write_text(text.replace(f'socket = "{hive.socket}"', f'socket = "{long}"'))
        assert fails(hive) == f"cannot listen on {long}: AF_UNIX path too long"
        assert "containment: cgroup v2 under" in hive.log()
        assert cgroups_of(hive) == []
    finally:
        hive.cleanup()

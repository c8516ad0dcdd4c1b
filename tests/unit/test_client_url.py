"""Where the client and the CLI look for hive when no URL is given: ``$HIVE_URL``, else the unix
socket if it exists, else ``listen`` as :attr:`Config.api_url` reaches it (TLS, IPv6). One
function, :func:`hive.client.default_url_from`, chooses it for both."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hive.cli.main import _target
from hive.client import default_url, default_url_from
from hive.config import Config


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HIVE_URL", raising=False)


def _config(tmp_path: Path, **fields: object) -> Config:
    return Config(socket=tmp_path / "absent.sock", **fields)  # no socket: the TCP address


@pytest.mark.parametrize(
    ("fields", "url"),
    [
        ({}, "http://127.0.0.1:7070"),
        ({"listen": "0.0.0.0:7171"}, "http://127.0.0.1:7171"),
        ({"listen": "[::1]:7171"}, "http://[::1]:7171"),
        ({"listen": "[::]:7171"}, "http://[::1]:7171"),
        ({"listen": "[fd00::5]:7171"}, "http://[fd00::5]:7171"),
        ({"tls_cert_file": "/etc/hive/cert.pem", "tls_key_file": "/etc/hive/key.pem"},
         "https://127.0.0.1:7070"),
        ({"listen": "[::]:7443", "tls_cert_file": "/c.pem", "tls_key_file": "/k.pem"},
         "https://[::1]:7443"),
    ],
)  # fmt: skip
def test_the_default_url_is_the_api_url_with_tls_and_ipv6(
    tmp_path: Path, fields: dict[str, object], url: str
) -> None:
    config = _config(tmp_path, **fields)
    assert default_url(config) == url == config.api_url
    assert default_url_from(config) == (url, "")


def test_hive_url_comes_first_then_the_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    socket = tmp_path / "hive.sock"
    socket.touch()
    config = Config(socket=socket, listen="[::1]:7171")
    assert default_url_from(config) == (f"unix://{socket}", "")
    monkeypatch.setenv("HIVE_URL", "https://hive.example:7443")
    assert default_url_from(config) == ("https://hive.example:7443", "HIVE_URL")


def test_the_cli_looks_where_the_client_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = tmp_path / "hive.toml"
    toml.write_text(
        f'listen = "[::]:7443"\nsocket = "{tmp_path / "absent.sock"}"\n'
        'tls_cert_file = "/c.pem"\ntls_key_file = "/k.pem"\n'
    )
    monkeypatch.setenv("HIVE_CONFIG", str(toml))
    target = _target(argparse.Namespace(url=None, token=None))
    assert (target.url, target.url_from) == ("https://[::1]:7443", "")
    assert default_url() == target.url
    given = _target(argparse.Namespace(url="http://10.0.0.5:7070", token=None))
    assert (given.url, given.url_from) == ("http://10.0.0.5:7070", "--url")

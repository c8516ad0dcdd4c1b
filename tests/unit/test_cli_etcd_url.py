"""``hive fleet --etcd`` without a scheme is a usage error, as ``--url`` is (issue 29): exit 2
and one sentence saying what to write, where it was an aiohttp error and exit 1."""

from __future__ import annotations

import pytest

from hive.cli.main import main


@pytest.mark.parametrize("etcd", ["127.0.0.1:23790", "localhost:2379", "ftp://127.0.0.1:2379"])
def test_an_etcd_url_without_http_is_a_usage_error(
    etcd: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HIVE_ETCD", raising=False)
    assert main(["fleet", "--etcd", etcd, "ls"]) == 2
    assert capsys.readouterr().err == (
        f"hive: --etcd {etcd!r} is not an etcd URL: use http://HOST:PORT or https://HOST:PORT\n"
    )


def test_hive_etcd_is_named_when_it_is_the_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HIVE_ETCD", "http://127.0.0.1:2379,127.0.0.1:2380")
    assert main(["fleet", "ls"]) == 2
    assert "HIVE_ETCD '127.0.0.1:2380' is not an etcd URL" in capsys.readouterr().err

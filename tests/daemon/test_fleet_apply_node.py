"""``hive fleet apply --node`` for a node that no hive publishes warns (issue 29): a typo wrote
a desired set for a node that did not exist, silently. Against a real etcd; no hive needed (the
node key is written as a hive writes it)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hivetest import TAG

from harness.etcd import EtcdServer, etcd_path
from hive.cli.main import main
from hive.desired.etcd import Etcd, put_op

pytestmark = pytest.mark.skipif(etcd_path() is None, reason="etcd is not installed (etcd-server)")


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    server = EtcdServer(TAG).start()
    try:
        yield server
    finally:
        server.cleanup()


async def _put(url: str, key: str, value: str) -> None:
    client = Etcd([url])
    try:
        await client.txn([put_op(key, value)])
    finally:
        await client.close()


def test_a_node_that_is_not_up_is_warned_of(
    etcd: EtcdServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(_put(etcd.url, "/hive/nodes/node-a", json.dumps({"name": "node-a"})))
    workers = tmp_path / "w.toml"
    workers.write_text('[[workers]]\nid = "web"\nmodel = "m"\nbackend = "demo"\n')
    apply = ["fleet", "--etcd", etcd.url, "--prefix", "/hive", "apply", "-f", str(workers)]
    assert main([*apply, "--node", "node-typo"]) == 0
    out, error = capsys.readouterr()
    assert error == (
        "hive: warning: no node 'node-typo' is up in the fleet (up: node-a); its desired set "
        "is written, and runs when a hive of that name joins\n"
    )
    assert out.startswith("node-typo: desired set written to etcd: 1 worker(s)")
    assert main([*apply, "--node", "node-a"]) == 0
    assert capsys.readouterr().err == ""


def test_cordoning_a_node_that_is_not_up_is_warned_of(
    etcd: EtcdServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """``hive fleet drain node-typo`` wrote a cordon for a node that did not exist and said it
    was draining 0 replicas, as for a real node with none (found in the issue 29 tour)."""
    asyncio.run(_put(etcd.url, "/hive/nodes/node-a", json.dumps({"name": "node-a"})))
    fleet = ["fleet", "--etcd", etcd.url, "--prefix", "/hive"]
    for command in ("drain", "cordon"):
        assert main([*fleet, command, "node-typo"]) == 0
        out, error = capsys.readouterr()
        assert error == (
            "hive: warning: no node 'node-typo' is up in the fleet (up: node-a); it is cordoned "
            "all the same, for when a hive of that name joins\n"
        )
        assert out.startswith("node-typo: cordoned")
        assert main([*fleet, "uncordon", "node-typo"]) == 0
        capsys.readouterr()
    assert main([*fleet, "drain", "node-a"]) == 0
    assert capsys.readouterr().err == ""
    assert main([*fleet, "uncordon", "node-a"]) == 0

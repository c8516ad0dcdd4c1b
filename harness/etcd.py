"""A real etcd server on loopback for the fleet tests: a temp data dir, free ports, started,
stopped and started again on the same data (Debian's ``etcd-server``, 3.4)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from harness.net import free_port, port_block
from harness.procs import Tag, kill_tree
from harness.waits import wait_for


def etcd_path() -> str | None:
    return shutil.which("etcd")


class EtcdServer:
    def __init__(self, tag: Tag) -> None:
        self.tag = tag
        self.home = Path(tempfile.mkdtemp(prefix="hive-etcd-"))
        self.port, self.peer_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> EtcdServer:
        path = etcd_path()
        assert path is not None, "etcd is not installed (apt-get install etcd-server)"
        peer = f"http://127.0.0.1:{self.peer_port}"
        with open(self.home / "log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    path, "--name", "default", "--data-dir", str(self.home / "data"),
                    "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                    "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", f"default={peer}", "--log-level", "warn",
                ],
                env={**os.environ, **self.tag.env},
                stdout=log, stderr=subprocess.STDOUT, cwd=self.home,
            )  # fmt: skip
        wait_for(self._healthy, timeout=60, interval=0.1, what="etcd to answer")
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"etcd exited: {(self.home / 'log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc, 15.0)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)


class EtcdCluster:
    """Three (or ``size``) etcd members on loopback, one cluster: each can be stopped (SIGKILL,
    as a dead machine) and started again on its data. ``urls``: every member's client URL."""

    def __init__(self, tag: Tag, size: int = 3) -> None:
        self.tag = tag
        self.home = Path(tempfile.mkdtemp(prefix="hive-etcd-cluster-"))
        self.names = [f"m{i}" for i in range(size)]
        # Below the ephemeral range: a member killed and started again finds its ports free
        # (an outgoing connection could take an ephemeral one meanwhile).
        base = port_block(2 * size)
        self.ports = {name: (base + 2 * i, base + 2 * i + 1) for i, name in enumerate(self.names)}
        self.urls = [f"http://127.0.0.1:{self.ports[n][0]}" for n in self.names]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.token = self.home.name

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name][0]}"

    def _peer(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name][1]}"

    def start(self, *names: str) -> EtcdCluster:
        """Start these members (all when none is named); wait until the cluster answers."""
        path = etcd_path()
        assert path is not None, "etcd is not installed (apt-get install etcd-server)"
        cluster = ",".join(f"{n}={self._peer(n)}" for n in self.names)
        for name in names or self.names:
            if name in self.procs and self.procs[name].poll() is None:
                continue  # running already
            url, peer = self.url(name), self._peer(name)
            with open(self.home / f"{name}.log", "ab") as log:
                self.procs[name] = subprocess.Popen(
                    [
                        path, "--name", name, "--data-dir", str(self.home / name),
                        "--listen-client-urls", url, "--advertise-client-urls", url,
                        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                        "--initial-cluster", cluster, "--initial-cluster-state", "new",
                        "--initial-cluster-token", self.token, "--log-level", "warn",
                        "--heartbeat-interval", "50", "--election-timeout", "500",
                    ],
                    env={**os.environ, **self.tag.env},
                    stdout=log, stderr=subprocess.STDOUT, cwd=self.home,
                )  # fmt: skip
        wait_for(self.healthy, timeout=60, interval=0.1, what="the etcd cluster to answer")
        return self

    def healthy(self) -> bool:
        """Every running member says it is healthy (a member without a leader does not)."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = (self.home / f"{name}.log").read_text()[-2000:]
                raise AssertionError(f"etcd member {name} exited: {log}")
            try:
                with urllib.request.urlopen(f"{self.url(name)}/health", timeout=1) as r:
                    if r.status != 200:
                        return False
            except OSError:
                return False
        return bool(self.procs)

    def kill(self, name: str) -> None:
        """SIGKILL one member (a dead machine), keeping its data."""
        proc = self.procs.pop(name, None)
        if proc is not None:
            proc.kill()
            proc.wait()

    def cleanup(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        shutil.rmtree(self.home, ignore_errors=True)

"""A real etcd server on loopback for the fleet tests: a temp data dir, free ports, started,
stopped and started again on the same data (Debian's ``etcd-server``, 3.4)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from harness.net import free_port
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

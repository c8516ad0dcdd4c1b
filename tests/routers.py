"""A real sglang-router for the tests, and helpers to configure hive with it and spawn through it.

Shared by the external tier's router tests and the ``router`` fixture in tests/conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import aiohttp
from hivetest import TAG

from harness.net import free_port
from harness.waits import wait_for


class Router:
    """One sglang-router process; ``restart()`` brings it back empty on the same port."""

    def __init__(self, port: int | None = None, *extra: str) -> None:
        self.extra = list(extra)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Router:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sglang_router.launch_router",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                # Its metrics server defaults to 0.0.0.0:29000, which two routers cannot share.
                "--prometheus-host",
                "127.0.0.1",
                "--prometheus-port",
                str(free_port()),
                "--policy",
                "round_robin",
                "--log-level",
                "warn",
                "--disable-circuit-breaker",
                *self.extra,
            ],
            env={**os.environ, **TAG.env, "HF_HUB_OFFLINE": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._up, timeout=60, interval=0.1, what="sglang-router to answer")
        return self

    def _up(self) -> bool:
        import urllib.request

        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"sglang-router exited with {self.proc.returncode}")
        try:
            with urllib.request.urlopen(f"{self.url}/liveness", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    async def urls(self) -> set[str]:
        async with aiohttp.ClientSession() as s, s.get(f"{self.url}/workers") as r:
            body = await r.json()
        return {w["url"] for w in body["workers"]}


def router_config(*routers: Router, reconcile: float = 0.5) -> str:
    text = f"router_reconcile = {reconcile}\ndrain_timeout = 10\n"
    for router in routers:
        text += f'[[routers]]\nkind = "sglang"\nurl = "{router.url}"\n'
    return text


async def spawn(s: aiohttp.ClientSession, **body: Any) -> dict[str, Any]:
    body.setdefault("model", "demo-model")
    async with s.post("/v1/workers", params={"wait": "ready"}, json=body) as r:
        data = await r.json()
        assert r.status == 200, data
        return data


async def in_router(router: Router, url: str, present: bool = True) -> bool:
    return (url in await router.urls()) is present

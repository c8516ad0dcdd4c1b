"""The peers hive is measured beside: supervisord, circus and sglang-router, each in a temp dir.

Each is optional: ``available()`` says why one cannot run (not installed), and a failure to start
raises :class:`PeerUnavailable`, which the figures report instead of crashing.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import subprocess
import time
import xmlrpc.client
from collections.abc import Callable
from typing import Any

import aiohttp
from benchlib import BENCH, PYTHON, bench_env, new_home

from harness.net import free_port
from harness.procs import kill_tree, wait_quietly
from harness.waits import wait_http_ok


class PeerUnavailable(Exception):
    """A peer that is not installed or would not start; the message says why."""


def missing(module: str) -> str | None:
    """Why ``module`` cannot be used, or None when it is installed."""
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed in this venv"
    return None


async def _wait_exit(proc: subprocess.Popen[bytes], grace: float) -> None:
    await asyncio.to_thread(kill_tree, proc, grace)


# -- UDP datagrams (supervisord's event listener) -------------------------------------------------


class Datagrams(asyncio.DatagramProtocol):
    """JSON datagrams on a loopback port, each kept with the time this process read it."""

    def __init__(self) -> None:
        self.received: list[tuple[float, dict[str, Any]]] = []
        self._waiters: list[tuple[Callable[[dict[str, Any]], bool], asyncio.Future[Any]]] = []

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        item = (time.time(), json.loads(data))
        self.received.append(item)
        for waiter in list(self._waiters):
            match, future = waiter
            if not future.done() and match(item[1]):
                future.set_result(item)
                self._waiters.remove(waiter)

    async def wait(
        self, match: Callable[[dict[str, Any]], bool], timeout: float
    ) -> tuple[float, dict[str, Any]]:
        for item in self.received:
            if match(item[1]):
                return item
        future: asyncio.Future[tuple[float, dict[str, Any]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiters.append((match, future))
        return await asyncio.wait_for(future, timeout)


# -- supervisord ----------------------------------------------------------------------------------


class Supervisord:
    """supervisord with an XML-RPC port on loopback and the programs given as ini sections."""

    def __init__(self, programs: str, listener: bool = False) -> None:
        if why := missing("supervisor"):
            raise PeerUnavailable(why)
        self.home = new_home("sv")
        self.rpc_port = free_port()
        self.udp_port = free_port()
        self.listener = listener
        self.config = self.home / "supervisord.conf"
        listener_section = ""
        if listener:
            listener_section = (
                "[eventlistener:benchwatch]\n"
                f"command={PYTHON} {BENCH / 'sv_listener.py'}\n"
                "events=PROCESS_STATE_EXITED\n"
                f'environment=BENCH_UDP_PORT="{self.udp_port}"\n'
                "stderr_logfile=%(here)s/listener.err\n"
            )
        self.config.write_text(
            "[supervisord]\n"
            "nodaemon=true\n"
            f"logfile={self.home}/supervisord.log\n"
            f"pidfile={self.home}/supervisord.pid\n"
            f"childlogdir={self.home}\n"
            "loglevel=warn\n"
            "[inet_http_server]\n"
            f"port=127.0.0.1:{self.rpc_port}\n"
            "[rpcinterface:supervisor]\n"
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n"
            "[supervisorctl]\n"
            f"serverurl=http://127.0.0.1:{self.rpc_port}\n" + listener_section + programs
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.events = Datagrams()
        self._transport: asyncio.DatagramTransport | None = None

    def rpc(self) -> Any:
        return xmlrpc.client.ServerProxy(f"http://127.0.0.1:{self.rpc_port}/RPC2").supervisor

    async def start(self) -> Supervisord:
        if self.listener:
            loop = asyncio.get_running_loop()
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: self.events, local_addr=("127.0.0.1", self.udp_port)
            )
        with open(self.home / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "supervisor.supervisord", "-c", str(self.config)],
                env=bench_env(self.home),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.home,
            )
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise PeerUnavailable(f"supervisord exited {self.proc.returncode}: {self.log()}")
            with contextlib.suppress(OSError, xmlrpc.client.Error):
                state = await asyncio.to_thread(lambda: self.rpc().getState())
                if state.get("statename") == "RUNNING":
                    return self
            if time.monotonic() > deadline:
                raise PeerUnavailable(f"supervisord did not answer: {self.log()}")
            await asyncio.sleep(0.05)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.home / "supervisord.log").read_text(errors="replace")[-2000:]
        return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def info(self, name: str) -> dict[str, Any]:
        return dict(await asyncio.to_thread(lambda: self.rpc().getProcessInfo(name)))

    async def all_info(self) -> list[dict[str, Any]]:
        return list(await asyncio.to_thread(lambda: self.rpc().getAllProcessInfo()))

    async def start_process(self, name: str) -> None:
        await asyncio.to_thread(lambda: self.rpc().startProcess(name, True))

    async def close(self) -> None:
        if self.proc is not None:
            await _wait_exit(self.proc, 60)
            self.proc = None
        if self._transport is not None:
            self._transport.close()


# -- circus ---------------------------------------------------------------------------------------


class Circus:
    """circusd with its control and pub/sub endpoints on loopback and one watcher section."""

    def __init__(self, watchers: str) -> None:
        if why := missing("circus") or missing("zmq"):
            raise PeerUnavailable(why)
        self.home = new_home("circus")
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.pubsub = f"tcp://127.0.0.1:{free_port()}"
        self.config = self.home / "circus.ini"
        self.config.write_text(
            "[circus]\n"
            f"endpoint = {self.endpoint}\n"
            f"pubsub_endpoint = {self.pubsub}\n"
            "statsd = False\n"
            "loglevel = WARNING\n" + watchers
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.reaps: list[tuple[float, str, dict[str, Any]]] = []
        self._reap_waiters: list[tuple[int, asyncio.Future[Any]]] = []
        self._sub_task: asyncio.Task[None] | None = None
        self._zmq: Any = None

    async def start(self) -> Circus:
        import zmq
        import zmq.asyncio

        with open(self.home / "circusd.log", "ab") as out:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "circus.circusd", str(self.config)],
                env=bench_env(self.home),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.home,
            )
        self._zmq = zmq.asyncio.Context()
        sub = self._zmq.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"watcher.")
        sub.connect(self.pubsub)
        self._sub_task = asyncio.create_task(self._follow(sub))
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise PeerUnavailable(f"circusd exited {self.proc.returncode}: {self.log()}")
            with contextlib.suppress(Exception):
                reply = await self.call({"command": "status"}, timeout=1.0)
                if reply.get("status") == "ok":
                    return self
            if time.monotonic() > deadline:
                raise PeerUnavailable(f"circusd did not answer: {self.log()}")
            await asyncio.sleep(0.05)

    async def _follow(self, sub: Any) -> None:
        try:
            while True:
                topic, body = await sub.recv_multipart()
                stamp = time.time()
                message = json.loads(body)
                self.reaps.append((stamp, topic.decode(), message))
                if topic.decode().endswith(".reap"):
                    for waiter in list(self._reap_waiters):
                        pid, future = waiter
                        if not future.done() and message.get("process_pid") == pid:
                            future.set_result((stamp, message))
                            self._reap_waiters.remove(waiter)
        finally:
            sub.close()

    async def wait_reap(self, pid: int, timeout: float) -> tuple[float, dict[str, Any]]:
        for stamp, topic, message in self.reaps:
            if topic.endswith(".reap") and message.get("process_pid") == pid:
                return stamp, message
        future: asyncio.Future[tuple[float, dict[str, Any]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._reap_waiters.append((pid, future))
        return await asyncio.wait_for(future, timeout)

    async def call(self, command: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        from circus.client import CircusClient

        def blocking() -> dict[str, Any]:
            client = CircusClient(endpoint=self.endpoint, timeout=timeout)
            try:
                return dict(client.call(command))
            finally:
                client.stop()

        return await asyncio.to_thread(blocking)

    async def pids(self, watcher: str) -> list[int]:
        reply = await self.call({"command": "list", "properties": {"name": watcher, "pids": True}})
        return [int(p) for p in reply.get("pids", [])]

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.home / "circusd.log").read_text(errors="replace")[-2000:]
        return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def close(self) -> None:
        """Ask circusd to quit (it refuses while a periodic check runs: ask again), then wait;
        SIGTERM, then SIGKILL, if it will not."""
        if self.proc is not None:
            deadline = time.monotonic() + 20
            while self.proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    await self.call({"command": "quit"}, timeout=2)
                await asyncio.to_thread(wait_quietly, self.proc, 1.0)
            await _wait_exit(self.proc, 10)
            self.proc = None
        if self._sub_task is not None:
            self._sub_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sub_task
        if self._zmq is not None:
            self._zmq.term()


# -- sglang-router --------------------------------------------------------------------------------


class Router:
    """An sglang-router on loopback (its metrics exporter on a free loopback port too)."""

    def __init__(self, name: str, *flags: str) -> None:
        if why := missing("sglang_router"):
            raise PeerUnavailable(why)
        self.home = new_home(name)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.flags = flags
        self.proc: subprocess.Popen[bytes] | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> Router:
        argv = [
            PYTHON, "-m", "sglang_router.launch_router",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
            "--log-level", "warn", *self.flags,
        ]  # fmt: skip
        with open(self.home / "router.log", "ab") as out:
            self.proc = subprocess.Popen(
                argv, env=bench_env(self.home), stdout=out, stderr=subprocess.STDOUT, cwd=self.home
            )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise PeerUnavailable(f"sglang-router exited {self.proc.returncode}: {self.log()}")
            with contextlib.suppress(TimeoutError):
                await wait_http_ok(f"{self.url}/liveness", 0.2, interval=0.05)
                return self
            if time.monotonic() > deadline:
                raise PeerUnavailable(f"sglang-router did not answer: {self.log()}")

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.home / "router.log").read_text(errors="replace")[-2000:]
        return ""

    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self._http

    async def workers(self) -> list[dict[str, Any]]:
        async with self.http().get(f"{self.url}/workers") as response:
            response.raise_for_status()
            return list((await response.json())["workers"])

    async def add(self, url: str, model: str) -> None:
        body = {"url": url, "model_id": model}
        async with self.http().post(f"{self.url}/workers", json=body) as response:
            if response.status >= 300:
                raise RuntimeError(f"router refused {url}: {await response.text()}")

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self.proc is not None:
            await _wait_exit(self.proc, 10)
            self.proc = None


__all__ = ["Circus", "Datagrams", "PeerUnavailable", "Router", "Supervisord", "missing"]

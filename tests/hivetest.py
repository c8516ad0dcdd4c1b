"""Test harness: the real ``hive serve`` in a subprocess, and ways to look at what it started.

Every process the tests start carries ``HIVE_TEST_TAG`` in its environment (hive hands its own
environment on to its workers), so a leak check can find any of them, wherever they were
reparented, by reading ``/proc/<pid>/environ``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import psutil

#: Marks every process started by this test run.
TAG = f"hive-test-{os.getpid()}-{random.randrange(1 << 30)}"

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tagged_processes(tag: str = TAG) -> list[psutil.Process]:
    """Live processes (not zombies) whose environment carries ``tag``."""
    found = []
    marker = f"HIVE_TEST_TAG={tag}".encode()
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as file:
                environ = file.read()
            if marker in environ.split(b"\0") and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def zombie_children(pid: int) -> list[int]:
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    zombies = []
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.status() == psutil.STATUS_ZOMBIE:
                zombies.append(child.pid)
    return zombies


def wait_for(
    condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


async def async_wait_for(
    condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(interval)


def isolated_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment whose platformdirs all point under ``home``, tagged for leak checks."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HIVE_", "XDG_", "NOTIFY_SOCKET", "WATCHDOG_"))
    }
    env.update(
        {
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / "config"),
            "XDG_STATE_HOME": str(home / "state"),
            "XDG_RUNTIME_DIR": str(home / "run"),
            "XDG_DATA_HOME": str(home / "data"),
            "XDG_CACHE_HOME": str(home / "cache"),
            "HIVE_TEST_TAG": TAG,
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


class Hive:
    """One ``hive serve`` under test, in its own temp dir, on a free port."""

    def __init__(self, config: str = "", env: Mapping[str, str] | None = None) -> None:
        # Short path: the unix socket's path must fit in 108 bytes.
        self.home = Path(tempfile.mkdtemp(prefix="hive-"))
        (self.home / "run").mkdir(mode=0o700)
        self.port = free_port()
        low = random.randrange(20000, 60000, 500)
        self.port_range = (low, low + 499)
        self.socket = self.home / "run" / "hive.sock"
        self.state_dir = self.home / "state" / "hive"
        self.token_file = self.home / "config" / "hive" / "token"
        self.config_path = self.home / "hive.toml"
        self.config_path.write_text(
            f'listen = "127.0.0.1:{self.port}"\n'
            f'socket = "{self.socket}"\n'
            f'state_dir = "{self.state_dir}"\n'
            f'token_file = "{self.token_file}"\n'
            f"port_range = [{self.port_range[0]}, {self.port_range[1]}]\n"
            "stop_timeout = 5\n" + config
        )
        self.env = isolated_env(self.home, env)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.home / "hive.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = ""

    # -- life ----------------------------------------------------------------------------------

    def start(self, *extra: str, timeout: float = 30.0) -> Hive:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        with log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hive", "serve", "--config", str(self.config_path), *extra],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.home,
            )
        wait_for(self._answers, timeout, what=f"hive to answer on {self.url}\n{self.log()}")
        self.token = self.token_file.read_text().strip()
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"hive exited with {self.proc.returncode}:\n{self.log()}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", self.port)) != 0:
                return False
        return self.socket.exists()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.json"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns hive's exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"hive did not exit on SIGTERM:\n{self.log()}") from None
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL hive alone; its workers keep running."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        """Stop hive and anything it left (for teardown after a failed test), remove the dir."""
        with contextlib.suppress(AssertionError):
            self.stop()
        for proc in tagged_processes():
            with contextlib.suppress(psutil.Error):
                if str(self.home) in " ".join(proc.cmdline()) or _environ_has(proc, str(self.home)):
                    proc.kill()
        shutil.rmtree(self.home, ignore_errors=True)

    # -- talking to it -------------------------------------------------------------------------

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def session(self, *, auth: bool = True) -> aiohttp.ClientSession:
        """A TCP session with the token (or without, to test refusals)."""
        return aiohttp.ClientSession(
            self.url,
            headers=self.headers if auth else None,
            timeout=aiohttp.ClientTimeout(total=120),
        )

    def unix_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            "http://hive",
            connector=aiohttp.UnixConnector(path=str(self.socket)),
            timeout=aiohttp.ClientTimeout(total=120),
        )

    @staticmethod
    def cli_command() -> list[str]:
        """The installed ``hive`` command of this venv."""
        hive = Path(sys.executable).with_name("hive")
        return [str(hive)] if hive.exists() else [sys.executable, "-m", "hive"]

    def cli(
        self, *args: str, timeout: float = 60.0, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the installed ``hive`` command against this daemon (over its unix socket)."""
        command = self.cli_command()
        full_env = {**self.env, "HIVE_URL": f"unix://{self.socket}", **(env or {})}
        return subprocess.run(
            [*command, *args],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.home,
        )


def _environ_has(proc: psutil.Process, text: str) -> bool:
    try:
        return any(text in v for v in proc.environ().values())
    except psutil.Error:
        return False


@contextlib.contextmanager
def running_hive(config: str = "", env: Mapping[str, str] | None = None) -> Iterator[Hive]:
    """A started hive that is stopped (and checked for zombies) at the end."""
    hive = Hive(config, env)
    try:
        hive.start()
        yield hive
        if hive.proc is not None:
            assert zombie_children(hive.pid) == [], "hive left zombie children"
            code = hive.stop()
            assert code == 0, f"hive exited {code}:\n{hive.log()}"
    finally:
        hive.cleanup()


def port_in_use(port: int) -> bool:
    """Whether anything listens on 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0

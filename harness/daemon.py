"""One real ``hive serve`` in a subprocess, in its own temp dir, on free loopback ports.

The test suite drives it synchronously (:meth:`Hive.start`, :meth:`Hive.stop`, aiohttp sessions,
the ``hive`` CLI); the benchmark from its event loop (:meth:`Hive.start_async`,
:meth:`Hive.call`, :meth:`Hive.close`). Both get the same files, config, environment and process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from harness.env import isolated_env
from harness.net import free_port, port_area
from harness.procs import Tag, environ_has, kill_tree, tagged_processes
from harness.waits import wait_for, wait_http_ok


def _sets(config: str, key: str) -> bool:
    """True when the TOML text ``config`` sets the top-level ``key`` (before any table)."""
    top = re.split(r"^\s*\[", config, maxsplit=1, flags=re.MULTILINE)[0]
    return re.search(rf"^\s*{re.escape(key)}\s*=", top, flags=re.MULTILINE) is not None


#: The blocks of 500 ports this process's hives take in turn, from a random first one (two
#: processes that start hives at once rarely start on the same block).
_BLOCKS = itertools.count(random.randrange(1000))


class HiveFailed(AssertionError):
    """hive exited early, did not answer in time, or did not exit on SIGTERM. An
    ``AssertionError``, so that a test that meets it fails rather than errors."""


class Hive:
    """One ``hive serve`` under test, in its own temp dir, on a free port.

    ``config`` is appended to the settings that place everything under the temp dir; ``env`` is
    added to the isolated environment (:func:`harness.env.isolated_env`, which also drops the
    prefixes in ``drop_env``). ``home`` is a short temp dir with a ``run`` subdir (mode 0700),
    made here when not given; ``port_range`` the workers' ports, a random block of 500 when not
    given. ``log_tail``: how many characters of hive's log an error message shows (all of it
    when None). ``on_exit``: written into the config unless ``config`` sets it itself; the
    harness stops workers with hive (``"stop"``) unless told otherwise, because every test and
    the bench expect a stopped hive to leave no process behind. ``None`` writes nothing, so
    hive's own default applies (``detach``).
    """

    def __init__(
        self,
        config: str = "",
        env: Mapping[str, str] | None = None,
        *,
        tag: Tag,
        home: Path | None = None,
        port_range: tuple[int, int] | None = None,
        drop_env: Sequence[str] = (),
        log_tail: int | None = None,
        on_exit: str | None = "stop",
    ) -> None:
        if home is None:
            # Short path: the unix socket's path must fit in 108 bytes.
            home = Path(tempfile.mkdtemp(prefix="hive-"))
            (home / "run").mkdir(mode=0o700)
        self.home = home
        self.tag = tag
        self.port = free_port()
        if port_range is None:
            # The next block of 500 in this process's port area (harness.net.port_area):
            # hives that run at once in one process get different blocks.
            area_low, area_high = port_area()
            low = area_low + 500 * (next(_BLOCKS) % max(1, (area_high - area_low) // 500))
            port_range = (low, low + 499)
        self.port_range = port_range
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
            "stop_timeout = 5\n"
            + (f'on_exit = "{on_exit}"\n' if on_exit and not _sets(config, "on_exit") else "")
            + config
        )
        self.env = isolated_env(self.home, tag, env, drop=drop_env)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.home / "hive.log"
        self.log_tail = log_tail
        self.proc: subprocess.Popen[bytes] | None = None
        #: A command that runs hive's (``["prlimit", "--nofile=64:64", "--"]``); none by default.
        self.wrapper: list[str] = []
        self.token = ""
        self._http: aiohttp.ClientSession | None = None

    # -- life ----------------------------------------------------------------------------------

    def launch(self, *extra: str) -> subprocess.Popen[bytes]:
        """Start ``hive serve`` with this config (and ``extra`` arguments), output to the log;
        do not wait for it."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *self.wrapper,
                    *(sys.executable, "-m", "hive", "serve", "--config", str(self.config_path)),
                    *extra,
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.home,
            )
        return self.proc

    def start(self, *extra: str, timeout: float = 30.0) -> Hive:
        """Launch and wait until hive accepts on its port and its socket exists."""
        self.launch(*extra)
        wait_for(self._answers, timeout, what=f"hive to answer on {self.url}\n{self.log()}")
        self.token = self.token_file.read_text().strip()
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise HiveFailed(f"hive exited with {self.proc.returncode}:\n{self.log()}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", self.port)) != 0:
                return False
            # A port nobody listens on can still "accept": a connection whose source port
            # the kernel picked equal to it connects to itself (TCP simultaneous open).
            if s.getsockname()[1] == self.port:
                return False
        return self.socket.exists()

    async def start_async(self, timeout: float = 30.0) -> Hive:
        """Launch and wait, without blocking the loop, until ``/health`` answers 2xx and the
        token file exists."""
        proc = self.launch()
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise HiveFailed(f"hive exited with {proc.returncode}:\n{self.log()}")
            with contextlib.suppress(TimeoutError):
                await wait_http_ok(f"{self.url}/health", 0.2)
                if self.token_file.exists():
                    break
            if time.monotonic() > deadline:
                raise HiveFailed(f"hive did not answer in {timeout:g}s:\n{self.log()}")
        self.token = self.token_file.read_text().strip()
        return self

    def log(self) -> str:
        """hive's output so far (its last ``log_tail`` characters)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text if self.log_tail is None else text[-self.log_tail :]

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.json"

    def worker_log(self, worker_id: str) -> Path:
        return self.state_dir / "logs" / f"{worker_id}.log"

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
            raise HiveFailed(f"hive did not exit on SIGTERM:\n{self.log()}") from None
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL hive alone; its workers keep running."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    async def close_http(self) -> None:
        """Close the session of :meth:`http` (a new one is made on the next call)."""
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def close(self) -> int | None:
        """Close :meth:`http`, SIGTERM hive (it stops its workers) and wait, SIGKILLing it and
        what it started after 60 s; returns its exit code."""
        await self.close_http()
        code = None
        if self.proc is not None:
            proc = self.proc
            await asyncio.to_thread(kill_tree, proc, 60.0)
            code = proc.returncode
            self.proc = None
        return code

    def cleanup(self) -> None:
        """Stop hive and anything it left (for teardown after a failed test), remove the dir."""
        with contextlib.suppress(HiveFailed):
            self.stop()
        for proc in tagged_processes(self.tag):
            with contextlib.suppress(psutil.Error):
                if str(self.home) in " ".join(proc.cmdline()) or environ_has(proc, str(self.home)):
                    proc.kill()
        self.remove_cgroups()
        shutil.rmtree(self.home, ignore_errors=True)

    def cgroups(self) -> list[Path]:
        """The cgroups this hive made (its log names their base), deepest first."""
        found = re.findall(r"containment: cgroup v2 under (\S+)", self.log())
        bases = {Path(base) for base in found}
        paths: list[Path] = []
        for base in bases:
            if base.is_dir():
                paths += [p for p in base.iterdir() if p.is_dir() and p.name.startswith("worker.")]
                if base.name.startswith("hive."):
                    paths.append(base)
        return paths

    def remove_cgroups(self, timeout: float = 10.0) -> None:
        """Remove what is left of this hive's cgroups (a killed hive leaves them, by design)."""
        deadline = time.monotonic() + timeout
        for path in self.cgroups():
            while path.exists():
                try:
                    path.rmdir()
                except FileNotFoundError:
                    break
                except OSError:  # still populated: its processes are being killed
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    # -- talking to it -------------------------------------------------------------------------

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def session(self, *, auth: bool = True) -> aiohttp.ClientSession:
        """A new TCP session with the token (or without, to test refusals)."""
        return aiohttp.ClientSession(
            self.url,
            headers=self.headers if auth else None,
            timeout=aiohttp.ClientTimeout(total=120),
        )

    def unix_session(self) -> aiohttp.ClientSession:
        """A new session over hive's unix socket (no token needed)."""
        return aiohttp.ClientSession(
            "http://hive",
            connector=aiohttp.UnixConnector(path=str(self.socket)),
            timeout=aiohttp.ClientTimeout(total=120),
        )

    def http(self) -> aiohttp.ClientSession:
        """One keep-alive session to the API with the token, kept until :meth:`close`."""
        if self._http is None:
            self._http = aiohttp.ClientSession(
                self.url,
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=300),
                # hive drops a connection idle for http_header_timeout (10 s): reuse one for
                # less than that, never one the server is closing.
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=5),
            )
        return self._http

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        ok: Sequence[int] = (200, 201, 202),
    ) -> Any:
        """One request on :meth:`http`; its JSON body, or RuntimeError if its status is not
        in ``ok``."""
        async with self.http().request(method, path, json=json_body, params=params) as response:
            body = await response.json(content_type=None)
            if response.status not in ok:
                raise RuntimeError(f"{method} {path}: HTTP {response.status} {body}")
            return body

    async def spawn(self, spec: Mapping[str, Any], wait: bool = False) -> dict[str, Any]:
        params = {"wait": "ready", "timeout": "60"} if wait else None
        return dict(await self.call("POST", "/v1/workers", json_body=dict(spec), params=params))

    async def stop_worker(self, worker_id: str, wait: bool = True) -> dict[str, Any]:
        params = {"wait": "true"} if wait else None
        return dict(await self.call("POST", f"/v1/workers/{worker_id}/stop", params=params))

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

"""The processes a run starts: the tag that marks them, finding them, reaping and killing them.

Every process a run starts carries its :class:`Tag` in its environment (hive hands its own
environment on to its workers), so a leak check can find any of them, wherever they were
reparented, by reading ``/proc/<pid>/environ``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Tag:
    """An environment variable and the value that marks every process of one run."""

    var: str
    value: str

    @classmethod
    def new(cls, var: str, prefix: str) -> Tag:
        """A tag of this process: ``<prefix>-<pid>-<random>`` in ``var``."""
        return cls(var, f"{prefix}-{os.getpid()}-{random.randrange(1 << 30)}")

    @property
    def env(self) -> dict[str, str]:
        """The tag as environment variables, to add to a child's environment."""
        return {self.var: self.value}

    def __str__(self) -> str:
        return self.value


def tagged_processes(tag: Tag) -> list[psutil.Process]:
    """Live processes (not zombies), other than this one, whose environment carries ``tag``."""
    found = []
    marker = f"{tag.var}={tag.value}".encode()
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
    """The pids of ``pid``'s children that have exited and are not reaped."""
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


def environ_has(proc: psutil.Process, text: str) -> bool:
    """Whether any value in ``proc``'s environment contains ``text``."""
    try:
        return any(text in v for v in proc.environ().values())
    except psutil.Error:
        return False


def kill_tree(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM a process we started and wait; past ``grace``, SIGKILL it and what it started."""
    if proc.poll() is not None:
        return
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()


def wait_quietly(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to ``timeout`` for a process to exit; whether it did."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def sweep(tag: Tag) -> list[str]:
    """Kill whatever carries ``tag`` (there should be nothing); describe what was found."""
    left = []
    for proc in tagged_processes(tag):
        with contextlib.suppress(psutil.Error):
            left.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            proc.kill()
    return left

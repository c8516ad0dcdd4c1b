"""``hive top`` in a real pseudo-terminal: it draws the host, follows spawns and kills as they
happen, and quits cleanly on ``q`` and on Ctrl-C, leaving the terminal as it was."""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import subprocess
import termios
import time
from collections.abc import Iterator

import pytest
from hivetest import Hive, running_hive

from harness.waits import async_wait_for, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def hive() -> Iterator[Hive]:
    with running_hive() as daemon:
        yield daemon


def _controlling_terminal() -> None:
    """In the child: make its stdin, the pty, its controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """``hive top`` on the far side of a pty; everything it writes is kept in ``screen``."""

    def __init__(self, hive: Hive) -> None:
        self.master, slave = pty.openpty()
        os.set_blocking(self.master, False)
        self.before = termios.tcgetattr(slave)
        self.slave = slave
        env = {**hive.env, "HIVE_URL": f"unix://{hive.socket}", "TERM": "xterm"}
        env.pop("COLUMNS", None)
        env.pop("LINES", None)
        self.proc = subprocess.Popen(
            [*hive.cli_command(), "top", "--interval", "0.5"],
            stdin=slave, stdout=slave, stderr=slave, env=env, cwd=hive.home,
            start_new_session=True,  # the pty becomes its controlling terminal: ^C signals it
            preexec_fn=_controlling_terminal,
        )  # fmt: skip
        self.output = b""

    def read(self) -> str:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            self.output += chunk
        return self.output.decode(errors="replace")

    def screen(self) -> str:
        """What the last frame shows (after the last clear)."""
        return self.read().rsplit("\x1b[H\x1b[2J", 1)[-1]

    def press(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def ended(self, timeout: float = 10.0) -> int:
        code = self.proc.wait(timeout)
        self.read()
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


async def test_top_follows_the_workers_and_quits_on_q(hive: Hive) -> None:
    term = Terminal(hive)
    try:
        wait_for(lambda: "(q quits)" in term.screen(), what="top's first frame")
        assert "\x1b[?1049h" in term.read()  # the alternate screen
        record = await hive.spawn({"model": "m-top", "id": "top-a", "restart": "no"}, wait=True)
        await async_wait_for(
            lambda: any(
                line.split()[:3] == ["top-a", "m-top", "ready"]
                for line in term.screen().splitlines()
            ),
            what="top-a ready on the screen",
        )
        os.kill(record["pid"], signal.SIGKILL)
        await async_wait_for(
            lambda: "killed by signal 9" in term.screen(), what="the kill on the screen"
        )
        line = next(line for line in term.screen().splitlines() if line.startswith("top-a"))
        assert line.split()[2] == "failed"
        started = time.monotonic()
        term.press(b"q")
        assert term.ended() == 0
        assert time.monotonic() - started < 5
        tail = term.output.decode(errors="replace")
        assert tail.endswith("\x1b[?25h\x1b[?1049l")  # cursor back, alternate screen left
        assert termios.tcgetattr(term.slave)[3] == term.before[3]  # echo and line mode back
    finally:
        term.close()
        await hive.call("DELETE", "/v1/workers/top-a", ok=(200, 404))
        await hive.close_http()


def test_top_quits_cleanly_on_ctrl_c(hive: Hive) -> None:
    term = Terminal(hive)
    try:
        wait_for(lambda: "(q quits)" in term.screen(), what="top's first frame")
        term.press(b"\x03")  # the terminal turns it into SIGINT
        assert term.ended() == 130
        assert term.output.decode(errors="replace").endswith("\x1b[?25h\x1b[?1049l")
        assert termios.tcgetattr(term.slave)[3] == term.before[3]
        assert "Traceback" not in term.output.decode(errors="replace")
    finally:
        term.close()


def test_top_without_a_terminal_prints_one_frame(hive: Hive) -> None:
    result = hive.cli("top")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("hive ")
    assert "ID  MODEL  STATE" in result.stdout and "\x1b[" not in result.stdout


def test_top_says_at_once_that_hive_went_away() -> None:
    """Before, a SIGKILLed hive left the last frame up with a frozen clock for 35 s and more
    (the cut stream was an error top did not catch); now the next frame says so. 20 s is a
    generous bound for "the next frame", well under the old 35 s."""
    with running_hive() as daemon:
        term = Terminal(daemon)
        try:
            wait_for(lambda: "workers" in term.screen(), what="the first frame")
            daemon.kill()
            wait_for(lambda: "hive unreachable since" in term.screen(), timeout=20)
            assert "STALE: as of" in term.screen()
            term.press(b"q")
            assert term.ended() == 0
        finally:
            term.close()

"""A child process in the demo worker's tree that behaves as vLLM's EngineCore does.

Real engines run the model in a child of the HTTP server: the child takes seconds to exit on
SIGTERM (vLLM's EngineCore takes over one), and when it dies (the OOM killer's usual pick) the
server exits with code 0. ``--child-exit-seconds S`` gives the demo worker such a child, so that
hive's handling of both habits can be tested with a real tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

from hive.demo_worker.output import say, warn

#: The child: on SIGTERM (once; another is ignored) waits S seconds, then exits. It says it is
#: up (its handler in place) by closing the pipe whose end it is given.
_CHILD = """
import os, signal, sys, time
seconds, up = float(sys.argv[1]), int(sys.argv[2])
def on_term(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"demo engine core: SIGTERM, exiting in {seconds:g} s", flush=True)
    time.sleep(seconds)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print(f"demo engine core: pid {os.getpid()}", flush=True)
os.close(up)
while True:
    time.sleep(3600)
"""


class EngineCore:
    """The child process, started with the worker and ended (and waited for) with it."""

    def __init__(self, exit_seconds: float) -> None:
        self.exit_seconds = exit_seconds
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the child and wait until it is up, as a server waits for its engine."""
        up, told = os.pipe()
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _CHILD, f"{self.exit_seconds:g}", str(told), pass_fds=(told,)
            )
            os.close(told)
            told = -1
            await asyncio.to_thread(os.read, up, 1)  # "" once the child closed its end
        finally:
            os.close(up)
            if told >= 0:
                os.close(told)

    async def died(self) -> int:
        """When the child ends on its own: its exit code (negative: the signal)."""
        assert self.process is not None
        code = await self.process.wait()
        warn(
            f"demo worker: engine core (pid {self.process.pid}) died with code {code}; "
            "exiting with code 0, as vLLM does"
        )
        return code

    async def stop(self) -> None:
        """SIGTERM the child and wait until it is gone (it takes ``exit_seconds``)."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        say(f"demo worker: waiting for the engine core (pid {process.pid}) to exit")
        await process.wait()

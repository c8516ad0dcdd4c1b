"""``hive top``: the host at a glance in a terminal, redrawn as workers change.

One screen: hive and its worker counts, the GPUs and CPU nodes (``hive devices``), and every
worker with its state, device, age, restarts, CPU, RSS and last error. Worker changes come from
the event stream (``/v1/events``) and are drawn within 0.1 s; device figures are read every
``interval`` seconds. ``q`` or Ctrl-C quits, and the terminal is left as it was found (the
alternate screen, the cursor and the terminal's mode restored). Without a terminal, or with
``--once``, one frame is printed and the command ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import termios
import tty
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import IO, Any

from hive.cli import tables
from hive.client import HiveClient, HiveConnectionError
from hive.models import Devices, Node, State, Worker

ENTER, LEAVE = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"
HOME_CLEAR = "\x1b[H\x1b[2J"


def frame(
    node: Node,
    devices: Devices | None,
    workers: Iterable[Worker],
    width: int,
    height: int | None = None,
    note: str = "",
    live: bool = False,
) -> list[str]:
    """The lines of one screen, each cut to ``width`` (and as many as ``height`` allows)."""
    records = sorted(workers, key=lambda w: w.id)
    counts: dict[str, int] = {}
    for w in records:
        counts[w.state.value] = counts.get(w.state.value, 0) + 1
    summary = ", ".join(f"{counts[s.value]} {s.value}" for s in State if s.value in counts)
    now = datetime.now(UTC)
    head = f"hive {node.version} on {node.hostname} · {len(records)} workers"
    head += f": {summary}" if summary else ""
    head += f" · {now:%H:%M:%S}" + (f" · {note}" if note else "") + ("  (q quits)" if live else "")
    lines = [head, ""]
    if devices is not None:
        lines += [*tables.devices(devices).splitlines(), ""]
    rows = [
        [
            w.id,
            w.model,
            w.state.value if not w.draining else f"{w.state.value} (draining)",
            w.device,
            str(w.pid) if w.pid is not None else "-",
            tables.since(w.started_at or w.created_at, now),
            str(w.restarts),
            f"{w.cpu_percent:.0f}%" if w.cpu_percent is not None else "-",
            tables.size(w.rss_bytes),
            w.error or "",
        ]
        for w in records
    ]
    headers = ["ID", "MODEL", "STATE", "DEVICE", "PID", "AGE", "RESTARTS", "CPU", "RSS", "ERROR"]
    lines += tables.table(headers, rows).splitlines()
    lines = [line[:width] for line in lines]
    return lines if height is None else lines[:height]


class Top:
    """The live view: the records kept from the event stream, the screen redrawn on change."""

    def __init__(self, client: HiveClient, out: IO[str], interval: float = 2.0) -> None:
        self.client = client
        self.out = out
        self.interval = interval
        self.workers: dict[str, Worker] = {}
        self.node: Node | None = None
        self.devices: Devices | None = None
        self.note = ""
        self._dirty = asyncio.Event()
        self._quit = asyncio.Event()
        self.code = 0

    def redraw(self) -> None:
        """Draw again soon (something changed, or the terminal was resized)."""
        self._dirty.set()

    def quit(self, code: int = 0) -> None:
        self.code = code
        self._quit.set()

    async def load(self) -> None:
        self.node = await self.client.node()
        self.devices = await self.client.devices()
        self.workers = {w.id: w for w in await self.client.list_workers()}

    def draw(self) -> None:
        assert self.node is not None
        size = shutil.get_terminal_size()
        lines = frame(
            self.node,
            self.devices,
            self.workers.values(),
            size.columns,
            size.lines,
            self.note,
            True,
        )
        self.out.write(HOME_CLEAR + "\r\n".join(lines))
        self.out.flush()

    async def _follow(self) -> None:
        last: str | None = None
        while True:
            try:
                async for event in self.client.events(last):
                    if event.get("reset"):  # the current state follows, one event per worker
                        self.workers = {}
                    else:
                        last = event["event_id"] or last
                        if event["to"] is None:
                            self.workers.pop(event["id"], None)
                        else:
                            self.workers[event["id"]] = Worker.model_validate(event["worker"])
                    self.note = ""
                    self.redraw()
            except HiveConnectionError as exc:
                self.note = f"hive unreachable ({exc.reason}); retrying"
                self.redraw()
            await asyncio.sleep(1.0)

    async def _poll_devices(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            with contextlib.suppress(HiveConnectionError):
                self.devices = await self.client.devices()
                self.redraw()

    async def _redraw(self) -> None:
        while True:
            self.draw()
            await self._dirty.wait()
            self._dirty.clear()
            await asyncio.sleep(0.1)  # at most ten frames a second, however busy the host

    async def run(self) -> int:
        tasks = [
            asyncio.create_task(self._follow()),
            asyncio.create_task(self._poll_devices()),
            asyncio.create_task(self._redraw()),
        ]
        try:
            await self._quit.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return self.code


async def run(client: HiveClient, once: bool = False, interval: float = 2.0) -> int:
    """``hive top``: live on a terminal; one frame otherwise (or with ``once``)."""
    out = sys.stdout
    view = Top(client, out, interval)
    await view.load()
    assert view.node is not None
    if once or not (sys.stdin.isatty() and out.isatty()):
        width = shutil.get_terminal_size((200, 50)).columns
        print("\n".join(frame(view.node, view.devices, view.workers.values(), width)))
        return 0
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    saved: list[Any] = termios.tcgetattr(fd)

    def key() -> None:
        data = os.read(fd, 64)
        if not data or b"q" in data or b"Q" in data:
            view.quit(0)

    tty.setcbreak(fd)  # keys arrive one by one, unechoed; Ctrl-C still signals
    out.write(ENTER)
    try:
        loop.add_reader(fd, key)
        loop.add_signal_handler(signal.SIGINT, view.quit, 130)
        loop.add_signal_handler(signal.SIGTERM, view.quit, 143)
        loop.add_signal_handler(signal.SIGWINCH, view.redraw)
        return await view.run()
    finally:
        loop.remove_reader(fd)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGWINCH):
            loop.remove_signal_handler(sig)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        out.write(LEAVE)
        out.flush()

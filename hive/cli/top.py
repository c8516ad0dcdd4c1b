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


#: Which workers come first: the ones that need a look.
_FIRST = {State.FAILED: 0, State.STARTING: 1}

#: Columns given up, in this order, when the table is wider than the terminal; CPU, RSS and
#: ERROR stay (the error cut to what is left of the line).
_DROPPED_FIRST = ["MODEL", "AGE", "RESTARTS", "PID", "DEVICE"]

#: The least room the ERROR column keeps before another column is given up.
_ERROR_ROOM = 16


def _worker_rows(workers: list[Worker], now: datetime) -> tuple[list[str], list[list[str]]]:
    headers = ["ID", "MODEL", "STATE", "DEVICE", "PID", "AGE", "RESTARTS", "CPU", "RSS", "ERROR"]
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
            tables.escape(w.error or ""),
        ]
        for w in workers
    ]
    return headers, rows


def _fit(headers: list[str], rows: list[list[str]], width: int) -> list[str]:
    """The table with the columns it can afford at ``width``: MODEL, AGE... go before the
    ERROR column has less than :data:`_ERROR_ROOM` characters."""
    keep = list(range(len(headers)))
    for name in _DROPPED_FIRST:
        shown = [headers[i] for i in keep[:-1]]
        widths = [max(len(r[i]) for r in [headers, *rows]) for i in keep[:-1]]
        if sum(widths) + 2 * len(shown) + _ERROR_ROOM <= width:
            break
        keep.remove(headers.index(name))
    table = tables.table([headers[i] for i in keep], [[r[i] for i in keep] for r in rows])
    return table.splitlines()


def frame(
    node: Node,
    devices: Devices | None,
    workers: Iterable[Worker],
    width: int,
    height: int | None = None,
    note: str = "",
    live: bool = False,
    stale_since: datetime | None = None,
) -> list[str]:
    """The lines of one screen, each cut to ``width`` (and as many as ``height`` allows, the
    last saying how many workers did not fit). Failed and starting workers come first. With
    ``stale_since`` (hive unreachable since then) every figure is marked as stale."""
    records = sorted(workers, key=lambda w: (_FIRST.get(w.state, 2), w.id))
    counts: dict[str, int] = {}
    for w in records:
        counts[w.state.value] = counts.get(w.state.value, 0) + 1
    summary = ", ".join(f"{counts[s.value]} {s.value}" for s in State if s.value in counts)
    now = datetime.now(UTC)
    head = f"hive {node.version} on {node.hostname} · {len(records)} workers"
    head += f": {summary}" if summary else ""
    if stale_since is not None:  # first, where an 80-column line cannot cut it off
        gone = f"hive unreachable since {stale_since.astimezone():%H:%M:%S}"
        head, note = gone + (f" ({note})" if note else "") + f" · {head}", ""
    head += f" · {now:%H:%M:%S}" + (f" · {note}" if note else "") + ("  (q quits)" if live else "")
    lines = [head, ""]
    stale = (
        []
        if stale_since is None
        else [f"STALE: as of {stale_since.astimezone():%H:%M:%S}, before hive went away"]
    )
    if devices is not None:
        lines += [*stale, *tables.devices(devices).splitlines(), ""]
    headers, rows = _worker_rows(records, now)
    table = _fit(headers, rows, width)
    lines += [*stale, table[0]]
    body = table[1:]
    if height is not None and len(lines) + len(body) > height:
        room = max(height - len(lines) - 1, 0)
        hidden = len(body) - room
        body = [*body[:room], f"+{hidden} more (a taller terminal shows them; hive list has all)"]
    lines += body
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
        self.stale_since: datetime | None = None  # hive unreachable since then
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
            self.stale_since,
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
                    self.note, self.stale_since = "", None
                    self.redraw()
            except HiveConnectionError as exc:
                self.stale_since = self.stale_since or datetime.now(UTC)
                self.note = f"{exc.reason}; retrying"
                self.redraw()
            await asyncio.sleep(1.0)

    async def _poll_devices(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.devices = await self.client.devices()
            except HiveConnectionError:
                self.stale_since = self.stale_since or datetime.now(UTC)
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

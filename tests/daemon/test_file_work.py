"""hive's file work never harms a healthy worker: a huge line, a sparse log, a FIFO and a 1 GiB
file in ``workers_dir``, a worker writing 100 MB/s, a full state_dir.

Each attack runs beside a heartbeating demo worker with a short ``heartbeat_timeout``: a loop
blocked for longer than that would kill it as hung. A thread pings ``/health`` meanwhile and
prints the longest answer (``FIGURE`` lines, seen with ``pytest -s``): how long hive's loop was
blocked at most. No figure is asserted; the healthy worker's pid and state are.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hivetest import Hive, running_hive

from harness.disk import CannotMount, fill, tmpfs
from harness.waits import async_wait_for, wait_for

pytestmark = pytest.mark.timeout(240)

WORKERS = Path(__file__).parent.parent / "workers"
CAP = 20_000_000  # the flood's and the full disk's: small against 100 MB/s
WRITER = f"""
[backends.writer]
command = ["{{python}}", "{WORKERS / "log_writer.py"}"]
health_path = ""
startup_timeout = 600
"""
CONFIG = f"""
heartbeat_timeout = 3
restart_delay = 0.3
max_log_bytes = 200_000_000
{WRITER}"""
SMALL_CAP = f"""
heartbeat_timeout = 3
max_log_bytes = {CAP}
{WRITER}"""


@pytest.fixture(scope="module")
def hive() -> Iterator[Hive]:
    with running_hive(CONFIG) as daemon:
        yield daemon


class LoopLag:
    """Pings hive's ``/health`` from a thread, one request after the other, and keeps the
    longest answer time: an upper bound of how long hive's event loop was blocked."""

    def __init__(self, hive: Hive, name: str) -> None:
        self.port = hive.port
        self.name = name
        self.longest = 0.0
        self.count = 0
        self._asking: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LoopLag:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(150)
        if self._asking is not None:  # still unanswered: that long so far
            self.longest = max(self.longest, time.monotonic() - self._asking)
        print(
            f"\nFIGURE {self.name}: longest /health answer {self.longest * 1000:.1f} ms "
            f"over {self.count} pings"
        )

    def _run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=140)
        while not self._stop.is_set():
            # From the first try to an answer: a connection hive dropped while its loop was
            # blocked is tried again, and the time counts.
            self._asking = self._asking or time.monotonic()
            try:
                connection.request("GET", "/health")
                connection.getresponse().read()
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=140)
                continue
            self.longest = max(self.longest, time.monotonic() - self._asking)
            self._asking = None
            self.count += 1
            self._stop.wait(0.01)
        connection.close()


async def record(s: aiohttp.ClientSession, worker_id: str) -> dict[str, Any]:
    async with s.get(f"/v1/workers/{worker_id}") as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def spawn(s: aiohttp.ClientSession, **body: Any) -> dict[str, Any]:
    body.setdefault("model", "m")
    async with s.post("/v1/workers", json=body) as r:
        data = await r.json()
        assert r.status in (200, 201), data
        return dict(data)


async def delete(s: aiohttp.ClientSession, worker_id: str) -> None:
    async with s.delete(f"/v1/workers/{worker_id}") as r:
        assert r.status == 200, await r.text()


async def beating(s: aiohttp.ClientSession, worker_id: str) -> dict[str, Any]:
    """A demo worker, ready and heard from at least once."""
    await spawn(s, id=worker_id)

    async def heard() -> dict[str, Any] | None:
        found = await record(s, worker_id)
        return found if found["state"] == "ready" and found["last_heartbeat_at"] else None

    return dict(await async_wait_for(heard, timeout=60, what=f"{worker_id} heartbeating"))


async def unharmed(s: aiohttp.ClientSession, before: dict[str, Any]) -> None:
    """The healthy worker beats again after now, with the same process, never restarted."""
    since = datetime.now().astimezone()

    async def beat_since() -> dict[str, Any] | None:
        found = await record(s, before["id"])
        at = found["last_heartbeat_at"]
        return found if at and datetime.fromisoformat(at) > since else None

    now = await async_wait_for(beat_since, timeout=60, what="a heartbeat after the attack")
    assert now["pid"] == before["pid"], now
    assert now["state"] == "ready" and now["restarts"] == 0, now


async def test_a_48_mb_line_is_tailed_in_a_bounded_window(hive: Hive) -> None:
    log = hive.worker_log("long-line")
    async with hive.session() as s:
        healthy = await beating(s, "healthy-line")
        await spawn(
            s, id="long-line", backend="writer", restart="no", args=["--long-line", "48000000"]
        )
        wait_for(
            lambda: log.exists() and log.stat().st_size >= 48_000_000,
            timeout=60,
            what="the 48 MB line written",
        )
        with LoopLag(hive, "GET logs?tail=60 of a 48 MB line"):
            async with s.get("/v1/workers/long-line/logs", params={"tail": "60"}) as r:
                assert r.status == 200
                body = await r.read()
            await unharmed(s, healthy)
        assert len(body) <= 1_100_000, len(body)  # a window from the end, not the line
        assert body.endswith(b"x" * 1000)
        assert b"cut" in body.splitlines()[0]  # the cut is marked
        for worker_id in ("long-line", "healthy-line"):
            await delete(s, worker_id)


async def test_a_sparse_log_read_at_exit_is_bounded_and_marked_on_a_line_of_its_own(
    hive: Hive,
) -> None:
    log = hive.worker_log("sparse")
    async with hive.session() as s:
        healthy = await beating(s, "healthy-sparse")
        with LoopLag(hive, "the last line of a 64 MiB sparse log at exit"):
            await spawn(
                s,
                id="sparse",
                backend="writer",
                restart="no",
                args=["--sparse", str(64 << 20), "--exit", "3"],
            )

            async def failed() -> dict[str, Any] | None:
                found = await record(s, "sparse")
                return found if found["state"] == "failed" else None

            ended = await async_wait_for(failed, timeout=120, what="the sparse worker failed")
            await unharmed(s, healthy)
        assert ended["error"].startswith("exited with code 3"), ended["error"]
        assert "\x00" not in ended["error"]  # a hole is no text
        # hive's marker begins a line of its own, even after a last line without a newline
        # (and even when the log was truncated in between: the last words are in .log.1).
        async with s.get("/v1/workers/sparse/logs", params={"tail": "3"}) as r:
            tail = await r.text()
        assert "last words\n--- hive: " in tail, tail
        assert log.stat().st_blocks * 512 <= 1 << 20  # the hole was never copied as zeros
        for worker_id in ("sparse", "healthy-sparse"):
            await delete(s, worker_id)


async def test_a_fifo_in_workers_dir_is_refused_and_blocks_nothing(hive: Hive) -> None:
    directory = hive.home / "workers.d"
    directory.mkdir(exist_ok=True)
    fifo = directory / "x.toml"
    try:
        async with hive.session() as s:
            healthy = await beating(s, "healthy-fifo")
            os.mkfifo(fifo)
            with LoopLag(hive, "SIGHUP with a FIFO x.toml in workers_dir"):
                hive.signal(signal.SIGHUP)
                wait_for(
                    lambda: f"{fifo}: not a regular file" in hive.log(),
                    timeout=30,
                    what="the FIFO refused",
                )
                await unharmed(s, healthy)
            await delete(s, "healthy-fifo")
    finally:
        with contextlib.suppress(OSError):  # a hive blocked on it: a writer lets it go on
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        fifo.unlink(missing_ok=True)


async def test_a_1_gib_file_in_workers_dir_is_refused_unread(hive: Hive) -> None:
    directory = hive.home / "workers.d"
    directory.mkdir(exist_ok=True)
    big = directory / "big.toml"
    try:
        async with hive.session() as s:
            healthy = await beating(s, "healthy-big")
            with big.open("wb") as file:
                file.truncate(1 << 30)
            with LoopLag(hive, "SIGHUP with a 1 GiB file in workers_dir"):
                hive.signal(signal.SIGHUP)
                wait_for(
                    lambda: f"{big}: larger than" in hive.log(),
                    timeout=60,
                    what="the big file refused",
                )
                await unharmed(s, healthy)
            await delete(s, "healthy-big")
    finally:
        big.unlink(missing_ok=True)


class Sizes:
    """Samples the size of a worker's log (its live part and ``.log.1`` together) every
    millisecond from a thread, and keeps the peak and the bytes seen written."""

    def __init__(self, log: Path) -> None:
        self.parts = (log, log.with_name(log.name + ".1"))
        self.peak = 0
        self.peak_on_disk = 0
        self.written = 0
        self.rotations = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sizes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        last = 0
        while not self._stop.is_set():
            size = on_disk = 0
            for index, path in enumerate(self.parts):
                with contextlib.suppress(FileNotFoundError):
                    stat = path.stat()
                    size += stat.st_size
                    on_disk += stat.st_blocks * 512
                    if index == 0:
                        live = stat.st_size
                        self.written += live - last if live >= last else live
                        self.rotations += live < last
                        last = live
            self.peak = max(self.peak, size)
            self.peak_on_disk = max(self.peak_on_disk, on_disk)
            time.sleep(0.001)


# alone: the cap is kept by a thread that checks between writes, so the peak depends on that
# thread getting a core while the worker writes 100 MB/s; beside the parallel pass's three
# workers on 2 cores it peaked at 2.13x the cap once (1.13-1.31x alone).
@pytest.mark.alone
async def test_a_worker_writing_100_mb_a_second_is_held_under_twice_the_cap() -> None:
    with running_hive(SMALL_CAP) as hive:
        async with hive.session() as s:
            healthy = await beating(s, "healthy-flood")
            with (
                LoopLag(hive, "a worker writing 100 MB/s"),
                Sizes(hive.worker_log("flood")) as sizes,
            ):
                began = time.monotonic()
                await spawn(s, id="flood", backend="writer", args=["--rate", "100"])
                wait_for(lambda: sizes.written >= 600_000_000, timeout=120, what="600 MB written")
                seconds = time.monotonic() - began
                await unharmed(s, healthy)
            print(
                f"\nFIGURE log cap {CAP} bytes at {sizes.written / seconds / 1e6:.0f} MB/s: "
                f"peak {sizes.peak} bytes ({sizes.peak / CAP:.2f}x the cap), on disk "
                f"{sizes.peak_on_disk} bytes, {sizes.rotations} truncations in {seconds:.1f} s"
            )
            assert sizes.peak <= 2 * CAP, sizes.peak
            for worker_id in ("flood", "healthy-flood"):
                await delete(s, worker_id)


@contextlib.contextmanager
def mounted(path: Path, size: str) -> Iterator[Path]:
    try:
        with tmpfs(path, size) as mount_point:
            yield mount_point
    except CannotMount as exc:
        pytest.skip(str(exc))


async def test_a_sparse_log_fills_no_disk_and_a_full_disk_still_lets_workers_go() -> None:
    hive = Hive(SMALL_CAP)
    try:
        with mounted(hive.state_dir, "64m"):
            hive.start()
            async with hive.session() as s:
                healthy = await beating(s, "healthy-full")
                log = hive.worker_log("culprit")
                with LoopLag(hive, "a 4 GiB sparse log in a 64 MiB state_dir"):
                    await spawn(s, id="culprit", backend="writer", args=["--sparse", str(4 << 30)])
                    older = log.with_name(log.name + ".1")

                    def written() -> bool:
                        # Seen whole, or already cut (its end kept in .log.1): the cap's
                        # thread may look before this test does.
                        if log.exists() and log.stat().st_size > 4 << 30:
                            return True
                        return older.exists() and b"last words" in older.read_bytes()[-4096:]

                    wait_for(written, what="the sparse log written")
                    await unharmed(s, healthy)  # a few looks at its log went by
                parts = [log, log.with_name(log.name + ".1")]
                on_disk = sum(p.stat().st_blocks * 512 for p in parts if p.exists())
                assert on_disk <= 2 * CAP, on_disk
                filler = fill(hive.state_dir)
                try:
                    with LoopLag(hive, "DELETE on a full state_dir"):
                        for worker_id in ("culprit", "healthy-full"):
                            await delete(s, worker_id)
                    async with s.get("/v1/workers") as r:
                        assert (await r.json())["workers"] == []
                finally:
                    filler.unlink()
            assert hive.stop() == 0
    finally:
        hive.cleanup()

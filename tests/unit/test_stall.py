"""The loop watch (hive.workers.stall): a blocked loop is a stall of hive's, counted and logged,
and the deadlines of workers leave it out."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from harness.waits import async_wait_for
from hive.workers.stall import GRACE, HangTimer, LoopWatch


def _block(seconds: float) -> None:
    time.sleep(seconds)  # the loop itself stands still: what a blocking call on it does


async def test_a_blocked_loop_is_a_stall_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watch = LoopWatch(tick=0.1)
    watch.start()
    try:
        before = time.monotonic()
        await asyncio.sleep(0.15)
        assert watch.count == 0 and watch.away_since(before) == 0
        with caplog.at_level(logging.WARNING, "hive.stall"):
            _block(1.2)
            await asyncio.sleep(0)
            assert watch.away_since(before) >= 1.0
            await asyncio.sleep(0.3)  # the watch's own tick runs too: the stall counts once
        assert watch.count == 1 and watch.seconds >= 1.0
        assert "hive was not running for 1." in caplog.text
        assert "deadlines extended" in caplog.text
        assert watch.away_since(time.monotonic()) == 0
    finally:
        watch.close()


async def test_a_hang_deadline_leaves_out_the_time_hive_was_away() -> None:
    watch = LoopWatch(tick=0.1)
    watch.start()
    hung = asyncio.Event()
    timer = HangTimer(watch, hung)
    try:
        timer.arm(0.3)
        _block(1.0)  # past the deadline, but only because hive did not run
        await asyncio.sleep(0)
        assert not hung.is_set()
        timer.arm(0.3)  # the beat that waited in a socket while hive was stopped
        await asyncio.sleep(0.2)
        assert not hung.is_set()
        started = time.monotonic()
        await async_wait_for(hung.is_set, timeout=10, what="the hang once the beats stop")
        # Not before the grace after the stall ran out.
        assert time.monotonic() - started >= 0.1 and watch.grace_until() - GRACE > 0
    finally:
        timer.disarm()
        watch.close()


async def test_without_a_stall_a_silent_worker_hangs() -> None:
    watch = LoopWatch(tick=0.1)
    watch.start()
    hung = asyncio.Event()
    timer = HangTimer(watch, hung)
    try:
        timer.arm(0.2)
        await async_wait_for(hung.is_set, timeout=10, what="the hang")
        assert watch.count == 0
    finally:
        timer.disarm()
        watch.close()


async def test_a_timeout_leaves_out_the_time_hive_was_away() -> None:
    watch = LoopWatch(tick=0.1)
    watch.start()
    try:
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        soon = loop.create_future()
        loop.call_later(0.05, _block, 1.0)  # hive stops while the wait runs
        # Due after the 0.5 s (and after the stall), before the 0.5 s of hive's running time.
        loop.call_later(1.3, soon.set_result, None)
        done = await watch.first([never, soon], 0.5)
        assert done == {soon}
        assert not await watch.first([never], 0.1)  # and a timeout still runs out
        never.cancel()
    finally:
        watch.close()

"""The event stream itself, in process over a real registry and EventHub (no daemon): replay after a
reset, no repeats, and a writer that falls behind. The stream through a live daemon is in
tests/daemon/test_events.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from harness.waits import async_wait_for
from hive.models import SpawnRequest, State
from hive.state.events import EventHub
from hive.state.registry import Registry


def _add_workers(registry: Registry, n: int) -> None:
    """``n`` new workers: one change each."""
    for _ in range(n):
        worker_id = f"w{registry.seq + 1}"
        fields = {"id": worker_id, "model": "m", "backend": "demo", "device": "CPU-0"}
        fields |= {"port": 18000, "url": "http://127.0.0.1:18000"}
        registry.add(SpawnRequest(model="m"), "tok", lambda _, f=fields: f)


def _worker_events(written: list[bytes]) -> list[tuple[str | None, dict[str, Any]]]:
    """The ``event: worker`` messages written: (their id line or None, their data)."""
    found = []
    for message in written:
        lines = message.decode().split("\n")
        if lines[0] != "event: worker":
            continue
        ids = [line.removeprefix("id: ") for line in lines if line.startswith("id: ")]
        data = next(line.removeprefix("data: ") for line in lines if line.startswith("data: "))
        found.append((ids[0] if ids else None, json.loads(data)))
    return found


async def _stream_until(
    hub: EventHub, last: str | None, done: Callable[[list[bytes]], bool]
) -> list[bytes]:
    written: list[bytes] = []

    async def write(data: bytes) -> None:
        written.append(data)

    with hub.subscribe() as subscription:
        streaming = asyncio.create_task(subscription.stream(write, last, keepalive=30))
        await async_wait_for(lambda: done(written), timeout=5, what="the stream")
        hub.close()
        await asyncio.wait_for(streaming, 5)  # returns, does not raise
    return written


async def test_ids_name_the_instance_and_a_resume_replays_exactly_what_was_missed() -> None:
    registry = Registry()
    hub = EventHub(registry, ring_size=10, queue_size=10, instance="abc123")
    hub.start()
    _add_workers(registry, 3)
    await async_wait_for(lambda: len(hub.ring) == 3)
    assert [e.encode().split(b"\n")[1] for e in hub.ring] == [
        b"id: abc123-1",
        b"id: abc123-2",
        b"id: abc123-3",
    ]
    written = await _stream_until(hub, "abc123-1", lambda w: len(w) == 3)
    assert written == [b": hive events\n\n", hub.ring[1].encode(), hub.ring[2].encode()]
    # With an empty ring (a new hive), its own id 0 misses nothing either.
    empty = EventHub(Registry(), ring_size=10, queue_size=10)
    assert empty.subscribe().replay(0) == (False, [])


async def test_an_id_of_another_instance_is_reset_then_the_current_state_then_live() -> None:
    """Issue 26: a new hive numbers its events from 1 again, so an id from the hive before it
    (or a plain number, as ids were before they named their instance) cannot be resumed: the
    stream says reset, gives every worker as it is, then goes on live after that."""
    for last in ("0ld1nst-2", "2", "0"):
        registry = Registry()
        hub = EventHub(registry, ring_size=10, queue_size=10, instance="new")
        hub.start()
        _add_workers(registry, 3)  # w1, w2, w3, seqs 1..3: the new hive's own
        registry.attempt_ended("w2", State.FAILED, exit_code=1, error="boom")  # seq 4

        def live_one(written: list[bytes], registry: Registry = registry) -> bool:
            if len(written) == 5 and registry.seq == 4:
                _add_workers(registry, 1)  # seq 5, after the state was given: live
            return any(b"id: new-5" in message for message in written)

        written = await _stream_until(hub, last, live_one)
        assert written[0] == b": hive events\n\n"
        assert written[1] == b'event: reset\ndata: {"oldest": 1, "instance": "new"}\n\n'
        state = _worker_events(written[2:5])
        assert [(i, d["id"], d["from"], d["to"], d["snapshot"]) for i, d in state] == [
            (None, "w1", None, "starting", True),
            (None, "w2", None, "failed", True),
            ("new-4", "w3", None, "starting", True),  # only the last: a cut resumes it all
        ]
        assert {d["seq"] for _, d in state} == {4}
        assert state[1][1]["worker"]["error"] == "boom"
        live = _worker_events(written[5:])
        assert [(i, d["id"], d["seq"]) for i, d in live] == [("new-5", "w5", 5)]


async def test_an_id_the_ring_no_longer_holds_is_reset_then_the_current_state() -> None:
    registry = Registry()
    hub = EventHub(registry, ring_size=3, queue_size=10, instance="same")
    hub.start()
    _add_workers(registry, 5)  # seqs 1..5; the ring keeps 3..5
    written = await _stream_until(hub, "same-1", lambda w: len(w) == 7)
    assert written[1] == b'event: reset\ndata: {"oldest": 3, "instance": "same"}\n\n'
    state = _worker_events(written[2:])
    assert [d["id"] for _, d in state] == ["w1", "w2", "w3", "w4", "w5"]
    assert state[-1][0] == "same-5"


async def test_stream_gives_up_on_a_write_that_waits_past_the_queue() -> None:
    """A client whose socket does not drain is cut off once its queue overflows."""
    registry = Registry()
    hub = EventHub(registry, ring_size=100, queue_size=2)
    hub.start()
    blocked = asyncio.Event()

    async def write(data: bytes) -> None:
        blocked.set()
        await asyncio.Event().wait()  # never drains

    with hub.subscribe() as subscription:
        streaming = asyncio.create_task(subscription.stream(write, None, keepalive=30))
        await asyncio.wait_for(blocked.wait(), 5)
        _add_workers(registry, 3)  # one more than the queue holds
        await asyncio.wait_for(streaming, 5)  # returns, does not raise
        assert subscription.overflowed and subscription.cut.is_set()


async def test_with_no_worker_the_reset_itself_carries_the_id_to_resume_from() -> None:
    hub = EventHub(Registry(), ring_size=10, queue_size=10, instance="empty")
    hub.start()
    written = await _stream_until(hub, "other-7", lambda w: len(w) == 2)
    assert written[1] == b'event: reset\nid: empty-0\ndata: {"oldest": 1, "instance": "empty"}\n\n'

"""The event stream itself, in process over a real registry and EventHub (no daemon): replay after a
reset, no repeats, and a writer that falls behind. The stream through a live daemon is in
tests/daemon/test_events.py.
"""

from __future__ import annotations

import asyncio

from harness.waits import async_wait_for
from hive.models import SpawnRequest
from hive.state.events import EventHub
from hive.state.registry import Registry


def _add_workers(registry: Registry, n: int) -> None:
    """``n`` new workers: one change each."""
    for _ in range(n):
        worker_id = f"w{registry.seq + 1}"
        fields = {"id": worker_id, "model": "m", "backend": "demo", "device": "CPU-0"}
        fields |= {"port": 18000, "url": "http://127.0.0.1:18000"}
        registry.add(SpawnRequest(model="m"), "tok", lambda _, f=fields: f)


async def test_stream_replays_after_a_reset_then_ends_on_close() -> None:
    registry = Registry()
    hub = EventHub(registry, ring_size=3, queue_size=10)
    hub.start()
    _add_workers(registry, 5)  # seqs 1..5; the ring keeps 3..5
    ring = [e.encode() for e in hub.ring]
    written: list[bytes] = []

    async def write(data: bytes) -> None:
        written.append(data)

    with hub.subscribe() as subscription:
        streaming = asyncio.create_task(subscription.stream(write, 0, keepalive=0.05))
        await async_wait_for(lambda: len(written) >= 6, timeout=5, what="a keep-alive")
        _add_workers(registry, 1)
        await async_wait_for(lambda: registry.seq == 6 and written[-1] == hub.ring[-1].encode())
        hub.close()
        await asyncio.wait_for(streaming, 5)  # returns, does not raise
    assert written[:5] == [b": hive events\n\n", b'event: reset\ndata: {"oldest": 3}\n\n', *ring]
    assert set(written[5:-1]) == {b": keep-alive\n\n"}
    assert written[-1].startswith(b"event: worker\nid: 6\ndata: {")


async def test_stream_without_a_gap_has_no_reset_and_repeats_nothing() -> None:
    registry = Registry()
    hub = EventHub(registry, ring_size=10, queue_size=10)
    hub.start()
    _add_workers(registry, 3)
    written: list[bytes] = []

    async def write(data: bytes) -> None:
        written.append(data)

    with hub.subscribe() as subscription:
        streaming = asyncio.create_task(subscription.stream(write, 1, keepalive=30))
        await async_wait_for(lambda: len(written) == 3, timeout=5, what="the replay")
        hub.close()
        await asyncio.wait_for(streaming, 5)
    assert written == [b": hive events\n\n", hub.ring[1].encode(), hub.ring[2].encode()]
    # With an empty ring (a new hive), nothing is missed either.
    empty = EventHub(Registry(), ring_size=10, queue_size=10)
    assert empty.subscribe().replay(41) == (False, [])


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

"""The event hub: every registry change, in order, for ``GET /v1/events`` (Server-Sent Events).

The hub subscribes to the registry. Each change becomes one event, serialized once, with the
registry's sequence number as its id, and is kept in a bounded ring so that a client that lost
its connection resumes with ``Last-Event-ID`` without missing anything. Each connected client
has its own bounded queue: a client that falls more than ``queue_size`` events behind is cut
off (it may reconnect and resume from the ring), so a slow reader can never make hive's memory
grow. Registry subscribers may be called from any thread; the hub hands events to the event
loop with ``call_soon_threadsafe``, which keeps their order.

The server side of the stream is here too (:meth:`Subscription.stream`): the replay, the
``reset`` event for a client that asks for events the ring no longer has, keep-alives, and the
cut-off of a client whose socket stops draining; the handler only parses and writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from hive.state.records import HOT_FIELDS
from hive.state.registry import Change, Registry
from hive.timeouts import within


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    data: str  # JSON: {seq, at, id, from, to, worker}

    def encode(self) -> bytes:
        return f"event: worker\nid: {self.seq}\ndata: {self.data}\n\n".encode()


def _changed_fields(change: Change) -> list[str]:
    """The fields a change of fields changed (``from`` equal to ``to``), by name."""
    before, after = change.before, change.worker
    if before is None:
        return []
    return [
        name
        for name in type(after).model_fields
        if name not in HOT_FIELDS and getattr(before, name) != getattr(after, name)
    ]


def _event(change: Change) -> Event:
    data = {
        "seq": change.seq,
        "at": change.at.isoformat().replace("+00:00", "Z"),
        "id": change.id,
        "from": change.from_.value if change.from_ else None,
        "to": change.to.value if change.to else None,
        "worker": json.loads(change.worker.model_dump_json()),
        **({"renamed_to": change.renamed_to} if change.renamed_to else {}),
        **({"changed": _changed_fields(change)} if change.fields_only else {}),
    }
    return Event(change.seq, json.dumps(data, separators=(",", ":")))


class Overflow(Exception):
    """A client fell too far behind and was cut off."""


class Closed(Exception):
    """hive is shutting down; the stream ends."""


_CLOSE = Event(-1, "")

#: The response headers of an event stream.
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}

#: Kernel send buffer of an event stream: with the writer's own buffer it bounds what a client
#: that stops reading can hold in hive before its queue overflows and it is cut off.
EVENT_SNDBUF = 64 * 1024

#: Writes bytes to the client, e.g. ``aiohttp.web.StreamResponse.write``.
Write = Callable[[bytes], Awaitable[None]]


def limit_send_buffer(transport: asyncio.BaseTransport | None) -> None:
    """Shrink the kernel's send buffer of a TCP event stream to ``EVENT_SNDBUF``."""
    sock = transport.get_extra_info("socket") if transport else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, EVENT_SNDBUF)


def drop(transport: asyncio.BaseTransport | None) -> None:
    """Drop a stream's connection at once: a reset, so the backlog the client never read is
    discarded by the kernel too, instead of a close queued behind it."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class Subscription:
    """One client's view of the hub: a replay from the ring, then live events in order."""

    def __init__(self, hub: EventHub, size: int) -> None:
        self._hub = hub
        self._queue: asyncio.Queue[Event] = asyncio.Queue(size)
        self._newest = 0
        self.overflowed = False
        #: Set when the client falls ``queue_size`` events behind, even while a write blocks.
        self.cut = asyncio.Event()

    def __enter__(self) -> Subscription:
        self._hub._clients.add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._hub._clients.discard(self)

    def put(self, event: Event) -> None:
        if self.overflowed:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            self.cut.set()

    def replay(self, last_seq: int) -> tuple[bool, list[Event]]:
        """Events after ``last_seq`` still in the ring, and whether some are already gone."""
        ring = self._hub.ring
        missed = bool(ring) and ring[0].seq > last_seq + 1
        events = [e for e in ring if e.seq > last_seq]
        if events:
            self._newest = events[-1].seq
        return missed, events

    async def get(self, timeout: float) -> Event | None:
        """The next live event, or None after ``timeout`` seconds without one."""
        while True:
            if self.overflowed:
                raise Overflow
            got = await within(self._queue.get(), timeout)
            if got is None:
                return None
            event = got.result()
            if event is _CLOSE:
                raise Closed
            if event.seq > self._newest:  # skip what the replay already gave
                self._newest = event.seq
                return event

    async def send(self, write: Write, data: bytes) -> None:
        """Write, unless the client falls too far behind while the write waits on its socket."""
        if self.cut.is_set():
            raise Overflow
        written = asyncio.ensure_future(write(data))
        cut = asyncio.ensure_future(self.cut.wait())
        try:
            await asyncio.wait({written, cut}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut.cancel()
        if not written.done():
            written.cancel()
            raise Overflow
        written.result()

    async def stream(self, write: Write, last_seq: int | None, keepalive: float) -> None:
        """The whole event stream: a comment, the replay after ``last_seq``, then live events.

        When events after ``last_seq`` are already gone from the ring, an ``event: reset`` naming
        the oldest one still there comes first. A comment goes out after ``keepalive`` seconds
        without an event. Returns once the client is cut off (too far behind), hive shuts down
        or the connection resets: the caller should then drop the connection at once.
        """
        try:
            await self.send(write, b": hive events\n\n")
            if last_seq is not None:
                missed, replay = self.replay(last_seq)
                if missed:
                    oldest = replay[0].seq if replay else self._hub.registry.seq + 1
                    data = json.dumps({"oldest": oldest})
                    await self.send(write, f"event: reset\ndata: {data}\n\n".encode())
                for event in replay:
                    await self.send(write, event.encode())
            while True:
                event = await self.get(keepalive)
                await self.send(write, event.encode() if event else b": keep-alive\n\n")
        except (Overflow, Closed, ConnectionResetError):
            return


class EventHub:
    """Ordered worker events with a replay ring and bounded per-client queues."""

    def __init__(
        self, registry: Registry, ring_size: int = 10_000, queue_size: int = 1_000
    ) -> None:
        self.registry = registry
        self.ring: deque[Event] = deque(maxlen=ring_size)
        self.queue_size = queue_size
        self._clients: set[Subscription] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._unsubscribe = self.registry.subscribe(self._on_change)

    def close(self) -> None:
        """Stop listening and end every client's stream."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for client in list(self._clients):
            client.put(_CLOSE)
            client.cut.set()

    def subscribe(self) -> Subscription:
        """A client's subscription; use it as a context manager while the client is connected."""
        return Subscription(self, self.queue_size)

    @property
    def clients(self) -> int:
        return len(self._clients)

    def _on_change(self, change: Change) -> None:
        # On the loop, in order (the registry delivers there): serialize, remember, hand on.
        event = _event(change)
        self.ring.append(event)
        for client in self._clients:
            client.put(event)

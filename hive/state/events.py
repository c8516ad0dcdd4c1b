"""The event hub: every registry change, in order, for ``GET /v1/events`` (Server-Sent Events).

The hub subscribes to the registry. Each change becomes one event, serialized once, with the id
``<instance>-<seq>``: the hub's *instance*, a short random name drawn at each start of hive, and
the registry's sequence number (which a new hive starts again from 1). Events are kept in a
bounded ring so that a client that lost its connection resumes with ``Last-Event-ID`` without
missing anything. An id of another instance (a hive that has restarted since) or one the ring
no longer reaches cannot be resumed: the stream says ``event: reset``, then gives the current
state, one ``event: worker`` per worker, then goes on live. Each connected client
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
import re
import secrets
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from hive.models import Worker
from hive.state.records import HOT_FIELDS
from hive.state.registry import Change, Registry, now
from hive.timeouts import within

#: An event id: ``<instance>-<seq>``, the instance a few lowercase letters and digits.
EVENT_ID = re.compile(r"([0-9a-z]{1,32})-([0-9]{1,18})")
_SEQ = re.compile(r"[0-9]{1,18}")
#: What ``Last-Event-ID`` may be: an event id, or a plain sequence number (an older hive's).
LAST_EVENT_ID_PATTERN = r"^(?:[0-9a-z]{1,32}-)?[0-9]{1,18}$"


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    data: str  # JSON: {seq, at, id, from, to, worker}
    #: The SSE id, ``<instance>-<seq>``; None: the event carries none (it keeps the last one).
    id: str | None = None

    def encode(self) -> bytes:
        line = f"id: {self.id}\n" if self.id is not None else ""
        return f"event: worker\n{line}data: {self.data}\n\n".encode()


def parse_event_id(value: str) -> tuple[str | None, int]:
    """``Last-Event-ID`` as (instance, seq): ``<instance>-<seq>``, or a plain sequence number
    (instance None, as hive gave them before ids named their instance). ValueError otherwise."""
    value = value.strip()
    if _SEQ.fullmatch(value):
        return None, int(value)
    match = EVENT_ID.fullmatch(value)
    if match is None:
        raise ValueError(f"{value[:40]!r} is not an event id (<instance>-<seq>)")
    return match.group(1), int(match.group(2))


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


def _event(change: Change, instance: str) -> Event:
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
    return Event(change.seq, json.dumps(data, separators=(",", ":")), f"{instance}-{change.seq}")


def _snapshot(records: list[Worker], seq: int, instance: str) -> list[Event]:
    """The current state as events, one per worker (``from`` null: each appears to a client
    that forgot everything at ``reset``; ``"snapshot": true``). Only the last carries an id,
    ``<instance>-<seq>``: a client cut off half-way through resumes with its old id and gets
    the whole state again, never half of it."""
    at = now().isoformat().replace("+00:00", "Z")
    events = []
    for i, record in enumerate(records):
        data = {
            "seq": seq,
            "at": at,
            "id": record.id,
            "from": None,
            "to": record.state.value,
            "worker": json.loads(record.model_dump_json()),
            "snapshot": True,
        }
        last = i == len(records) - 1
        events.append(
            Event(
                seq, json.dumps(data, separators=(",", ":")), f"{instance}-{seq}" if last else None
            )
        )
    return events


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
        missed = missed or last_seq > self._hub.registry.seq  # ahead of this hive: not its id
        events = [e for e in ring if e.seq > last_seq]
        if events:
            self._newest = events[-1].seq
        return missed, events

    def snapshot(self) -> tuple[int, list[Event]]:
        """The current state (:func:`_snapshot`) and the sequence number it is as of; the live
        events after it follow, none before it."""
        hub = self._hub
        with hub.registry.locked() as entries:
            seq = hub.registry.seq
            records = [entry.record for entry in entries.values()]
        self._newest = seq
        return seq, _snapshot(records, seq, hub.instance)

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

    async def stream(self, write: Write, last: str | None, keepalive: float) -> None:
        """The whole event stream: a comment, the replay after the event id ``last``, then live
        events.

        When ``last`` names another instance of hive (or is a plain number, as ids were before
        they named one), or events after it are already gone from the ring, an ``event: reset``
        comes first, with ``{"oldest", "instance"}`` (the oldest sequence number the ring still
        has, and this hive's instance), then the current state (:meth:`snapshot`) instead of a
        replay; with no worker at all, the reset carries the id to resume from. A comment goes
        out after ``keepalive`` seconds without an event. Returns once
        the client is cut off (too far behind), hive shuts down or the connection resets: the
        caller should then drop the connection at once.
        """
        hub = self._hub
        try:
            await self.send(write, b": hive events\n\n")
            if last is not None:
                instance, last_seq = parse_event_id(last)
                missed, replay = (True, []) if instance != hub.instance else self.replay(last_seq)
                if missed:
                    seq, replay = self.snapshot()
                    oldest = hub.ring[0].seq if hub.ring else seq + 1
                    data = json.dumps({"oldest": oldest, "instance": hub.instance})
                    # No worker: the reset itself carries the id to resume from.
                    line = "" if replay else f"id: {hub.instance}-{seq}\n"
                    await self.send(write, f"event: reset\n{line}data: {data}\n\n".encode())
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
        self,
        registry: Registry,
        ring_size: int = 10_000,
        queue_size: int = 1_000,
        instance: str | None = None,
    ) -> None:
        self.registry = registry
        #: Names this hive in event ids: drawn at each start, so no id of an earlier hive (whose
        #: sequence numbers the new one reuses from 1) is taken for one of its own.
        self.instance = instance or secrets.token_hex(4)
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
        event = _event(change, self.instance)
        self.ring.append(event)
        for client in self._clients:
            client.put(event)

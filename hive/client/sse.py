"""Server-Sent Events, read incrementally: bytes in as they arrive, events out.

The reading half of the ``text/event-stream`` format (WHATWG HTML, "Server-sent events"):
lines end in CRLF, LF or CR, split anywhere across chunks; a line starting with ``:`` is a
comment; ``field: value`` loses one space after the colon; ``data`` lines are joined with
newlines; ``id`` is kept for the events after it; a blank line ends an event, and an event with
no ``data`` line is dropped. ``retry`` and unknown fields are ignored. The server's half is
``hive/state/events.py``.

```python
parser = SSEParser()
async for chunk in response.content:
    for event in parser.feed(chunk):
        print(event.event, event.id, event.data)
```
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_EOL = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class SSEEvent:
    """One event: its type (``message`` when the stream named none), data and last id."""

    event: str
    data: str
    id: str | None = None


class SSEParser:
    """Turns a byte stream into :class:`SSEEvent` objects, one :meth:`feed` at a time."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._skip_lf = False  # the last chunk ended in CR: a LF first in the next ends that line
        self._first = True
        self._event = ""
        self._data: list[str] = []
        self._last_id: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """The events that ``chunk`` completes, in order (a partial line waits for the next)."""
        if self._skip_lf:
            self._skip_lf = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        self._buffer += chunk
        events = []
        start = 0
        for end in _EOL.finditer(self._buffer):
            event = self._line(self._buffer[start : end.start()].decode("utf-8", "replace"))
            if event is not None:
                events.append(event)
            start = end.end()
        if start and start == len(self._buffer) and self._buffer.endswith(b"\r"):
            self._skip_lf = True
        del self._buffer[:start]
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if self._first:
            self._first = False
            line = line.removeprefix("\ufeff")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._last_id = value
        return None

    def _dispatch(self) -> SSEEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return SSEEvent(event or "message", "\n".join(data), self._last_id)


__all__ = ["SSEEvent", "SSEParser"]

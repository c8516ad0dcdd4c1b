"""The Server-Sent Events reader (hive/sse.py) on byte streams cut every way."""

from __future__ import annotations

import pytest

from hive.client.sse import SSEEvent, SSEParser

# What hive writes (hive/events.py and the reset in hive/api/routes.py), with a keep-alive.
WIRE = (
    b": keep-alive\n\n"
    b'event: reset\ndata: {"oldest": 4}\n\n'
    b'event: worker\nid: 7\ndata: {"seq": 7, "to": "ready"}\n\n'
)
EVENTS = [
    SSEEvent("reset", '{"oldest": 4}', None),
    SSEEvent("worker", '{"seq": 7, "to": "ready"}', "7"),
]


def feed_all(parser: SSEParser, chunks: list[bytes]) -> list[SSEEvent]:
    return [event for chunk in chunks for event in parser.feed(chunk)]


def test_reads_what_hive_writes() -> None:
    assert SSEParser().feed(WIRE) == EVENTS


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16])
def test_any_split_gives_the_same_events(size: int) -> None:
    chunks = [WIRE[i : i + size] for i in range(0, len(WIRE), size)]
    assert feed_all(SSEParser(), chunks) == EVENTS


@pytest.mark.parametrize("eol", [b"\r\n", b"\r", b"\n"])
def test_every_line_ending_and_crlf_split_across_chunks(eol: bytes) -> None:
    wire = WIRE.replace(b"\n", eol)
    assert SSEParser().feed(wire) == EVENTS
    chunks = [wire[i : i + 1] for i in range(len(wire))]
    assert feed_all(SSEParser(), chunks) == EVENTS


def test_an_event_is_only_out_once_its_blank_line_is_in() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: worker\ndata: 1\n") == []
    assert parser.feed(b"\n") == [SSEEvent("worker", "1")]


def test_field_rules() -> None:
    parser = SSEParser()
    wire = (
        b"\xef\xbb\xbfdata:no space\n\n"  # a BOM first; no space after the colon
        b"data:  two spaces\n\n"  # only one space is dropped
        b"data: a\ndata: b\n\n"  # data lines join with a newline
        b"id: 3\nretry: 10\nunknown: x\ndata\n\n"  # a bare field name; id stays
        b"data: after\n\n"
        b"event: lonely\n\n"  # no data: no event, and the type does not carry over
        b"data: plain\n\n"
    )
    assert parser.feed(wire) == [
        SSEEvent("message", "no space"),
        SSEEvent("message", " two spaces"),
        SSEEvent("message", "a\nb"),
        SSEEvent("message", "", "3"),
        SSEEvent("message", "after", "3"),
        SSEEvent("message", "plain", "3"),
    ]


def test_a_character_split_across_chunks_is_decoded_whole() -> None:
    wire = "data: caf\u00e9\n\n".encode()
    cut = wire.index(b"\xa9")
    assert feed_all(SSEParser(), [wire[:cut], wire[cut:]]) == [SSEEvent("message", "caf\u00e9")]

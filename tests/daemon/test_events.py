"""``GET /v1/events``: ordered Server-Sent Events, resume, keep-alive, slow clients, the CLI."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import psutil
import pytest
from hivetest import Hive, running_hive

from harness.waits import async_wait_for

pytestmark = pytest.mark.timeout(120)

CONFIG = "events_keepalive = 0.2\nevents_buffer = 50\nevents_queue = 5\n"


@pytest.fixture(scope="module")
def hive() -> Iterator[Hive]:
    with running_hive(CONFIG) as daemon:
        yield daemon


async def sse(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """Each SSE message as {event, id, data, comment}, parsed from the raw wire format."""
    message: dict[str, Any] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line == "":
            if message:
                yield message
            message = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(": ")
            message[name] = json.loads(value) if name == "data" else value


async def next_events(
    stream: AsyncIterator[dict[str, Any]], n: int, fields: bool = False
) -> list[dict[str, Any]]:
    """The next ``n`` events; changes of fields only (``changed`` in the data) are skipped
    unless ``fields``, so that a test of states reads states."""
    got: list[dict[str, Any]] = []
    while len(got) < n:
        message = await asyncio.wait_for(anext(stream), 30)
        if "comment" in message:
            continue
        if not fields and "changed" in message.get("data", {}):
            continue
        got.append(message)
    return got


async def events_until(
    stream: AsyncIterator[dict[str, Any]], done: Any, timeout: float = 30
) -> list[dict[str, Any]]:
    """Every event (changes of fields too) up to and including the first for which ``done``."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        async for message in stream:
            if "comment" in message:
                continue
            got.append(message)
            if done(message):
                return got
    raise AssertionError(f"the stream ended before the event waited for: {got}")


async def spawn(s: aiohttp.ClientSession, worker_id: str) -> dict[str, Any]:
    async with s.post(
        "/v1/workers", params={"wait": "ready"}, json={"model": "m", "id": worker_id}
    ) as r:
        assert r.status == 200
        return await r.json()


async def test_every_change_in_order_with_its_sequence(hive: Hive) -> None:
    async with hive.session() as s, s.get("/v1/events") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        stream = sse(r)
        await spawn(s, "ev-a")
        async with s.post("/v1/workers/ev-a/stop", params={"wait": "true"}) as stop:
            assert stop.status == 200
        async with s.delete("/v1/workers/ev-a") as gone:
            assert gone.status == 200
        events = await next_events(stream, 4)
    assert [e["event"] for e in events] == ["worker"] * 4
    changes = [(e["data"]["from"], e["data"]["to"]) for e in events]
    assert changes == [
        (None, "starting"),
        ("starting", "ready"),
        ("ready", "stopped"),
        ("stopped", None),
    ]
    seqs = [e["data"]["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    instance = events[0]["id"].split("-")[0]  # ids name this hive: <instance>-<seq>
    assert [e["id"] for e in events] == [f"{instance}-{seq}" for seq in seqs]
    for e in events:
        assert set(e["data"]) == {"seq", "at", "id", "from", "to", "worker"}
        assert e["data"]["id"] == "ev-a" and e["data"]["worker"]["id"] == "ev-a"
    assert events[1]["data"]["worker"]["state"] == "ready"


async def test_resume_with_last_event_id(hive: Hive) -> None:
    async with hive.session() as s:
        async with s.get("/v1/events") as r:
            stream = sse(r)
            await spawn(s, "ev-b")
            ready = (await next_events(stream, 2))[-1]
        # Disconnected; meanwhile the worker stops and is forgotten. Resuming replays exactly
        # what was missed, then carries on live: nothing lost, nothing repeated.
        async with s.post("/v1/workers/ev-b/stop", params={"wait": "true"}):
            pass
        async with s.delete("/v1/workers/ev-b"):
            pass
        async with s.get("/v1/events", headers={"Last-Event-ID": ready["id"]}) as r:
            stream = sse(r)
            missed = await events_until(stream, lambda e: e["data"]["to"] is None)
            await spawn(s, "ev-b2")
            live = await events_until(
                stream, lambda e: e["data"]["to"] == "ready" and "changed" not in e["data"]
            )
        seqs = [e["data"]["seq"] for e in missed + live]
        first = int(ready["id"].rsplit("-", 1)[1]) + 1
        assert seqs == list(range(first, first + len(seqs))), seqs
        states = [e for e in missed if "changed" not in e["data"]]
        assert [(e["data"]["from"], e["data"]["to"]) for e in states] == [
            ("ready", "stopped"),
            ("stopped", None),
        ]
        assert {e["data"]["id"] for e in missed} == {"ev-b"}
        assert {e["data"]["id"] for e in live} == {"ev-b2"}
        async with s.delete("/v1/workers/ev-b2"):
            pass


async def test_gave_up_and_router_status_are_told() -> None:
    """Issue 24: every named change reaches /v1/events, not only changes of state: giving up
    after the last restart, and a router's view of a worker."""
    with socket.socket() as closed:  # a router address where nothing listens
        closed.bind(("127.0.0.1", 0))
        router = f"http://127.0.0.1:{closed.getsockname()[1]}"
    config = f"""{CONFIG}restart_delay = 0.1
restart_delay_max = 0.2
max_restarts = 1

[[routers]]
url = "{router}"
"""
    with running_hive(config) as daemon:
        async with daemon.session() as s, s.get("/v1/events") as r:
            stream = sse(r)
            async with s.post(
                "/v1/workers", json={"model": "m", "id": "ev-gu", "args": ["--fail-after", "0.5"]}
            ) as spawned:
                assert spawned.status == 201, await spawned.text()
            seen = await events_until(
                stream,
                lambda e: (
                    "gave up" in (e["data"]["worker"]["error"] or "") and "changed" in e["data"]
                ),
                timeout=60,
            )
            gave_up = seen[-1]["data"]
            assert gave_up["from"] == gave_up["to"] == "failed"
            assert "error" in gave_up["changed"]
            routers = [e["data"] for e in seen if "routers" in e["data"].get("changed", [])]
            assert routers, [e["data"].get("changed") for e in seen]
            assert router in routers[0]["worker"]["routers"]
            async with s.delete("/v1/workers/ev-gu") as gone:
                assert gone.status == 200


async def test_too_old_last_event_id_says_reset(hive: Hive) -> None:
    async with hive.session() as s:
        await spawn(s, "ev-c")
        await _worker_heartbeats(s, "ev-c", 60)  # more changes than the ring keeps
        instance = (await _any_event_id(s)).split("-")[0]
        async with s.get("/v1/events", headers={"Last-Event-ID": f"{instance}-0"}) as r:
            first = (await next_events(sse(r), 1))[0]
        assert first["event"] == "reset" and first["data"]["oldest"] > 1
        assert first["data"]["instance"] == instance
        async with s.delete("/v1/workers/ev-c"):
            pass


async def _any_event_id(s: aiohttp.ClientSession) -> str:
    """The id hive gives its latest event (a stream from an id of another instance starts with
    the current state, which ends with one)."""
    async with s.get("/v1/events", headers={"Last-Event-ID": "x0-0"}) as r:
        async for message in sse(r):
            if "id" in message:
                return str(message["id"])
    raise AssertionError("no event id")


async def _worker_heartbeats(s: aiohttp.ClientSession, worker_id: str, n: int) -> int:
    """``n`` ready/busy flips of a worker, each one a state change."""
    for i in range(n):
        body = {"state": "busy" if i % 2 == 0 else "ready", "in_flight": i % 2}
        async with s.post(f"/v1/workers/{worker_id}/heartbeat", json=body) as r:
            assert r.status == 200
    return n


async def test_keep_alive_comments(hive: Hive) -> None:
    async with hive.session() as s, s.get("/v1/events") as r:
        stream = sse(r)
        comments = 0
        while comments < 3:
            message = await asyncio.wait_for(anext(stream), 10)
            comments += message.get("comment") == "keep-alive"


async def test_bad_last_event_id_is_422(hive: Hive) -> None:
    async with hive.session() as s, s.get("/v1/events", headers={"Last-Event-ID": "x"}) as r:
        assert r.status == 422
        assert (await r.json())["error"]["code"] == "invalid"


async def test_a_client_that_stops_reading_is_cut_off(hive: Hive) -> None:
    """It cannot make hive hold more than a bounded backlog: past it, the stream is dropped.

    The reader reads nothing until hive has let it go (its socket's state says so without
    consuming what is buffered), then drains to the end of what hive sent."""
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.connect(("127.0.0.1", hive.port))
    request = f"GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {hive.token}\r\n\r\n"
    reader.sendall(request.encode())
    try:
        async with hive.session() as s:
            await spawn(s, "ev-slow")
            # Each flip is an event of about 1 KB that the reader never reads.
            flips = 0
            while flips < 3000 and not _let_go(reader):
                flips += await _worker_heartbeats(s, "ev-slow", 100)
            assert _let_go(reader), "hive kept streaming to a client that reads nothing"
            assert flips < 3000
            assert _closed_by_peer(reader)
            async with s.delete("/v1/workers/ev-slow"):
                pass
    finally:
        reader.close()


def _let_go(sock: socket.socket) -> bool:
    """True once hive has closed or reset its end of ``sock`` (read from the kernel's view)."""
    local = sock.getsockname()
    for conn in psutil.Process().net_connections(kind="tcp4"):
        if conn.laddr and (conn.laddr.ip, conn.laddr.port) == local:
            return conn.status not in (psutil.CONN_ESTABLISHED, psutil.CONN_SYN_SENT)
    return True  # reset: the socket is no longer a connection


def _closed_by_peer(sock: socket.socket) -> bool:
    """Drain what is buffered; True once hive has closed or reset the connection."""
    sock.settimeout(10)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def test_cli_events_json(hive: Hive) -> None:
    lines: list[dict[str, Any]] = []
    async with hive.session() as s:
        await spawn(s, "ev-cli")
        proc = subprocess.Popen(
            [*hive.cli_command(), "events", "--json"],
            env={**hive.env, "HIVE_URL": f"unix://{hive.socket}"},
            stdout=subprocess.PIPE,
            text=True,
        )

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(json.loads(line))

        reading = asyncio.create_task(asyncio.to_thread(read))
        try:
            # Flip the worker busy/ready until the CLI, once connected, has printed a change.
            async def printed() -> bool:
                if not lines:
                    await _worker_heartbeats(s, "ev-cli", 1)
                return bool(lines)

            await async_wait_for(
                printed,
                timeout=30,
                interval=0.1,
                what="hive events to print a change",
            )
        finally:
            proc.terminate()
            proc.wait(10)
            await reading
        async with s.delete("/v1/workers/ev-cli"):
            pass
    assert lines[0]["id"] == "ev-cli" and lines[0]["to"] in ("busy", "ready")
    assert set(lines[0]) == {"seq", "at", "id", "from", "to", "worker", "event_id"}
    assert lines[0]["event_id"].endswith(f"-{lines[0]['seq']}")  # what --since takes


async def test_shutdown_ends_event_streams() -> None:
    with running_hive(CONFIG) as daemon:
        async with daemon.session() as s, s.get("/v1/events") as r:
            stream = sse(r)
            await asyncio.wait_for(anext(stream), 10)  # connected
            daemon.signal(15)
            assert daemon.proc is not None
            assert await asyncio.to_thread(daemon.proc.wait, 30) == 0
            daemon.proc = None
            with pytest.raises((StopAsyncIteration, aiohttp.ClientError)):
                while True:
                    await asyncio.wait_for(anext(stream), 10)
    await async_wait_for(lambda: True)


# -- the stream itself, in process (no daemon) ------------------------------------------------

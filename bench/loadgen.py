"""A closed-loop HTTP/1.1 load generator: N keep-alive connections, one request in flight each.

``python bench/loadgen.py --port P --method POST --path /x --header 'K: V' --body '{}'
--connections 16 --seconds 5 --warmup 0.5`` prints one JSON object: requests, seconds, rate,
latency percentiles in ms, error count and status counts.

It writes raw requests and reads responses by ``Content-Length`` on plain asyncio protocols,
which is several times cheaper per request than an HTTP client library: on a small machine the
generator must not be what limits the figure. It runs in its own process (its own core).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

# The repository's root, for harness.stats (which imports nothing else).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.stats import percentile


class Connection(asyncio.Protocol):
    def __init__(self, gen: Generator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.need: int | None = None
        self.status = 0
        self.sent = 0.0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        self.sent = time.perf_counter()
        self.transport.write(self.gen.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.need is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
                self.status = int(head[0].split(" ", 2)[1])
                length = 0
                for line in head[1:]:
                    name, _, value = line.partition(":")
                    name = name.strip().lower()
                    if name == "content-length":
                        length = int(value)
                    elif name == "transfer-encoding" and "chunked" in value.lower():
                        raise RuntimeError("chunked responses are not supported")
                self.need = end + 4 + length
            if len(self.buffer) < self.need:
                return
            del self.buffer[: self.need]
            self.need = None
            self.gen.done(self.status, time.perf_counter() - self.sent)
            if self.gen.running:
                self.send()
            else:
                assert self.transport is not None
                self.transport.close()
                return

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if self.gen.running:
            self.gen.errors += 1


class Generator:
    def __init__(self, args: argparse.Namespace) -> None:
        body = args.body.encode()
        lines = [f"{args.method} {args.path} HTTP/1.1", f"Host: {args.host}:{args.port}"]
        lines += args.header
        if body or args.method in ("POST", "PUT"):
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        self.running = True
        self.recording = False
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.errors = 0

    def done(self, status: int, latency: float) -> None:
        if self.recording:
            self.latencies.append(latency)
            self.statuses[status] += 1


async def run(args: argparse.Namespace) -> dict[str, object]:
    gen = Generator(args)
    loop = asyncio.get_running_loop()
    conns: list[Connection] = []
    for _ in range(args.connections):
        _, conn = await loop.create_connection(lambda: Connection(gen), args.host, args.port)
        conns.append(conn)
    await asyncio.sleep(args.warmup)
    gen.recording = True
    started = time.perf_counter()
    await asyncio.sleep(args.seconds)
    gen.recording = False
    elapsed = time.perf_counter() - started
    gen.running = False
    await asyncio.wait([c.closed for c in conns], timeout=10)
    ordered = sorted(gen.latencies)
    ok = sum(n for status, n in gen.statuses.items() if 200 <= status < 300)
    return {
        "requests": len(ordered),
        "ok": ok,
        "seconds": round(elapsed, 3),
        "rate": round(len(ordered) / elapsed, 1),
        "connections": args.connections,
        "p50_ms": round(percentile(ordered, 0.50) * 1000, 3),
        "p95_ms": round(percentile(ordered, 0.95) * 1000, 3),
        "p99_ms": round(percentile(ordered, 0.99) * 1000, 3),
        "max_ms": round(ordered[-1] * 1000, 3) if ordered else math.nan,
        "errors": gen.errors,
        "statuses": {str(k): v for k, v in sorted(gen.statuses.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--path", required=True)
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--body", default="")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()

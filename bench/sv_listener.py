"""A supervisord event listener: each PROCESS_STATE event as a UDP datagram to the bench.

The datagram is JSON: ``{"at": <time.time() when read>, "event": name, "processname", "pid", ...}``
to ``127.0.0.1:$BENCH_UDP_PORT``. supervisord speaks to it over stdin/stdout (its listener
protocol: ``READY``, a header line, a payload, ``RESULT 2\\nOK``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time


def main() -> None:
    target = ("127.0.0.1", int(os.environ["BENCH_UDP_PORT"]))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        stdout.write(b"READY\n")
        stdout.flush()
        line = stdin.readline()
        if not line:
            return
        stamp = time.time()
        headers = dict(item.split(":", 1) for item in line.decode().split())
        payload = stdin.read(int(headers["len"])).decode()
        fields = dict(
            item.split(":", 1) for item in payload.split("\n", 1)[0].split() if ":" in item
        )
        message = {"at": stamp, "event": headers.get("eventname"), **fields}
        sock.sendto(json.dumps(message).encode(), target)
        stdout.write(b"RESULT 2\nOK")
        stdout.flush()


if __name__ == "__main__":
    main()

"""A worker that attacks its own log (its stdout, the log file hive opened with O_APPEND).

``--long-line N``: writes N bytes of ``x`` with no newline, then sleeps.
``--sparse N``: extends its log by a hole of N bytes (``ftruncate`` of its stdout), writes
``last words`` with no newline, then sleeps, or exits with ``--exit CODE``.
``--rate MB``: writes MB megabytes a second, in lines of 1 MiB, until stopped.

It has no health path: hive takes it as ready once it runs (``health_path = ""``).
"""

import argparse
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--long-line", type=int)
parser.add_argument("--sparse", type=int)
parser.add_argument("--exit", type=int)
parser.add_argument("--rate", type=float)
args = parser.parse_args()
out = sys.stdout.fileno()


def write_all(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(out, view) :]


if args.long_line:
    block = b"x" * (1 << 20)
    left = args.long_line
    while left > 0:
        write_all(block[: min(left, len(block))])
        left -= len(block)
if args.sparse:
    os.ftruncate(out, os.fstat(out).st_size + args.sparse)
    write_all(b"last words")
    if args.exit is not None:
        sys.exit(args.exit)
if args.rate:
    line = b"y" * ((1 << 20) - 1) + b"\n"
    per_second = args.rate * 1_000_000
    began, written = time.monotonic(), 0
    while True:
        ahead = written / per_second - (time.monotonic() - began)
        if ahead > 0:
            time.sleep(ahead)
        write_all(line)
        written += len(line)
while True:
    time.sleep(60)

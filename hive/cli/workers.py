"""The commands on workers: spawn, list, show, stop, rm, restart and logs."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

from hive.cli import output, tables
from hive.cli.args import FAILED, OK, UsageError, err, spawn_request
from hive.cli.args import print_json as _print_json
from hive.client import HiveAPIError, HiveClient, HiveClientError, HiveConnectionError
from hive.client.client import CLOSED_MID_STREAM
from hive.models import LIVE_STATES, MARKER, State, Worker

#: How many log lines ``hive spawn`` shows when a worker fails to start.
FAILURE_TAIL = 20


class Progress:
    """One status line on stderr while waiting: redrawn in place on a terminal, else per change."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = ""
        self.start = time.monotonic()

    def show(self, text: str) -> None:
        line = f"{text} ({tables.duration(time.monotonic() - self.start)})"
        if self.tty:
            width = shutil.get_terminal_size().columns - 1  # one line, however narrow
            sys.stderr.write("\r\x1b[2K" + line[: max(width, 20)])
            sys.stderr.flush()
        elif text != self.last:
            print(line, file=sys.stderr)
        self.last = text

    def done(self) -> None:
        if self.tty and self.last:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()


async def _wait_ready(
    client: HiveClient, record: Worker, timeout: float | None, progress: Progress
) -> Worker:
    """Follow a starting worker until it is ready, fails or stops, showing progress."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last_line = ""
    polls = 0
    while record.state == State.STARTING and record.desired == "running":
        if deadline is not None and time.monotonic() > deadline:
            break
        detail = f": {last_line}" if last_line else ""
        progress.show(f"{record.id} starting on {record.device}, pid {record.pid}{detail}")
        await asyncio.sleep(0.1)
        record = await client.get(record.id)
        polls += 1
        if polls % 5 == 0:
            lines = (await client.logs(record.id, tail=5)).splitlines()
            output = [line for line in lines if line.strip() and not line.startswith(MARKER)]
            last_line = output[-1][:100] if output else last_line
    progress.done()
    return record


async def _report_start(client: HiveClient, record: Worker, as_json: bool) -> int:
    if as_json:
        _print_json(record)
    if record.state in (State.READY, State.BUSY):
        if not as_json:
            startup = ""
            if record.started_at and record.ready_at:
                startup = f" in {(record.ready_at - record.started_at).total_seconds():.2f}s"
            print(
                f"{record.id} ready{startup} at {record.url} on {record.device} (pid {record.pid})"
            )
        return OK
    if record.state == State.STARTING:
        err(f"{record.id} is still starting; follow it with: hive logs -f {record.id}")
        return FAILED
    err(f"{record.id} {record.state.value}: {record.error or 'no error recorded'}")
    tail = (await client.logs(record.id, tail=FAILURE_TAIL)).rstrip()
    if tail:
        print(f"--- last lines of {record.id}'s log ---", file=sys.stderr)
        print(tail, file=sys.stderr)
    if record.next_restart_at is not None:
        print(f"hive will restart it at {record.next_restart_at.isoformat()}", file=sys.stderr)
    return FAILED


async def cmd_spawn(client: HiveClient, args: argparse.Namespace) -> int:
    body = spawn_request(args, replace=False)
    record = await client.spawn(body)
    if args.no_wait:
        if args.json:
            _print_json(record)
        else:
            print(f"{record.id} starting at {record.url} on {record.device} (pid {record.pid})")
        return OK
    progress = Progress()
    try:
        record = await _wait_ready(client, record, args.timeout, progress)
    except asyncio.CancelledError:  # Ctrl-C: main exits 130; the worker is hive's, not ours
        progress.done()
        err(
            f"stopped waiting; {record.id} keeps starting: follow it with hive logs -f "
            f"{record.id}, or stop it with hive stop {record.id}"
        )
        raise
    return await _report_start(client, record, args.json)


async def cmd_list(client: HiveClient, args: argparse.Namespace) -> int:
    records = await client.list_workers(
        state=args.state, model=args.model, device=args.device, labels=dict(args.label)
    )
    if args.json:
        _print_json(
            {"workers": [r.model_dump(mode="json") for r in records], "total": len(records)}
        )
    elif args.quiet:
        for record in records:
            print(record.id)
    elif records:
        print(output.workers_wide(records) if args.wide else tables.workers(records))
    else:
        err("no workers")  # on stderr: stdout stays a table (or nothing) for a pipe
    return OK


async def cmd_show(client: HiveClient, args: argparse.Namespace) -> int:
    record = await client.get(args.id)
    if args.json:
        _print_json(record)
    else:
        print(tables.worker(record))
    return OK


def _why(error: HiveClientError) -> str:
    """What went wrong for one worker, in a few words."""
    if isinstance(error, HiveAPIError):
        return "no such worker" if error.status == 404 else error.message
    return str(error)


async def _each(
    ids: Sequence[str], action: Callable[[str], Awaitable[Worker]], done_word: str
) -> tuple[list[Worker], int]:
    """Run ``action`` on every id concurrently; report each id, in order, on its own line
    (``aa stopped`` on stdout, ``hive: nosuch: no such worker`` on stderr) and, when some
    failed, how many succeeded. Returns the records acted on and how many failed.

    An unreachable hive or a refused token fails them all alike: raised once, not per id."""
    results = await asyncio.gather(*(action(i) for i in ids), return_exceptions=True)
    done: list[Worker] = []
    failed = 0
    for worker_id, result in zip(ids, results, strict=True):
        if isinstance(result, HiveConnectionError) or (
            isinstance(result, HiveAPIError) and result.status == 401
        ):
            raise result
        if isinstance(result, HiveClientError):
            err(f"{worker_id}: {_why(result)}")
            failed += 1
        elif isinstance(result, BaseException):
            raise result
        else:
            done.append(result)
    if failed:
        noun = "worker" if len(ids) == 1 else "workers"
        err(f"{done_word} {len(done)} of {len(ids)} {noun}; {failed} failed")
    return done, failed


async def cmd_stop(client: HiveClient, args: argparse.Namespace) -> int:
    if args.all == bool(args.ids):
        raise UsageError("name the workers to stop, or --all (not both)")
    ids = list(args.ids)
    if args.all:
        ids = [
            w.id
            for w in await client.list_workers()
            if w.state in LIVE_STATES or w.next_restart_at is not None
        ]
        if not ids:
            print("no running workers")
            return OK

    async def stop(worker_id: str) -> Worker:
        record = await client.stop(worker_id, timeout=args.timeout, wait=True)
        if args.json:
            return record
        if record.state == State.FAILED:  # not "the stop failed": it was down already
            why = f" ({record.error})" if record.error else ""
            print(f"{record.id} stopped: it had failed{why}; hive will not restart it", flush=True)
        else:
            print(f"{record.id} {record.state.value}", flush=True)
        return record

    records, failed = await _each(ids, stop, "stopped")
    if args.json:
        _print_json(records)
    return FAILED if failed else OK


async def cmd_rm(client: HiveClient, args: argparse.Namespace) -> int:
    async def remove(worker_id: str) -> Worker:
        if not args.force:
            record = await client.get(worker_id)
            if record.state in LIVE_STATES:
                raise HiveAPIError(
                    409, "conflict", f"is {record.state.value}; stop it first or use --force"
                )
        record = await client.delete(worker_id)
        print(f"{record.id} removed", flush=True)
        return record

    _, failed = await _each(args.ids, remove, "removed")
    return FAILED if failed else OK


async def cmd_start(client: HiveClient, args: argparse.Namespace) -> int:
    """Start a stopped or failed worker (``restart`` of one that is down); one that is running
    is left as it is, as ``systemctl start`` does."""
    record = await client.get(args.id)
    if record.state in LIVE_STATES and record.desired == "running":
        if args.json:
            _print_json(record)
        else:
            print(f"{record.id} is already {record.state.value}")
        return OK
    return await cmd_restart(client, args)


async def cmd_restart(client: HiveClient, args: argparse.Namespace) -> int:
    record = await client.restart(args.id)
    if args.no_wait:
        if args.json:
            _print_json(record)
        else:
            print(f"{record.id} {record.state.value} (pid {record.pid})")
        return OK
    record = await _wait_ready(client, record, None, Progress())
    return await _report_start(client, record, args.json)


async def cmd_logs(client: HiveClient, args: argparse.Namespace) -> int:
    if args.tail < 0:
        raise UsageError("-n must be 0 or more")
    if not args.follow:
        sys.stdout.write(await client.logs(args.id, tail=args.tail))
        return OK
    out = sys.stdout.buffer
    answered = False
    try:
        async for chunk in client.follow_logs(args.id, tail=args.tail):
            answered = True
            out.write(chunk)
            out.flush()
    except HiveConnectionError as exc:
        if not answered and exc.reason != CLOSED_MID_STREAM:  # never reached: main says so
            raise
        err(
            f"hive went away while following {args.id}'s log ({exc.reason}); run it again once "
            "hive is back: the worker may still be running"
        )
        return FAILED
    return OK

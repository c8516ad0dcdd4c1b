"""The commands on the host and the daemon: events, devices, status, top, and serve."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import ValidationError

from hive.cli import output, tables
from hive.cli.args import FAILED, OK, err
from hive.cli.args import print_json as _print_json
from hive.client import HiveClient, HiveConnectionError
from hive.client.client import CLOSED_MID_STREAM
from hive.config import Config, ConfigError, find_config_path, load_config
from hive.validation import field_errors


async def cmd_events(client: HiveClient, args: argparse.Namespace) -> int:
    """Each event a line until hive goes away: then a sentence with the ``--since`` that picks
    up where this left off, exit 1 (not a reconnection: a script sees hive went away)."""
    last: str | None = args.since
    seen = False  # an event came: hive was reached (--since alone says nothing of that)
    lines = EventLines()
    try:
        async for event in client.events(args.since):
            last, seen = event.get("event_id") or last, True
            if args.json:  # -o json: a JSON line each; -o yaml: a YAML document each
                print(output.dumps_item(event), flush=True)
            else:
                lines.feed(event)
    except HiveConnectionError as exc:
        lines.flush()
        if not seen and exc.reason != CLOSED_MID_STREAM:  # never reached: main says so
            raise
        since = f"hive events --since {last}" if last else "hive events"
        err(
            f"hive went away while following its events ({exc.reason}); pick up where this "
            f"left off with: {since}"
        )
        return FAILED
    return OK


class EventLines:
    """Events as lines. A replacement's hand-over is one line: the old worker's stop and end
    while its successor serves (its record's ``replacement`` is set) are held, and the
    successor's promotion (``renamed_to``) and its appearance under the id print as
    ``ID  handed over to generation N (ID~N), ready``, where they read as an outage. Held lines
    print as they were if the promotion never comes (the stream ends first)."""

    def __init__(self) -> None:
        self.held: dict[str, list[str]] = {}
        self.appearing: set[str] = set()

    def feed(self, event: dict[str, Any]) -> None:
        worker_id, worker = event.get("id"), event.get("worker") or {}
        if event.get("renamed_to"):
            new = event["renamed_to"]
            self.held.pop(new, None)
            self.appearing.add(new)
            state = worker.get("state", "?")
            change = f"handed over to generation {worker.get('generation')} ({worker_id}), {state}"
            print(f"{event['seq']:>6}  {event['at']}  {new}  {change}", flush=True)
        elif event.get("from") is None and worker_id in self.appearing:
            self.appearing.discard(worker_id)  # the successor under the id: said above
        elif self._handing_over(event):
            self.held.setdefault(worker_id, []).append(_event_line(event))
        else:
            if event.get("to") is None and worker.get("replacing") in self.held:
                self._print(self.held.pop(worker["replacing"]))  # abandoned: it goes on
            self._print(self.held.pop(worker_id, []))  # no longer replaced: what was held
            self._print([_event_line(event)])

    @staticmethod
    def _handing_over(event: dict[str, Any]) -> bool:
        """The old worker of a replacement is stopped, stops or ends (its successor serves by
        then): any change of it once it is no longer wanted, or once it is down."""
        worker = event.get("worker") or {}
        ending = worker.get("desired") == "stopped" or event.get("to") in ("stopped", None)
        return (
            bool(worker.get("replacement"))
            and ending
            and "from" in event
            and not (event.get("reset") or event.get("snapshot"))
        )

    @staticmethod
    def _print(lines: list[str]) -> None:
        for line in lines:
            print(line, flush=True)

    def flush(self) -> None:
        for lines in self.held.values():
            self._print(lines)
        self.held.clear()


def _event_line(event: dict[str, Any]) -> str:
    if event.get("reset"):
        return "(the events missed are not held: the current state follows)"
    worker = event["worker"]
    if event.get("snapshot"):  # the current state, after a reset
        change, detail = f"is {event['to']}", ""
    elif "changed" in event:  # a change of fields, the state as it was
        change = f"{event['to']}: {', '.join(event['changed']) or 'changed'}"
        shown = event["changed"][:1] == ["error"] and worker["error"]
        detail = f"  {worker['error']}" if shown else ""
    else:
        change = f"{event['from'] or '-'} -> {event['to'] or 'forgotten'}"
        failed = event["to"] == "failed" and worker["error"]
        detail = f"  {worker['error']}" if failed else ""
    return f"{event['seq']:>6}  {event['at']}  {event['id']}  {change}{detail}"


async def cmd_devices(client: HiveClient, args: argparse.Namespace) -> int:
    devices = await client.devices()
    if args.json:
        _print_json(devices)
    else:
        print(tables.devices(devices))
    return OK


async def cmd_status(client: HiveClient, args: argparse.Namespace) -> int:
    node = await client.node()
    if args.json:
        _print_json(node)
    else:
        print(tables.node(node))
    return OK


async def cmd_top(client: HiveClient, args: argparse.Namespace) -> int:
    from hive.cli import top  # terminal handling, only for this command

    return await top.run(client, once=args.once, interval=max(args.interval, 0.1))


def load_for_serve(args: argparse.Namespace) -> Config:
    """The configuration file with ``--listen``/``--socket`` on top (again on each SIGHUP)."""
    config = load_config(args.config)
    updates = {}
    if args.listen:
        updates["listen"] = args.listen
    if args.socket:
        updates["socket"] = args.socket
    if not updates:
        return config
    try:
        return Config.model_validate({**config.model_dump(), **updates})
    except ValidationError as exc:
        key, message = field_errors(exc, top="")[0]
        raise ConfigError(f"--{key}: {message}") from None


def serve(args: argparse.Namespace) -> int:
    from hive.daemon import serve as run_daemon

    try:
        config = load_for_serve(args)
    except ConfigError as exc:
        err(str(exc))
        return FAILED
    path, _ = find_config_path(args.config)
    return run_daemon(config, args.log_format, lambda: load_for_serve(args), path)

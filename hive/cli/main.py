"""The ``hive`` command: ``hive serve`` runs the daemon; every other subcommand talks to it.

The subcommands go through the same HTTP API an orchestrator uses (:mod:`hive.client`), over the
unix socket when it is there, else over TCP with the token. Exit codes: 0 done, 1 failed (hive
refused, the worker failed, hive could not be reached), 2 usage. An error is one line on stderr,
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from hive import __version__
from hive.cli import tables
from hive.cli.args import (
    FAILED,
    OK,
    USAGE,
    Parser,
    UsageError,
    _cpus,
    _pair,
    _positive,
)
from hive.cli.args import print_json as _print_json
from hive.cli.declared import add_commands, cmd_apply, cmd_diff, cmd_replace
from hive.cli.fleet import add_commands as add_fleet_commands
from hive.cli.fleet import cmd_fleet
from hive.client import (
    URL_FORMS,
    HiveAPIError,
    HiveClient,
    HiveClientError,
    HiveConnectionError,
    HiveURLError,
    check_url,
    default_url_from,
    local_config,
)
from hive.config import Config, ConfigError, find_config_path, load_config
from hive.models import LIVE_STATES, MARKER, SpawnRequest, State, Worker
from hive.validation import FIELD_SENTENCES, field_errors

#: How many log lines ``hive spawn`` shows when a worker fails to start.
FAILURE_TAIL = 20


# -- the parser --------------------------------------------------------------------------------

JSON_HELP = "print the API's JSON instead of a table"


def _globals(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--url`` and ``--token``, accepted before or after a client subcommand (not serve)."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--url",
        default=default,
        help="hive's API: http://HOST:PORT or unix:///PATH (env HIVE_URL; default: the unix "
        "socket, then http://127.0.0.1:7070)",
    )
    parser.add_argument(
        "--token", default=default, help="bearer token for TCP (env HIVE_TOKEN; default: file)"
    )
    parser.add_argument(
        "--ca", default=default, metavar="FILE",
        help="for https://: the CA that signed hive's certificate (env HIVE_CA)",
    )  # fmt: skip
    parser.add_argument(
        "--cert", default=default, metavar="FILE",
        help="for mutual TLS: this client's certificate (env HIVE_CERT)",
    )  # fmt: skip
    parser.add_argument(
        "--key", default=default, metavar="FILE",
        help="for mutual TLS: its key (env HIVE_KEY)",
    )  # fmt: skip


def build_parser() -> Parser:
    parser = Parser(prog="hive", description="Node agent for inference workers.")
    parser.add_argument("--version", action="version", version=f"hive {__version__}")
    _globals(parser, top=True)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )

    def command(name: str, help: str, *, client: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if client:
            _globals(p, top=False)
        return p

    p = command("serve", "run the hive daemon in the foreground", client=False)
    p.add_argument("--config", help="TOML file (env HIVE_CONFIG; default: <config dir>/hive.toml)")
    p.add_argument("--listen", help="HOST:PORT for the TCP API")
    p.add_argument("--socket", help="path of the unix socket")
    p.add_argument(
        "--log-format", choices=["text", "json"], default="text", help="hive's log lines"
    )

    p = command("spawn", "start a worker and wait until it is ready")
    p.add_argument("model", help="what the backend serves (its {model}), e.g. a path or HF name")
    p.add_argument("--backend", help="a configured backend (default: the config's)")
    p.add_argument("--device", help="auto, cpu, gpu, CPU-n, GPU-n or a GPU UUID")
    p.add_argument("--gpus", type=int, metavar="N", help="how many GPUs (default 1 on a GPU)")
    p.add_argument("--cpus", type=_cpus, help="a count of cores, or core ids like 0-3,8")
    p.add_argument("--gpu-memory", type=int, metavar="MIB", help="share a GPU: the MiB it may use")
    p.add_argument("--port", type=int, help="its port (default: one from port_range)")
    p.add_argument(
        "--label", type=_pair, action="append", default=[], metavar="K=V", help="a label (repeat)"
    )
    p.add_argument(
        "--env",
        type=_pair,
        action="append",
        default=[],
        metavar="K=V",
        help="an environment variable for it (repeat)",
    )
    p.add_argument(
        "--restart", choices=["no", "on-failure", "always"], help="default: the config's"
    )
    p.add_argument("--id", help=f"its id, which {FIELD_SENTENCES['id'].removeprefix('must ')}")
    p.add_argument("--no-register", action="store_true", help="keep it out of the routers")
    p.add_argument(
        "--role",
        choices=["regular", "prefill", "decode"],
        help="its part with the routers: prefill/decode disaggregation (default regular)",
    )
    p.add_argument(
        "--bootstrap-port", type=int, metavar="P", help="a prefill's bootstrap port (default: any)"
    )
    p.add_argument("--priority", type=int, help="the router's weight for it (default 50)")
    p.add_argument("--cost", type=float, help="the router's cost of it (default 1.0)")
    p.add_argument("--no-wait", action="store_true", help="return once the process is started")
    p.add_argument("--timeout", type=_positive, help="give up waiting after this many seconds")
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = command("list", "list workers")
    p.add_argument("--state", choices=[s.value for s in State], help="only workers in this state")
    p.add_argument("--model", help="only workers of this model")
    p.add_argument("--device", help="only workers on this device (CPU-n, GPU-n or a UUID)")
    p.add_argument(
        "--label",
        type=_pair,
        action="append",
        default=[],
        metavar="K=V",
        help="only workers with this label (repeat: all of them)",
    )
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = command("show", "show one worker")
    p.add_argument("id", help="the worker's id")
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = command("stop", "stop workers gracefully (SIGTERM, then SIGKILL after the timeout)")
    p.add_argument("ids", nargs="*", metavar="ID", help="the workers to stop")
    p.add_argument("--all", action="store_true", help="every running worker")
    p.add_argument("--timeout", type=_positive, help="seconds before SIGKILL")
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = command("rm", "forget stopped or failed workers")
    p.add_argument("ids", nargs="+", metavar="ID", help="the workers to forget")
    p.add_argument("--force", action="store_true", help="stop running ones first")

    p = command("restart", "stop a worker if running and start it again")
    p.add_argument("id", help="the worker's id")
    p.add_argument("--no-wait", action="store_true", help="return once the process is started")
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = command("logs", "print a worker's output")
    p.add_argument("id", help="the worker's id")
    p.add_argument("-n", "--tail", type=int, default=100, metavar="N", help="last N lines")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output")

    p = command("events", "follow every worker state change as it happens")
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    p.add_argument(
        "--since",
        metavar="ID",
        help="replay the events after this event id first (<instance>-<seq>: --json's event_id)",
    )

    p = command("devices", "CPU nodes and GPUs with live figures")
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = command("status", "the daemon, its devices and worker counts")
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = command("top", "the host live: devices and workers, redrawn as they change (q quits)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument(
        "--interval", type=_positive, default=2.0, metavar="S",
        help="seconds between device refreshes (worker changes show at once; default 2)",
    )  # fmt: skip
    add_commands(command, JSON_HELP)
    add_fleet_commands(command, JSON_HELP)
    return parser


# -- output ------------------------------------------------------------------------------------


def _err(message: str) -> None:
    """Each line of ``message`` on stderr, after ``hive: ``."""
    for line in message.splitlines() or [""]:
        print(f"hive: {line}", file=sys.stderr)


class Progress:
    """One status line on stderr while waiting: redrawn in place on a terminal, else per change."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = ""
        self.start = time.monotonic()

    def show(self, text: str) -> None:
        line = f"{text} ({tables.duration(time.monotonic() - self.start)})"
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line[:200])
            sys.stderr.flush()
        elif text != self.last:
            print(line, file=sys.stderr)
        self.last = text

    def done(self) -> None:
        if self.tty and self.last:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()


# -- commands ----------------------------------------------------------------------------------


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
        _err(f"{record.id} is still starting; follow it with: hive logs -f {record.id}")
        return FAILED
    _err(f"{record.id} {record.state.value}: {record.error or 'no error recorded'}")
    tail = (await client.logs(record.id, tail=FAILURE_TAIL)).rstrip()
    if tail:
        print(f"--- last lines of {record.id}'s log ---", file=sys.stderr)
        print(tail, file=sys.stderr)
    if record.next_restart_at is not None:
        print(f"hive will restart it at {record.next_restart_at.isoformat()}", file=sys.stderr)
    return FAILED


#: The spawn fields whose flag is not ``--`` and the field's name with dashes.
_FLAGS = {
    "model": "MODEL",
    "gpu_memory_mib": "--gpu-memory",
    "labels": "--label",
    "register": "--no-register",
    "args": "the arguments after --",
}


def _flag(field: str) -> str:
    """The flag a person typed for a spawn field: ``gpu_memory_mib`` is ``--gpu-memory``."""
    head = field.partition(".")[0]
    if " " in head:  # not a field: the whole command
        return head
    return _FLAGS.get(head, "--" + head.replace("_", "-"))


async def cmd_spawn(client: HiveClient, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"model": args.model, "args": args.extra}
    for key, value in (
        ("backend", args.backend),
        ("device", args.device),
        ("gpus", args.gpus),
        ("cpus", args.cpus),
        ("gpu_memory_mib", args.gpu_memory),
        ("port", args.port),
        ("restart", args.restart),
        ("id", args.id),
        ("role", args.role),
        ("bootstrap_port", args.bootstrap_port),
        ("priority", args.priority),
        ("cost", args.cost),
    ):
        if value is not None:
            body[key] = value
    if args.label:
        body["labels"] = dict(args.label)
    if args.env:
        body["env"] = dict(args.env)
    if args.no_register:
        body["register"] = False
    try:  # the same checks hive makes, so that a typo is a usage error (2) and costs no request
        SpawnRequest.model_validate(body)
    except ValidationError as exc:
        errors = field_errors(exc, top="hive spawn", model=SpawnRequest)
        raise UsageError("; ".join(f"{_flag(key)}: {message}" for key, message in errors)) from None
    record = await client.spawn(body)
    if args.no_wait:
        if args.json:
            _print_json(record)
        else:
            print(f"{record.id} starting at {record.url} on {record.device} (pid {record.pid})")
        return OK
    record = await _wait_ready(client, record, args.timeout, Progress())
    return await _report_start(client, record, args.json)


async def cmd_list(client: HiveClient, args: argparse.Namespace) -> int:
    records = await client.list_workers(
        state=args.state, model=args.model, device=args.device, labels=dict(args.label)
    )
    if args.json:
        _print_json(
            {"workers": [r.model_dump(mode="json") for r in records], "total": len(records)}
        )
    elif records:
        print(tables.workers(records))
    else:
        print("no workers")
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
            _err(f"{worker_id}: {_why(result)}")
            failed += 1
        elif isinstance(result, BaseException):
            raise result
        else:
            done.append(result)
    if failed:
        noun = "worker" if len(ids) == 1 else "workers"
        _err(f"{done_word} {len(done)} of {len(ids)} {noun}; {failed} failed")
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
        if not args.json:
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
    async for chunk in client.follow_logs(args.id, tail=args.tail):
        out.write(chunk)
        out.flush()
    return OK


async def cmd_events(client: HiveClient, args: argparse.Namespace) -> int:
    async for event in client.events(args.since):
        if args.json:
            print(json.dumps(event), flush=True)
        elif event.get("reset"):
            print("(the events missed are not held: the current state follows)", flush=True)
        else:
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
            print(f"{event['seq']:>6}  {event['at']}  {event['id']}  {change}{detail}", flush=True)
    return OK


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


COMMANDS: dict[str, Callable[[HiveClient, argparse.Namespace], Awaitable[int]]] = {
    "spawn": cmd_spawn,
    "list": cmd_list,
    "show": cmd_show,
    "stop": cmd_stop,
    "rm": cmd_rm,
    "restart": cmd_restart,
    "logs": cmd_logs,
    "events": cmd_events,
    "devices": cmd_devices,
    "status": cmd_status,
    "top": cmd_top,
    "apply": cmd_apply,
    "diff": cmd_diff,
    "replace": cmd_replace,
    "fleet": cmd_fleet,
}


@dataclass
class Target:
    """The hive a client command talks to, the token it sends, and where each came from, so
    that an error can say what was tried."""

    url: str
    url_from: str  # "--url", "HIVE_URL", or "" for hive's own default (socket, then listen)
    socket: str  # the socket looked for when no one named a URL
    token: str | None
    token_from: str  # "--token", "HIVE_TOKEN", a file's path, or "" for none


def _target(args: argparse.Namespace) -> Target:
    config = local_config()
    socket = str(config.socket_path)
    url, url_from = (args.url, "--url") if args.url else default_url_from(config)
    try:
        check_url(url)
    except HiveURLError:
        raise UsageError(f"{url_from} {url!r} is not a hive URL: use {URL_FORMS}") from None
    token: str | None
    if args.token is not None:
        token, token_from = args.token, "--token"
    elif env := os.environ.get("HIVE_TOKEN"):
        token, token_from = env, "HIVE_TOKEN"
    elif config.token:
        token, token_from = config.token, f"the token in {find_config_path()[0]}"
    else:
        try:
            token = config.token_path.read_text().strip() or None
        except OSError:
            token = None
        token_from = str(config.token_path) if token else ""
    return Target(url, url_from, socket, token, token_from)


def _unreachable(target: Target, exc: HiveConnectionError) -> str:
    """What was tried, why it failed, and what to do: ``hive serve``."""
    start = "start it with: hive serve"
    if target.url_from:
        return (
            f"cannot reach hive at {target.url} (from {target.url_from}): {exc.reason}; "
            f"is it running? {start}"
        )
    if target.url.startswith("unix://"):
        return f"cannot reach hive at its socket {target.socket}: {exc.reason}; {start}"
    return (
        f"cannot reach hive: no socket at {target.socket}, and {target.url}: {exc.reason}; "
        f"{start}, or point --url or HIVE_URL at a running hive"
    )


def _refused(target: Target, exc: HiveAPIError) -> str:
    """A 401: which token was sent, from where, and where to find the right one."""
    fix = "pass the one in hive's token file with --token or HIVE_TOKEN"
    if target.token is None:
        return (
            f"hive wants a token over TCP and none was found (no --token, no HIVE_TOKEN, "
            f"nothing readable at {local_config().token_path}); {fix}"
        )
    return f"hive refused the token from {target.token_from} ({exc.message}); {fix}"


async def _run(args: argparse.Namespace, target: Target) -> int:
    tls = {
        name: getattr(args, name, None) or os.environ.get(f"HIVE_{name.upper()}") or None
        for name in ("ca", "cert", "key")
    }
    for name, path in tls.items():
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"--{name} {path!r}: no such file")
    async with HiveClient(
        target.url, target.token, ca_file=tls["ca"], cert_file=tls["cert"], key_file=tls["key"]
    ) as client:
        return await COMMANDS[args.command](client, args)


def _load_for_serve(args: argparse.Namespace) -> Config:
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


def _serve(args: argparse.Namespace) -> int:
    from hive.daemon import serve

    try:
        config = _load_for_serve(args)
    except ConfigError as exc:
        _err(str(exc))
        return FAILED
    path, _ = find_config_path(args.config)
    return serve(config, args.log_format, lambda: _load_for_serve(args), path)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first ``--`` of ``hive spawn`` goes to the worker untouched.
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    if extra and args.command not in ("spawn", "replace"):
        build_parser().error("arguments after -- are only for hive spawn and hive replace")
    args.extra = extra
    if args.command == "serve":
        client_only = ("url", "token", "ca", "cert", "key")
        if any(getattr(args, name, None) is not None for name in client_only):
            build_parser().error(
                "--url, --token, --ca, --cert and --key are for the commands that talk to a "
                "running hive; hive serve takes --listen and --socket (TLS: tls_cert_file)"
            )
        return _serve(args)
    target: Target | None = None
    try:
        target = _target(args)
        return asyncio.run(_run(args, target))
    except UsageError as exc:
        _err(str(exc))
        return USAGE
    except HiveConnectionError as exc:
        _err(_unreachable(target, exc) if target is not None else str(exc))
        return FAILED
    except HiveAPIError as exc:
        _err(_refused(target, exc) if exc.status == 401 and target is not None else exc.message)
        return FAILED
    except HiveClientError as exc:
        _err(str(exc))
        return FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The ``hive`` command: ``hive serve`` runs the daemon; every other subcommand talks to it.

The subcommands go through the same HTTP API an orchestrator uses (:mod:`hive.client`), over the
unix socket when it is there, else over TCP with the token. Exit codes: 0 done, 1 failed (hive
refused, the worker failed, hive could not be reached), 2 usage. An error is one line on stderr,
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from hive.cli import completion, host, output, workers
from hive.cli.args import FAILED, OK, USAGE, Parser, UsageError, err
from hive.cli.declared import cmd_apply, cmd_diff, cmd_replace
from hive.cli.fleet import cmd_fleet
from hive.cli.parser import build_parser
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
from hive.config import find_config_path
from hive.tlsfiles import TLSFileError, client_context

__all__ = ["COMMANDS", "build_parser", "main"]


COMMANDS: dict[str, Callable[[HiveClient, argparse.Namespace], Awaitable[int]]] = {
    "spawn": workers.cmd_spawn,
    "list": workers.cmd_list,
    "show": workers.cmd_show,
    "stop": workers.cmd_stop,
    "rm": workers.cmd_rm,
    "start": workers.cmd_start,
    "restart": workers.cmd_restart,
    "logs": workers.cmd_logs,
    "events": host.cmd_events,
    "devices": host.cmd_devices,
    "status": host.cmd_status,
    "top": host.cmd_top,
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
        where = f"cannot reach hive at {target.url} (from {target.url_from}): {exc.reason}"
        return f"{where}; is it running? {start}" if exc.maybe_down else where
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


def _tls_files(args: argparse.Namespace, url: str) -> dict[str, str | None]:
    """``--ca/--cert/--key`` (else ``HIVE_CA``...), each checked here so that a file that cannot
    be used is a usage error naming it, the way it was given."""
    tls: dict[str, str | None] = {}
    said: dict[str, str] = {}
    for name in ("ca", "cert", "key"):
        flag, env = getattr(args, name, None), os.environ.get(f"HIVE_{name.upper()}")
        tls[name] = flag or env or None
        said[name] = f"HIVE_{name.upper()}" if env and not flag else f"--{name}"
    if tls["key"] and not tls["cert"]:
        raise UsageError(f"{said['key']} is the key of a client certificate: give --cert too")
    if url.startswith("https://") and (tls["ca"] or tls["cert"]):
        try:
            client_context(
                tls["ca"], tls["cert"], tls["key"], (said["ca"], said["cert"], said["key"])
            )
        except TLSFileError as exc:
            raise UsageError(str(exc)) from None
    return tls


async def _run(args: argparse.Namespace, target: Target) -> int:
    tls = _tls_files(args, target.url)
    async with HiveClient(
        target.url, target.token, ca_file=tls["ca"], cert_file=tls["cert"], key_file=tls["key"]
    ) as client:
        return await COMMANDS[args.command](client, args)


#: Other names of commands, as ``ls`` for ``list``.
ALIASES = {"ls": "list"}


def _parser_for(parser: Parser, args: argparse.Namespace) -> Parser:
    """The parser of the (sub)command ``args`` came through: ``hive fleet apply``'s for it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None)
            if chosen in action.choices:
                return _parser_for(action.choices[chosen], args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first ``--`` of ``hive spawn`` goes to the worker untouched.
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    args.command = ALIASES.get(args.command, args.command)
    if unknown:  # told by the subcommand's parser: its usage, the nearest flag it takes
        _parser_for(parser, args).unknown(unknown)
    if extra and args.command not in ("spawn", "replace"):
        parser.error("arguments after -- are only for hive spawn and hive replace")
    args.extra = extra
    output.apply(args)
    if args.command == "completion":
        with contextlib.suppress(BrokenPipeError):
            print(completion.script(args.shell, parser))
        return OK
    if args.command == "serve":
        client_only = ("url", "token", "ca", "cert", "key")
        if any(getattr(args, name, None) is not None for name in client_only):
            build_parser().error(
                "--url, --token, --ca, --cert and --key are for the commands that talk to a "
                "running hive; hive serve takes --listen and --socket (TLS: tls_cert_file)"
            )
        return host.serve(args)
    target: Target | None = None
    try:
        target = _target(args)
        return asyncio.run(_run(args, target))
    except UsageError as exc:
        err(str(exc))
        return USAGE
    except HiveConnectionError as exc:
        err(_unreachable(target, exc) if target is not None else str(exc))
        return FAILED
    except HiveAPIError as exc:
        err(_refused(target, exc) if exc.status == 401 and target is not None else exc.message)
        return FAILED
    except HiveClientError as exc:
        err(str(exc))
        return FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

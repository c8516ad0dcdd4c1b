"""The ``hive`` command line's grammar: every subcommand, its flags and their help."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

from hive import __version__
from hive.cli.args import Parser, _pair, _positive, add_spawn_flags
from hive.cli.declared import add_commands
from hive.cli.fleet import add_commands as add_fleet_commands
from hive.cli.output import add_option
from hive.models import State
from hive.state.events import LAST_EVENT_ID_PATTERN

JSON_HELP = "print the API's JSON instead of a table"


def _globals(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--url`` and ``--token``, accepted before or after a client subcommand (not serve)."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--url",
        default=default,
        help="hive's API: http://HOST:PORT, https://HOST:PORT or unix:///PATH (env HIVE_URL; "
        "default: the unix socket, then http://127.0.0.1:7070)",
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

    def command(
        name: str, help: str, *, client: bool = True, aliases: Sequence[str] = ()
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help,
            description=help,
            aliases=list(aliases),
            epilog=EXAMPLES.get(name),
            formatter_class=HelpFormatter,
        )
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
    add_spawn_flags(p, replace=False)
    p.add_argument("--no-wait", action="store_true", help="return once the process is started")
    p.add_argument("--timeout", type=_positive, help="give up waiting after this many seconds")
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p.after_dashes = "[-- ARGS...]"  # type: ignore[attr-defined]
    p.usage = "hive spawn MODEL [options] [-- ARGS...]"

    p = command("list", "list workers", aliases=["ls"])
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
    p.add_argument("-q", "--quiet", action="store_true", help="only the ids, one a line")

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

    p = command("start", "start a stopped or failed worker and wait until it is ready")
    p.add_argument("id", help="the worker's id")
    p.add_argument("--no-wait", action="store_true", help="return once the process is started")
    p.add_argument("--json", action="store_true", help=JSON_HELP)

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
        type=_event_id,
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

    p = command("completion", "print a shell's completion script for hive", client=False)
    p.add_argument("shell", choices=["bash", "zsh", "fish"], help="the shell")
    _add_output_options(parser)
    return parser


#: An event id as the stream names it (the API's Last-Event-ID): ``3f2a9c-41``, or a bare seq.
_EVENT_ID = re.compile(LAST_EVENT_ID_PATTERN)


def _event_id(text: str) -> str:
    """``--since``: checked here, so that a wrong one is not answered with the API's pattern."""
    if not _EVENT_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"expected an event id as hive events --json prints it (its event_id, "
            f"<instance>-<seq>, e.g. 3f2a9c-41), got {text!r}"
        )
    return text


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    """``-o json|wide|yaml`` on every (sub)command that takes ``--json``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # an alias is the same parser
                _add_output_options(sub)
    if "--json" in parser._option_string_actions and "-o" not in parser._option_string_actions:
        add_option(parser)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; each flag's default shown when it has one worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


#: ``--help``'s examples, by command.
EXAMPLES = {
    "spawn": _examples(
        "hive spawn ./models/tiny.gguf --backend llama-server --cpus 4",
        "hive spawn Qwen/Qwen2.5-0.5B --device GPU-0 --label team=search -- --max-model-len 4096",
        "hive spawn m --device cpu --no-wait --json",
    ),
    "list": _examples(
        "hive list --state failed", "hive ls -o wide", "hive list -q | xargs hive stop"
    ),
    "stop": _examples("hive stop chat-1 chat-2", "hive stop --all --timeout 30"),
    "start": _examples("hive start chat-1"),
    "replace": _examples(
        "hive replace chat-1 --model Qwen/Qwen2.5-1.5B",
        "hive replace chat-1 --gpus 2 -- --max-model-len 8192",
        "hive replace chat-1 --in-place --port 8000",
    ),
    "apply": _examples("hive apply -f workers.d/", "hive apply -f chat.toml --prune"),
    "diff": _examples("hive diff -f workers.d/"),
    "logs": _examples("hive logs chat-1 -n 50", "hive logs -f chat-1"),
    "events": _examples("hive events", "hive events --json --since 3f2a9c-41"),
    "completion": _examples(
        "source <(hive completion bash)",
        'hive completion zsh > "${fpath[1]}/_hive"',
        "hive completion fish > ~/.config/fish/completions/hive.fish",
    ),
}

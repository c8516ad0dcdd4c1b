"""The command line's words: exit codes, the parser, argument types, and JSON output."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from pydantic import BaseModel, ValidationError

from hive.cli.output import dumps
from hive.devices.cpu import parse_cpulist
from hive.models import ReplaceRequest, SpawnRequest
from hive.validation import FIELD_SENTENCES, field_errors

OK, FAILED, USAGE = 0, 1, 2


class UsageError(Exception):
    """A command line that parses but makes no sense; exits 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors first, "did you mean", a short usage, and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"hive: {did_you_mean(message)}\n")
        self.exit(USAGE, f"{self.short_usage()}\nsee: {self.prog} --help\n")

    def short_usage(self) -> str:
        """``usage: hive spawn MODEL [options] [-- ARGS...]``: the positionals, not every flag."""
        words = []
        for action in self._actions:
            if action.option_strings or action.help == argparse.SUPPRESS:
                continue
            if isinstance(action, argparse._SubParsersAction):
                words.append("COMMAND ...")
                continue
            name = action.metavar or action.dest.upper()
            words.append(f"[{name}...]" if action.nargs == "*" else
                         f"{name}..." if action.nargs == "+" else str(name))  # fmt: skip
        extra = getattr(self, "after_dashes", "")
        return " ".join(["usage:", self.prog, *words, "[options]", *([extra] if extra else [])])

    def unknown(self, extras: list[str]) -> NoReturn:
        """Flags this (sub)command does not take, with the nearest it does."""
        known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        words = []
        for word in extras:
            flag = word.partition("=")[0]
            near = difflib.get_close_matches(flag, known, n=1) if flag.startswith("-") else []
            words.append(f"{word} (did you mean {near[0]}?)" if near else word)
        self.error(f"{self.prog} does not take: {', '.join(words)}")


_CHOICE = re.compile(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)")


def did_you_mean(message: str) -> str:
    """argparse's ``invalid choice: 'lst' (choose from ...)`` with the nearest choice."""
    match = _CHOICE.fullmatch(message)
    if match is None:
        return message
    argument, given, choices = match.groups()
    options = [c.strip(" '") for c in choices.split(",")]
    near = difflib.get_close_matches(given, options, n=1)
    what = "command" if argument in ("COMMAND", "command") else argument
    hint = f"; did you mean {near[0]!r}?" if near else f"; choose from {', '.join(options)}"
    return f"unknown {what} {given!r}{hint}"


# -- argument types --------------------------------------------------------------------------


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _cpus(text: str) -> int | list[int]:
    """``4`` (a count) or ``0,1,2`` / ``0-3,8`` (core ids)."""
    try:
        if text.isdigit():
            return int(text)
        if not text:
            raise ValueError
        cores = parse_cpulist(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{FIELD_SENTENCES['cpus']} like 0-3,8, not {text!r}"
        ) from None
    return cores


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds ≥ 0, got {text!r}")
    return value


# -- the spawn fields: hive spawn's and hive replace's flags, one definition --------------------


@dataclass(frozen=True)
class SpawnFlag:
    """One spawn field's flag: ``--gpu-memory`` fills ``gpu_memory_mib``. ``help`` is hive
    spawn's; ``replace`` is hive replace's help where a change reads otherwise (its default is
    the worker's own, not the config's), True where it reads the same, False where the field
    cannot change (``--id``: the successor keeps the worker's)."""

    flag: str
    field: str
    help: str
    replace: str | bool
    options: Mapping[str, Any]

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    def value(self, given: Any) -> Any:
        """The field's value from what argparse parsed; None when the flag was not given."""
        action = self.options.get("action")
        if action == "append":  # K=V, repeated: all of them
            return dict(given) if given else None
        if action == "store_true":  # --no-register: the field is false
            return False if given else None
        return given


def _spawn_flag(
    flag: str, name: str, help: str, replace: str | bool = True, **options: Any
) -> SpawnFlag:
    return SpawnFlag(flag, name, help, replace, options)


_RESTARTS = ["no", "on-failure", "always"]

#: Every spawn field that a flag gives, in the order ``--help`` lists them; the model (spawn's
#: MODEL, replace's ``--model``) and the arguments after ``--`` are the rest.
SPAWN_FLAGS = (
    _spawn_flag(
        "--backend", "backend", "a configured backend (default: the config's)", "a new backend"
    ),
    _spawn_flag("--device", "device", "auto, cpu, gpu, CPU-n, GPU-n or a GPU UUID"),
    _spawn_flag(
        "--gpus", "gpus", "how many GPUs (default 1 on a GPU)", "how many GPUs", type=int,
        metavar="N",
    ),
    _spawn_flag("--cpus", "cpus", "a count of cores, or core ids like 0-3,8", type=_cpus),
    _spawn_flag(
        "--gpu-memory", "gpu_memory_mib", "share a GPU: the MiB it may use", type=int,
        metavar="MIB",
    ),
    _spawn_flag(
        "--memory", "memory_mib", "host memory to reserve (default: as learned)",
        "host memory to reserve", type=int, metavar="MIB",
    ),
    _spawn_flag(
        "--port", "port", "its port (default: one from port_range)", "a new port", type=int
    ),
    _spawn_flag(
        "--label", "labels", "a label (repeat)", "its labels, all of them (repeat)", type=_pair,
        action="append", default=[], metavar="K=V",
    ),
    _spawn_flag(
        "--env", "env", "an environment variable for it (repeat)",
        "its environment variables, all of them (repeat)", type=_pair, action="append",
        default=[], metavar="K=V",
    ),
    _spawn_flag(
        "--restart", "restart", "default: the config's", "a new policy", choices=_RESTARTS
    ),
    _spawn_flag("--id", "id", f"its id, which {FIELD_SENTENCES['id']}", False),
    _spawn_flag("--no-register", "register", "keep it out of the routers", action="store_true"),
    _spawn_flag(
        "--role", "role",
        "its part with the routers: prefill/decode disaggregation (default regular)",
        "its part with the routers: prefill/decode disaggregation",
        choices=["regular", "prefill", "decode"],
    ),
    _spawn_flag(
        "--bootstrap-port", "bootstrap_port", "a prefill's bootstrap port (default: any)",
        "a prefill's bootstrap port", type=int, metavar="P",
    ),
    _spawn_flag(
        "--priority", "priority", "the router's weight for it (default 50)",
        "the router's weight for it", type=int,
    ),
    _spawn_flag(
        "--cost", "cost", "the router's cost of it (default 1.0)", "the router's cost of it",
        type=float,
    ),
)  # fmt: skip


def add_spawn_flags(parser: argparse.ArgumentParser, *, replace: bool) -> None:
    """The model and :data:`SPAWN_FLAGS`: hive spawn's, or hive replace's (``--model``, and
    only the fields that change)."""
    if replace:
        parser.add_argument("--model", help="a new model")
    else:
        parser.add_argument(
            "model", help="what the backend serves (its {model}), e.g. a path or HF name"
        )
    for spawn_flag in SPAWN_FLAGS:
        if not replace:
            parser.add_argument(spawn_flag.flag, help=spawn_flag.help, **spawn_flag.options)
        elif spawn_flag.replace is not False:
            help = spawn_flag.help if spawn_flag.replace is True else spawn_flag.replace
            parser.add_argument(spawn_flag.flag, help=help, **spawn_flag.options)


def flag_of(name: str, *, replace: bool) -> str:
    """The flag a person typed for a spawn field: ``gpu_memory_mib`` is ``--gpu-memory``."""
    head = name.partition(".")[0]
    if " " in head:  # not a field: the whole command
        return head
    if head == "model":
        return "--model" if replace else "MODEL"
    if head == "args":
        return "the arguments after --"
    flags = {spawn_flag.field: spawn_flag.flag for spawn_flag in SPAWN_FLAGS}
    return flags.get(head, "--" + head.replace("_", "-"))


def spawn_request(args: argparse.Namespace, *, replace: bool) -> dict[str, Any]:
    """What the spawn flags in ``args`` ask for: hive spawn's request, or hive replace's changes
    (a flag not given is left out), checked as hive checks it so that a typo is a usage error
    (2) naming the flag, and costs no request."""
    body: dict[str, Any] = {}
    if args.model is not None:
        body["model"] = args.model
    for spawn_flag in SPAWN_FLAGS:
        if replace and spawn_flag.replace is False:
            continue
        value = spawn_flag.value(getattr(args, spawn_flag.dest))
        if value is not None:
            body[spawn_flag.field] = value
    if args.extra:
        body["args"] = list(args.extra)
    model: type[BaseModel] = ReplaceRequest if replace else SpawnRequest
    try:
        model.model_validate(body)
    except ValidationError as exc:
        errors = field_errors(exc, top="hive replace" if replace else "hive spawn", model=model)
        raise UsageError(
            "; ".join(f"{flag_of(key, replace=replace)}: {message}" for key, message in errors)
        ) from None
    return body


def print_json(data: BaseModel | list[BaseModel] | dict[str, Any]) -> None:
    """The API's JSON, or YAML under ``-o yaml`` (:mod:`hive.cli.output`)."""
    if isinstance(data, BaseModel):
        print(dumps(data.model_dump(mode="json")))
    elif isinstance(data, list):
        print(dumps([m.model_dump(mode="json") for m in data]))
    else:
        print(dumps(data))


def err(message: str) -> None:
    """Each line of ``message`` on stderr, after ``hive: ``."""
    for line in message.splitlines() or [""]:
        print(f"hive: {line}", file=sys.stderr)

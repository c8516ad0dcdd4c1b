"""The command line's words: exit codes, the parser, argument types, and JSON output."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import Any, NoReturn

from pydantic import BaseModel

from hive.cli.output import dumps
from hive.devices.cpu import parse_cpulist
from hive.validation import FIELD_SENTENCES

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

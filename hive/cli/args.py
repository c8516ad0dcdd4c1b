"""The command line's words: exit codes, the parser, argument types, and JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn

from pydantic import BaseModel

from hive.devices.cpu import parse_cpulist
from hive.validation import FIELD_SENTENCES

OK, FAILED, USAGE = 0, 1, 2


class UsageError(Exception):
    """A command line that parses but makes no sense; exits 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(USAGE, f"hive: {message}\n")


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
    if isinstance(data, BaseModel):
        text = data.model_dump_json(indent=2)
    elif isinstance(data, list):
        text = json.dumps([m.model_dump(mode="json") for m in data], indent=2)
    else:
        text = json.dumps(data, indent=2, default=str)
    print(text)


def err(message: str) -> None:
    """Each line of ``message`` on stderr, after ``hive: ``."""
    for line in message.splitlines() or [""]:
        print(f"hive: {line}", file=sys.stderr)

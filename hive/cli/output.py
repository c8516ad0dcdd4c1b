"""``-o json|wide|yaml``: the output formats every command with ``--json`` takes.

``-o json`` is ``--json``; ``-o yaml`` is the same data as YAML (written here: the API's data is
plain JSON, so a small emitter does, with no dependency); ``-o wide`` is the table with more
columns where a command has them (``list``: error, labels, GPUs, memory), else the table. A
stream (``hive events``) prints an item at a time: a JSON line each, or a YAML document each.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from hive.cli import tables
from hive.models import Worker

FORMATS = ("json", "wide", "yaml")

#: The format chosen by ``-o`` for this run (set once by :func:`apply`).
_format = {"name": ""}


def add_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        default=argparse.SUPPRESS,
        help="json (as --json), yaml, or wide: a table with more columns (default: a table)",
    )


def apply(args: argparse.Namespace) -> None:
    """``-o json|yaml`` turns ``--json`` on (yaml: printed as YAML); ``-o wide`` sets
    ``args.wide``. Every command then reads ``args.json`` as before."""
    name = getattr(args, "output", "")
    _format["name"] = name
    if name in ("json", "yaml"):
        args.json = True
    args.wide = name == "wide"


def dumps(data: Any) -> str:
    """JSON text, or YAML when ``-o yaml`` was given."""
    if _format["name"] == "yaml":
        return yaml(data)
    return json.dumps(data, indent=2, default=str)


def dumps_item(data: Any) -> str:
    """One item of a stream (``hive events``): a JSON line, or under ``-o yaml`` a YAML
    document that begins with ``---``, so that the stream reads as YAML documents."""
    if _format["name"] == "yaml":
        return "---\n" + yaml(data)
    return json.dumps(data)


# -- YAML --------------------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./@+-]*")
_WORDS = {"true", "false", "null", "yes", "no", "on", "off", "y", "n", "~"}


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _WORDS:
        return text
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar


def yaml(data: Any) -> str:
    """``data`` (JSON-shaped: dicts, lists, strings, numbers, booleans, None) as block YAML."""
    return "\n".join(_lines(data, 0)) if isinstance(data, dict | list) and data else _empty(data)


def _lines(data: Any, indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            head = f"{pad}{_scalar(str(key))}:"
            if isinstance(value, dict | list) and value:
                out.append(head)
                out += _lines(value, indent + (2 if isinstance(value, dict) else 0))
            else:
                out.append(f"{head} {_empty(value)}")
        return out
    for item in data:
        if isinstance(item, dict | list) and item:
            inner = _lines(item, indent + 2)
            out.append(f"{pad}- {inner[0].lstrip()}")
            out += inner[1:]
        else:
            out.append(f"{pad}- {_empty(item)}")
    return out


def _empty(value: Any) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)


# -- wide tables -------------------------------------------------------------------------------


def workers_wide(records: Sequence[Worker]) -> str:
    """``hive list -o wide``: the list's columns and the error, labels, GPUs and memory."""
    headers = ["ID", "MODEL", "BACKEND", "ROLE", "DEVICE", "STATE", "PID", "URL", "RESTARTS"]
    headers += ["AGE"]
    headers += ["CPU", "RSS", "GPUS", "GPU MEM", "LABELS", "ERROR"]
    now = datetime.now(UTC)
    rows = []
    for w in records:
        gpu_mem = "-" if w.gpu_memory_used_mib is None else f"{w.gpu_memory_used_mib}MiB"
        rows.append(
            [
                w.id,
                w.model,
                w.backend,
                w.role,
                w.device,
                w.state.value,
                "-" if w.pid is None else str(w.pid),
                w.url,
                str(w.restarts),
                tables.since(w.created_at, now),
                "-" if w.cpu_percent is None else f"{w.cpu_percent:.0f}%",
                tables.size(w.rss_bytes),
                ",".join(str(g) for g in w.gpus) or "-",
                gpu_mem,
                ",".join(f"{k}={v}" for k, v in w.labels.items()) or "-",
                tables.escape(w.error or "-"),
            ]
        )
    return tables.table(headers, rows)

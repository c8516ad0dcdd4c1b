"""``hive apply``, ``hive diff`` and ``hive replace``: changing what runs, from files or flags.

``apply`` and ``diff`` read TOML files of ``[[workers]]`` tables (or every ``*.toml`` of a
directory) and check them here first, so that a bad file is a usage error naming the file, the
worker and the field, and costs no request. hive checks them again and plans the same way.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hive.cli.args import (
    FAILED,
    OK,
    UsageError,
    _positive,
    add_spawn_flags,
    print_json,
    spawn_request,
)
from hive.client import HiveClient
from hive.desired.declared import read_paths
from hive.errors import DeclarationError
from hive.models import ApplyResult, PlanItem

Command = Callable[..., argparse.ArgumentParser]


def add_commands(command: Command, json_help: str) -> None:
    """The parsers of ``apply``, ``diff`` and ``replace``."""
    for name, help in (
        ("apply", "make the workers match files of declared workers"),
        ("diff", "show what hive apply would do, changing nothing"),
    ):
        p = command(name, help)
        p.add_argument(
            "-f",
            "--file",
            dest="files",
            action="append",
            required=True,
            type=Path,
            metavar="FILE|DIR",
            help="a TOML file of [[workers]], or a directory of them (repeat)",
        )
        p.add_argument("--prune", action="store_true", help="stop and remove undeclared workers")
        if name == "apply":
            p.add_argument(
                "--force",
                action="store_true",
                help="let --prune remove every worker, or workers declared elsewhere or spawned",
            )
        p.add_argument("--json", action="store_true", help=json_help)

    p = command("replace", "replace a worker by one with these changes, without a gap")
    p.add_argument("id", help="the worker's id (it keeps it)")
    add_spawn_flags(p, replace=True)
    p.add_argument(
        "--in-place",
        action="store_true",
        help="stop the old worker first (a gap): for a successor that needs its GPUs or port",
    )
    p.add_argument(
        "--timeout", type=_positive, help="seconds the successor has to be ready (default 1800)"
    )
    p.add_argument("--json", action="store_true", help=json_help)
    p.after_dashes = "[-- ARGS...]"  # type: ignore[attr-defined]
    p.usage = "hive replace ID [options] [-- ARGS...]"


def _read(files: list[Path]) -> list[dict[str, Any]]:
    try:
        declared = read_paths(files, lambda file: f"apply:{file}")
    except DeclarationError as exc:
        raise UsageError(str(exc)) from None
    return [
        item.spec.model_dump(mode="json", by_alias=True, exclude_unset=True) for item in declared
    ]


def _show(items: list[PlanItem], dry_run: bool) -> None:
    words = {
        "create": "create",
        "replace": "replace",
        "start": "start",
        "unchanged": "unchanged",
        "prune": "prune",
    }
    if dry_run:
        words["prune"] = "would prune"
    for item in items:
        line = f"{words[item.action]:<11} {item.id}"
        if item.result not in (None, "done"):
            line += f"  FAILED: {item.result}"
        print(line)
        for field, (old, new) in item.changes.items():
            print(f"              {field}: {_value(old)} -> {_value(new)}")
    counts: dict[str, int] = {}
    for item in items:
        counts[item.action] = counts.get(item.action, 0) + 1
    summary = ", ".join(f"{counts[a]} {words[a]}" for a in words if a in counts)
    print(f"{'plan' if dry_run else 'applied'}: {summary or 'nothing declared'}")


def _value(value: Any) -> str:
    return "(none)" if value in (None, [], {}) else repr(value)


async def _apply(client: HiveClient, args: argparse.Namespace, dry_run: bool) -> int:
    workers = _read(args.files)
    # Absolute: the same files name the same source from any directory (prune compares it).
    source = ",".join(str(f.absolute()) for f in args.files)
    force = getattr(args, "force", False)
    result: ApplyResult = await client.apply(
        workers, prune=args.prune, dry_run=dry_run, source=source, force=force
    )
    if args.json:
        print_json(result)
    else:
        _show(result.items, dry_run)
    failed = [item for item in result.items if item.result not in (None, "done")]
    return FAILED if failed else OK


async def cmd_apply(client: HiveClient, args: argparse.Namespace) -> int:
    return await _apply(client, args, dry_run=False)


async def cmd_diff(client: HiveClient, args: argparse.Namespace) -> int:
    return await _apply(client, args, dry_run=True)


async def cmd_replace(client: HiveClient, args: argparse.Namespace) -> int:
    changes = spawn_request(args, replace=True)
    if not changes and not args.in_place:
        raise UsageError("name what changes (--model, --env, arguments after --...)")
    record = await client.replace(args.id, changes, in_place=args.in_place, timeout=args.timeout)
    if args.json:
        print_json(record)
    else:
        print(
            f"{record.id} replaced: generation {record.generation} {record.state.value} "
            f"at {record.url} (pid {record.pid})"
        )
    return OK

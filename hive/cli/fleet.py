"""``hive fleet``: the whole fleet, read from etcd (docs/fleet-etcd.md), and a node's desired
workers written to it.

etcd's endpoints come from ``--etcd`` (repeat), else ``$HIVE_ETCD`` (comma-separated), else the
``[fleet]`` table of the local configuration; the key prefix from ``--prefix``, else that table,
else ``/hive``. Nothing here talks to a hive: any host that reaches etcd can run these.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hive.cli import fleet_deploy, tables
from hive.cli.args import OK, UsageError, err, print_json
from hive.client import HiveClient, HiveClientError
from hive.config import ConfigError, load_config
from hive.desired.declared import read_paths
from hive.desired.etcd import UNREACHABLE, Etcd, delete_op, put_op
from hive.errors import DeclarationError, EtcdError

Command = Callable[..., argparse.ArgumentParser]


def add_commands(command: Command, json_help: str) -> None:
    p = command("fleet", "the fleet in etcd: nodes, their workers and devices; desired workers")
    p.add_argument("--etcd", action="append", metavar="URL", help="etcd's client URL (repeat)")
    p.add_argument("--prefix", help="the root of hive's keys (default: the config's, or /hive)")
    sub = p.add_subparsers(dest="fleet_command", required=True, metavar="COMMAND")
    ls = sub.add_parser("ls", help="every node: up or not, version, API, workers")
    ls.add_argument("--json", action="store_true", help=json_help)
    show = sub.add_parser("show", help="one node and its workers")
    show.add_argument("node", help="the node's name")
    show.add_argument("--json", action="store_true", help=json_help)
    devices = sub.add_parser("devices", help="every node's GPUs")
    devices.add_argument("--json", action="store_true", help=json_help)
    apply = sub.add_parser("apply", help="make these files a node's desired workers")
    apply.add_argument("--node", required=True, help="the node that is to run them")
    apply.add_argument(
        "-f", "--file", dest="files", action="append", required=True, type=Path,
        metavar="FILE|DIR", help="a TOML file of [[workers]], or a directory of them (repeat)",
    )  # fmt: skip
    fleet_deploy.add_commands(sub, json_help)


def _where(args: argparse.Namespace) -> tuple[list[str], str]:
    endpoints: list[str] = list(args.etcd or [])
    if not endpoints and os.environ.get("HIVE_ETCD"):
        endpoints = [e for e in os.environ["HIVE_ETCD"].split(",") if e]
    prefix = args.prefix
    if not endpoints or prefix is None:
        try:
            fleet = load_config(os.environ.get("HIVE_CONFIG")).fleet
        except ConfigError:
            fleet = None
        if fleet is not None:
            endpoints = endpoints or list(fleet.endpoints)
            prefix = prefix or fleet.prefix
    if not endpoints:
        raise UsageError(
            "no etcd to read: pass --etcd URL, set HIVE_ETCD, or give the config a [fleet] table"
        )
    given = _given(args)
    for url in endpoints:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(
                f"{given} {url!r} is not an etcd URL: use http://HOST:PORT or https://HOST:PORT"
            )
    return endpoints, (prefix or "/hive").rstrip("/")


def _given(args: argparse.Namespace) -> str:
    """Where the etcd URLs came from, as a person would look for them."""
    return "--etcd" if args.etcd else "HIVE_ETCD" if os.environ.get("HIVE_ETCD") else "[fleet]"


async def _read(etcd: Etcd, prefix: str) -> dict[str, Any]:
    """Nodes, workers and desired workers, by node."""
    _, kvs = await etcd.range(prefix + "/")
    fleet: dict[str, Any] = {}

    def node(name: str) -> dict[str, Any]:
        return fleet.setdefault(name, {"node": None, "workers": {}, "desired": {}})

    for key, value in kvs.items():
        parts = key.removeprefix(prefix + "/").split("/")
        try:
            data = json.loads(value)
        except ValueError:
            continue
        if parts[0] == "nodes" and len(parts) == 2:
            node(parts[1])["node"] = data
        elif parts[0] in ("workers", "desired") and len(parts) == 3:
            node(parts[1])[parts[0]][parts[2]] = data
    return fleet


def _counts(workers: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for w in workers.values():
        counts[w.get("state", "?")] = counts.get(w.get("state", "?"), 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "-"


async def cmd_fleet(client: HiveClient, args: argparse.Namespace) -> int:
    endpoints, prefix = _where(args)
    etcd = Etcd(endpoints)
    try:
        if args.fleet_command == "apply":
            return await _apply(etcd, prefix, args)
        if args.fleet_command in fleet_deploy.COMMANDS:
            return await fleet_deploy.run(etcd, prefix, args)
        fleet = await _read(etcd, prefix)
        view = await fleet_deploy.view_of(etcd, prefix) if args.fleet_command == "ls" else None
    except EtcdError as exc:
        message = str(exc)  # exit 1, the reason on one line
        if message.startswith(UNREACHABLE):
            message += f" (the URL is from {_given(args)})"
        raise HiveClientError(message) from None
    finally:
        await etcd.close()
    if args.fleet_command == "ls":
        assert view is not None
        _ls(fleet, args.json, view[0].cordoned)
        if not args.json and view[0].deployments:
            print()
            fleet_deploy.deployments(*view, False)
        return OK
    if args.fleet_command == "show":
        return _show(fleet, args.node, args.json)
    return _devices(fleet, args.json)


def _ls(fleet: dict[str, Any], as_json: bool, cordoned: dict[str, bool]) -> int:
    if as_json:
        print_json(
            {
                name: {"up": f["node"] is not None, **(f["node"] or {})}
                for name, f in sorted(fleet.items())
            }
        )
        return OK
    rows = []
    for name, f in sorted(fleet.items()):
        node = f["node"] or {}
        gpus = len((node.get("devices") or {}).get("gpus") or [])
        state = "up" if f["node"] is not None else "down"
        if name in cordoned:
            state += ",draining" if cordoned[name] else ",cordoned"
        rows.append([
            name,
            state,
            node.get("version", "-"),
            node.get("api_url") or "-",
            _counts(f["workers"]),
            str(len(f["desired"])),
            str(gpus),
        ])  # fmt: skip
    if not rows:
        print("no nodes in the fleet")
        return OK
    print(tables.table(["NODE", "STATE", "VERSION", "API", "WORKERS", "DESIRED", "GPUS"], rows))
    return OK


def _show(fleet: dict[str, Any], name: str, as_json: bool) -> int:
    if name not in fleet:
        raise UsageError(
            f"no node {name!r} in the fleet (known: {', '.join(sorted(fleet)) or 'none'})"
        )
    f = fleet[name]
    if as_json:
        print_json(f)
        return OK
    node = f["node"]
    if node is None:
        print(f"{name}: down (no lease in etcd); {len(f['desired'])} desired worker(s)")
    else:
        print(f"{name}: up, hive {node.get('version')}, API {node.get('api_url')}")
        print(f"workers  {_counts(f['workers'])}; desired {len(f['desired'])}")
    rows = [
        [w["id"], w.get("model", "-"), w.get("state", "-"), w.get("device", "-"),
         w.get("url", "-"), str(w.get("restarts", 0)), w.get("declared") or "-"]
        for w in sorted(f["workers"].values(), key=lambda w: w["id"])
    ]  # fmt: skip
    if rows:
        print()
        print(tables.table(["ID", "MODEL", "STATE", "DEVICE", "URL", "RESTARTS", "DECLARED"], rows))
    return OK


def _devices(fleet: dict[str, Any], as_json: bool) -> int:
    gpus = []
    for name, f in sorted(fleet.items()):
        for g in ((f["node"] or {}).get("devices") or {}).get("gpus") or []:
            gpus.append({"node": name, **g})
    if as_json:
        print_json({"gpus": gpus})
        return OK
    if not gpus:
        print("no GPUs in the fleet")
        return OK
    rows = [
        [g["node"], g["id"], g.get("name") or "-",
         f"{tables.bar(g.get('memory_used_mib'), g.get('memory_total_mib'))} "
         f"{g.get('memory_used_mib')}/{g.get('memory_total_mib')} MiB",
         "ok" if g.get("healthy", True) else "UNHEALTHY", ",".join(g.get("workers") or []) or "-"]
        for g in gpus
    ]  # fmt: skip
    print(tables.table(["NODE", "GPU", "NAME", "MEMORY", "HEALTH", "WORKERS"], rows))
    return OK


async def _apply(etcd: Etcd, prefix: str, args: argparse.Namespace) -> int:
    try:
        declared = read_paths(args.files, lambda file: f"etcd:{file}")
    except DeclarationError as exc:
        raise UsageError(str(exc)) from None
    base = f"{prefix}/desired/{args.node}/"
    _, current = await etcd.range(base)
    _, nodes = await etcd.range(f"{prefix}/nodes/")
    names = sorted(key.removeprefix(f"{prefix}/nodes/") for key in nodes)
    if args.node not in names:  # a typo, a hive that is down, or one that has not joined yet
        err(
            f"warning: no node {args.node!r} is up in the fleet (up: {', '.join(names) or 'none'}"
            f"); its desired set is written, and runs when a hive of that name joins"
        )
    wanted = {
        base + item.spec.id: json.dumps(
            item.spec.model_dump(mode="json", by_alias=True, exclude_unset=True), sort_keys=True
        )
        for item in declared
    }
    ops = [
        put_op(key, value)
        for key, value in wanted.items()
        if current.get(key, b"").decode() != value
    ]
    removed = [key for key in current if key not in wanted]
    ops += [delete_op(key) for key in removed]
    await etcd.txn(ops)
    changed = len(ops) - len(removed)
    print(
        f"{args.node}: desired set written to etcd: {len(wanted)} worker(s); "
        f"{changed} written, {len(removed)} removed, {len(wanted) - changed} unchanged"
    )
    return OK

"""``hive fleet deploy|undeploy|cordon|uncordon|drain|deployments``: what the fleet's scheduler
places and where it may (docs/fleet-etcd.md). Each writes etcd directly, like the rest of
``hive fleet``; the scheduler, whichever hive it is, sees the change through its watch.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hive.cli import tables
from hive.cli.args import OK, UsageError, err, print_json
from hive.desired.deployments import Keys, read_deployments, split_replica
from hive.desired.etcd import Etcd, delete_op, put_op
from hive.desired.fleet_view import FleetView
from hive.errors import DeclarationError

COMMANDS = ("deploy", "undeploy", "cordon", "uncordon", "drain", "deployments")
NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def add_commands(sub: Any, json_help: str) -> None:
    deploy = sub.add_parser("deploy", help="write deployments ([[deployments]] tables) to etcd")
    deploy.add_argument(
        "-f", "--file", dest="files", action="append", required=True, type=Path, metavar="FILE",
        help="a TOML file of [[deployments]] (repeat)",
    )  # fmt: skip
    undeploy = sub.add_parser("undeploy", help="remove a deployment: its replicas are stopped")
    undeploy.add_argument("name", help="the deployment's name")
    for name, text in (
        ("cordon", "place nothing new on a node"),
        ("uncordon", "let the scheduler place on a node again"),
        ("drain", "cordon a node and move its replicas off, one at a time, without a gap"),
    ):
        sub.add_parser(name, help=text).add_argument("node", help="the node's name")
    listing = sub.add_parser("deployments", help="every deployment: replicas ready and wanted")
    listing.add_argument("--json", action="store_true", help=json_help)


async def view_of(etcd: Etcd, prefix: str) -> tuple[FleetView, str | None]:
    """The fleet as the scheduler sees it, and the node that schedules (None: none now)."""
    keys = Keys(prefix)
    view = FleetView(keys, time.monotonic)
    revision, kvs = await etcd.range(keys.root)
    view.load(revision, kvs)
    holder = _loads(kvs.get(keys.scheduler, b""))
    return view, (str(holder.get("node")) if isinstance(holder, dict) else None)


async def run(etcd: Etcd, prefix: str, args: argparse.Namespace) -> int:
    keys = Keys(prefix)
    command = args.fleet_command
    if command == "deploy":
        return await _deploy(etcd, keys, args.files)
    if command == "undeploy":
        _, kvs = await etcd.range(keys.deployment(args.name))
        if keys.deployment(args.name) not in kvs:
            _, known = await etcd.range(keys.deployments)
            names = ", ".join(sorted(k.removeprefix(keys.deployments) for k in known)) or "none"
            raise UsageError(f"no deployment {args.name!r} in the fleet (known: {names})")
        await etcd.txn([delete_op(keys.deployment(args.name))])
        print(f"deployment {args.name}: removed; the scheduler stops its replicas")
        return OK
    if command == "deployments":
        return deployments(*await view_of(etcd, prefix), args.json)
    node = args.node
    if not NODE.match(node):
        raise UsageError(f"node: {node!r} is not a node name")
    if command == "uncordon":
        await etcd.txn([delete_op(keys.cordon(node))])
        print(f"{node}: uncordoned; the scheduler may place replicas there again")
        return OK
    drain = command == "drain"
    _, nodes = await etcd.range(keys.nodes)
    names = sorted(key.removeprefix(keys.nodes) for key in nodes)
    if node not in names:  # a typo, a hive that is down, or one that has not joined yet
        err(
            f"warning: no node {node!r} is up in the fleet (up: {', '.join(names) or 'none'}); "
            "it is cordoned all the same, for when a hive of that name joins"
        )
    value = json.dumps({"drain": drain, "at": datetime.now(UTC).isoformat()})
    await etcd.txn([put_op(keys.cordon(node), value)])
    if drain:
        view, _ = await view_of(etcd, prefix)
        n = len(view.replicas.get(node, {}))
        print(
            f"{node}: cordoned and draining: {n} replica(s) to move, one at a time, each "
            "serving elsewhere before it leaves; `hive fleet deployments` shows them"
        )
    else:
        print(f"{node}: cordoned; nothing new is placed there, what runs stays")
    return OK


async def _deploy(etcd: Etcd, keys: Keys, files: list[Path]) -> int:
    try:
        found = [d for path in files for d in read_deployments(path)]
    except DeclarationError as exc:
        raise UsageError(str(exc)) from None
    names = [d.name for d in found]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise UsageError(f"deployment {twice[0]!r}: declared in more than one file")
    _, current = await etcd.range(keys.deployments)
    ops = []
    for deployment in found:
        value = json.dumps(deployment.to_json(), sort_keys=True)
        key = keys.deployment(deployment.name)
        old = current.get(key)
        same = old is not None and _loads(old) == json.loads(value)
        if not same:
            ops.append(put_op(key, value))
        what = "unchanged" if same else ("written" if old is None else "changed")
        print(
            f"deployment {deployment.name}: {what} ({deployment.replicas} replica(s), "
            f"revision {deployment.revision})"
        )
    await etcd.txn(ops)
    return OK


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def deployments(view: FleetView, scheduler: str | None, as_json: bool) -> int:
    rows: dict[str, dict[str, Any]] = {}
    for name, deployment in sorted(view.deployments.items()):
        nodes: dict[str, int] = {}
        revisions = 0
        for worker_id, placed in view.placed.items():
            parsed = split_replica(worker_id)
            if parsed is None or parsed[0] != name:
                continue
            for node in placed:
                nodes[node] = nodes.get(node, 0) + 1
                revisions += view.replicas[node][worker_id].revision == deployment.revision
        rows[name] = {
            "model": deployment.spawn.get("model"),
            "ready": view.ready_count(name),
            "wanted": deployment.replicas,
            "placed": sum(nodes.values()),
            "current": revisions,
            "revision": deployment.revision,
            "nodes": nodes,
            "node_labels": deployment.node_labels,
        }
    if as_json:
        print_json({"deployments": rows, "cordoned": view.cordoned, "scheduler": scheduler,
                    "moves": {k: {"from": m.source, "to": m.target}
                              for k, m in sorted(view.moves.items())}})  # fmt: skip
        return OK
    if not rows:
        print("no deployments in the fleet")
        return OK
    print(f"scheduler: {scheduler or 'none elected now'}")
    table = [
        [name, str(r["model"]), str(r["ready"]), str(r["wanted"]), f"{r['current']}/{r['placed']}",
         ", ".join(f"{n}:{c}" for n, c in sorted(r["nodes"].items())) or "-"]
        for name, r in rows.items()
    ]  # fmt: skip
    print(tables.table(["DEPLOYMENT", "MODEL", "READY", "WANTED", "CURRENT", "NODES"], table))
    for worker_id, move in sorted(view.moves.items()):
        print(f"moving {worker_id}: {move.source} -> {move.target}")
    return OK

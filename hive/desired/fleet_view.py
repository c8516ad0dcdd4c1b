"""The scheduler's picture of the fleet: every key under the prefix that placement reads, kept
from one range and then the watch's events (and the scheduler's own writes, as soon as etcd has
taken them).

It holds what it needs, parsed once: deployments, nodes (labels, backends, routers, room), the
workers each node publishes (state, revision, routers), the desired keys the scheduler owns (those
whose value carries the ``hive.deployment`` label), cordons and moves. It also keeps, for each
node that holds replicas and has no node key, since when it has been seen gone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hive.desired.deployments import (
    DEPLOYMENT_LABEL,
    REVISION_LABEL,
    Deployment,
    Keys,
    parse_deployment,
    split_replica,
)
from hive.errors import DeclarationError

log = logging.getLogger("hive.scheduler")


@dataclass
class NodeInfo:
    labels: dict[str, str] = field(default_factory=dict)
    backends: dict[str, Any] = field(default_factory=dict)
    default_backend: str | None = None
    routers: list[str] = field(default_factory=list)
    #: ``room`` as the node publishes it (hive.desired.node_doc); None: it says nothing.
    room: dict[str, Any] | None = None


@dataclass(frozen=True)
class WorkerInfo:
    state: str
    revision: str | None
    routers: dict[str, str]
    replacement: str | None


@dataclass(frozen=True)
class Move:
    source: str
    target: str


@dataclass(frozen=True)
class Replica:
    """A desired key the scheduler owns: the replica ``id`` on ``node``, with its value."""

    node: str
    id: str
    deployment: str
    k: int
    spec: dict[str, Any]

    @property
    def revision(self) -> str | None:
        return (self.spec.get("labels") or {}).get(REVISION_LABEL)


def _json(value: bytes) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return None


class FleetView:
    def __init__(self, keys: Keys, clock: Callable[[], float]) -> None:
        self.keys = keys
        self.clock = clock
        self._clear()

    def _clear(self) -> None:
        self.deployments: dict[str, Deployment] = {}
        self.nodes: dict[str, NodeInfo] = {}
        self.workers: dict[str, dict[str, WorkerInfo]] = {}
        #: node -> replica id -> its desired key's value (scheduler-owned keys only).
        self.replicas: dict[str, dict[str, Replica]] = {}
        #: replica id -> the nodes whose desired keys hold it.
        self.placed: dict[str, set[str]] = {}
        self.cordoned: dict[str, bool] = {}  # node -> drain
        self.moves: dict[str, Move] = {}
        self.gone_since: dict[str, float] = {}
        self.revision = 0
        self._revs: dict[str, int] = {}
        self._refused: dict[str, str] = {}

    # -- feeding it ------------------------------------------------------------------------------

    def load(self, revision: int, kvs: dict[str, bytes]) -> None:
        """Everything, from one range at ``revision``."""
        self._clear()
        for key, value in kvs.items():
            self.put(key, value, revision)
        self.revision = revision
        now = self.clock()
        for node in self.replicas:
            if node not in self.nodes:
                self.gone_since.setdefault(node, now)

    def put(self, key: str, value: bytes, revision: int) -> None:
        """A key's value at ``revision`` (left alone when older than what the view has, or when
        the key is not text)."""
        if not key.isprintable() or revision < self._revs.get(key, 0):
            return  # older than what we wrote ourselves
        self._revs[key] = revision
        self.revision = max(self.revision, revision)
        self._put(key, value)

    def delete(self, key: str, revision: int) -> None:
        if not key.isprintable() or revision < self._revs.get(key, 0):
            return
        self._revs[key] = revision
        self.revision = max(self.revision, revision)
        self._delete(key)

    def _put(self, key: str, value: bytes) -> None:
        keys = self.keys
        if key.startswith(keys.deployments):
            name = key.removeprefix(keys.deployments)
            try:
                self.deployments[name] = parse_deployment(_json(value), key)
                self._refused.pop(name, None)
            except DeclarationError as exc:
                self.deployments.pop(name, None)
                if self._refused.get(name) != str(exc):
                    log.error("scheduler: deployment refused; its replicas stay as they are: %s",
                              exc)  # fmt: skip
                    self._refused[name] = str(exc)
        elif key.startswith(keys.nodes):
            node = key.removeprefix(keys.nodes)
            self.nodes[node] = _node(_json(value))
            self.gone_since.pop(node, None)
        elif key.startswith(keys.workers):
            node, _, worker_id = key.removeprefix(keys.workers).partition("/")
            record = _json(value)
            if "~" not in worker_id and isinstance(record, dict):
                self.workers.setdefault(node, {})[worker_id] = _worker(record)
        elif key.startswith(keys.desired):
            node, _, worker_id = key.removeprefix(keys.desired).partition("/")
            replica = _replica(node, worker_id, _json(value))
            if replica is None:
                self._drop_replica(node, worker_id)
            else:
                self.replicas.setdefault(node, {})[worker_id] = replica
                self.placed.setdefault(worker_id, set()).add(node)
                if node not in self.nodes:
                    self.gone_since.setdefault(node, self.clock())
        elif key.startswith(keys.cordoned):
            data = _json(value)
            self.cordoned[key.removeprefix(keys.cordoned)] = bool(
                isinstance(data, dict) and data.get("drain")
            )
        elif key.startswith(keys.moves):
            data = _json(value)
            if isinstance(data, dict) and isinstance(data.get("from"), str):
                move = Move(str(data["from"]), str(data.get("to")))
                self.moves[key.removeprefix(keys.moves)] = move

    def _delete(self, key: str) -> None:
        keys = self.keys
        if key.startswith(keys.deployments):
            self.deployments.pop(key.removeprefix(keys.deployments), None)
            self._refused.pop(key.removeprefix(keys.deployments), None)
        elif key.startswith(keys.nodes):
            node = key.removeprefix(keys.nodes)
            if self.nodes.pop(node, None) is not None and node in self.replicas:
                self.gone_since[node] = self.clock()
        elif key.startswith(keys.workers):
            node, _, worker_id = key.removeprefix(keys.workers).partition("/")
            self.workers.get(node, {}).pop(worker_id, None)
        elif key.startswith(keys.desired):
            node, _, worker_id = key.removeprefix(keys.desired).partition("/")
            self._drop_replica(node, worker_id)
        elif key.startswith(keys.cordoned):
            self.cordoned.pop(key.removeprefix(keys.cordoned), None)
        elif key.startswith(keys.moves):
            self.moves.pop(key.removeprefix(keys.moves), None)

    def _drop_replica(self, node: str, worker_id: str) -> None:
        on_node = self.replicas.get(node)
        if on_node is not None and on_node.pop(worker_id, None) is not None:
            if not on_node:
                del self.replicas[node]
                self.gone_since.pop(node, None)  # nothing of ours left to heal there
            nodes = self.placed.get(worker_id)
            if nodes is not None:
                nodes.discard(node)
                if not nodes:
                    del self.placed[worker_id]

    # -- reading it ------------------------------------------------------------------------------

    def refused(self, name: str) -> bool:
        """Deployment ``name`` is in etcd but does not parse: its replicas are left alone."""
        return name in self._refused

    def gone_for(self, node: str) -> float | None:
        """How long ``node`` has been seen gone (None: it is up)."""
        if node in self.nodes:
            return None
        since = self.gone_since.setdefault(node, self.clock())
        return self.clock() - since

    def serving(self, node: str, replica: Replica) -> bool:
        """The node runs ``replica`` as its desired key has it, ready, and every router the node
        registers with has it: it may take the place of another."""
        worker = self.workers.get(node, {}).get(replica.id)
        info = self.nodes.get(node)
        if worker is None or info is None or worker.state not in ("ready", "busy"):
            return False
        if worker.replacement is not None or worker.revision != replica.revision:
            return False
        if replica.spec.get("register", True) is False:
            return True
        return all(worker.routers.get(url) == "registered" for url in info.routers)

    def ready_count(self, name: str) -> int:
        """Replicas of deployment ``name`` that a node runs ready, whatever their revision."""
        count = 0
        for worker_id, nodes in self.placed.items():
            parsed = split_replica(worker_id)
            if parsed is None or parsed[0] != name:
                continue
            if any(
                (w := self.workers.get(n, {}).get(worker_id)) and w.state in ("ready", "busy")
                for n in nodes
            ):
                count += 1
        return count


def _node(data: Any) -> NodeInfo:
    fleet = data.get("fleet") if isinstance(data, dict) else None
    if not isinstance(fleet, dict):
        return NodeInfo()
    labels = fleet.get("labels")
    backends = fleet.get("backends")
    routers = fleet.get("routers")
    room = fleet.get("room")
    return NodeInfo(
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        backends=dict(backends) if isinstance(backends, dict) else {},
        default_backend=fleet.get("default_backend"),
        routers=[str(u) for u in routers] if isinstance(routers, list) else [],
        room=_room(room),
    )


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _room(room: Any) -> dict[str, Any] | None:
    """``room`` if it has the shape hive.desired.node_doc gives it; None (the node takes no
    replica: the scheduler cannot tell what fits) otherwise."""
    if not isinstance(room, dict):
        return None
    cores, memory, gpus = room.get("cores"), room.get("memory_mib"), room.get("gpus")
    if not isinstance(cores, list) or not all(_int(c) for c in cores):
        return None
    if memory is not None and not _int(memory):
        return None
    if not isinstance(gpus, list) or not all(
        isinstance(g, dict) and _int(g.get("memory_free_mib")) and isinstance(g.get("whole"), bool)
        for g in gpus
    ):
        return None
    return room


def _worker(record: dict[str, Any]) -> WorkerInfo:
    labels = record.get("labels") if isinstance(record.get("labels"), dict) else {}
    routers = record.get("routers") if isinstance(record.get("routers"), dict) else {}
    return WorkerInfo(
        state=str(record.get("state")),
        revision=labels.get(REVISION_LABEL),
        routers={str(k): str(v) for k, v in routers.items()},
        replacement=record.get("replacement"),
    )


def _replica(node: str, worker_id: str, spec: Any) -> Replica | None:
    if not isinstance(spec, dict) or not isinstance(spec.get("labels"), dict):
        return None
    name = spec["labels"].get(DEPLOYMENT_LABEL)
    parsed = split_replica(worker_id)
    if not isinstance(name, str) or parsed is None or parsed[0] != name:
        return None
    return Replica(node, worker_id, name, parsed[1], spec)

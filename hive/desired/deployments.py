"""Deployments: N replicas of one spawn spec, placed on the fleet's nodes by its scheduler.

A deployment is ``{prefix}/deployments/{name}``: JSON with ``name``, ``replicas``, the spawn
request's fields (no ``id``: each replica has its own) and optionally ``node_labels`` (a node
takes its replicas only if its ``[fleet] labels`` have every one of them). Its replicas are the
workers ``<name>-0`` ... ``<name>-<replicas - 1>``, each placed on one node as
``{prefix}/desired/{node}/{name}-{k}``, whose value is the deployment's spawn fields with two
labels added: ``hive.deployment`` (the name: the scheduler owns such keys, and no others) and
``hive.revision`` (a digest of the spawn fields: a node's worker that carries the deployment's
revision runs its current spec).

The other keys the scheduler uses (docs/fleet-etcd.md has them as a contract):

- ``{prefix}/scheduler``: who schedules, under that hive's lease;
- ``{prefix}/cordoned/{node}``: ``{"drain": bool}``, nothing new placed there; drained of its
  replicas when ``drain`` is true;
- ``{prefix}/moves/{name}-{k}``: ``{"from": node, "to": node}`` while a replica is being moved
  (its key on both nodes), written and deleted in the same transactions as the desired keys.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hive.desired.declared import read_tables
from hive.errors import DeclarationError
from hive.models import SpawnRequest
from hive.validation import field_errors

DEPLOYMENT_LABEL = "hive.deployment"
REVISION_LABEL = "hive.revision"
#: A name leaves room for ``-<k>`` in a worker id (63 characters at most).
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,55}$")
MAX_REPLICAS = 10_000
#: Fields of a deployment that are not spawn fields.
OWN_FIELDS = ("name", "replicas", "node_labels")


class Keys:
    """The keys of one fleet, under ``prefix``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.rstrip("/")
        self.root = self.prefix + "/"
        self.scheduler = f"{self.prefix}/scheduler"
        self.deployments = f"{self.prefix}/deployments/"
        self.nodes = f"{self.prefix}/nodes/"
        self.workers = f"{self.prefix}/workers/"
        self.desired = f"{self.prefix}/desired/"
        self.cordoned = f"{self.prefix}/cordoned/"
        self.moves = f"{self.prefix}/moves/"

    def deployment(self, name: str) -> str:
        return self.deployments + name

    def desired_key(self, node: str, worker_id: str) -> str:
        return f"{self.desired}{node}/{worker_id}"

    def cordon(self, node: str) -> str:
        return self.cordoned + node

    def move(self, replica: str) -> str:
        return self.moves + replica


def replica_id(name: str, k: int) -> str:
    return f"{name}-{k}"


def split_replica(worker_id: str) -> tuple[str, int] | None:
    """``chat-2`` -> (``chat``, 2); None for an id that is not a replica's."""
    name, _, k = worker_id.rpartition("-")
    if not name or not k.isdigit() or (len(k) > 1 and k.startswith("0")):
        return None
    return name, int(k)


@dataclass(frozen=True)
class Deployment:
    name: str
    replicas: int
    node_labels: dict[str, str]
    #: The spawn fields, as given (no ``id``).
    spawn: dict[str, Any]

    @cached_property
    def revision(self) -> str:
        """A digest of the spawn fields: it changes when what a replica runs changes."""
        text = json.dumps(self.spawn, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def desired(self, k: int) -> dict[str, Any]:
        """The value of replica ``k``'s desired key."""
        labels = dict(self.spawn.get("labels") or {})
        labels[DEPLOYMENT_LABEL] = self.name
        labels[REVISION_LABEL] = self.revision
        return {**self.spawn, "id": replica_id(self.name, k), "labels": labels}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "replicas": self.replicas}
        if self.node_labels:
            out["node_labels"] = dict(self.node_labels)
        return {**out, **self.spawn}

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.node_labels.items())


def parse_deployment(data: Any, where: str) -> Deployment:
    """One deployment from its table or JSON; a bad one is a DeclarationError naming ``where``,
    the deployment and the field."""
    if not isinstance(data, dict):
        raise DeclarationError(f"{where}: must be a table of a name, replicas and spawn fields")
    name = data.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise DeclarationError(
            f"{where}: name: {name!r} must be lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, at most 56 characters"
        )
    at = f"{where}: deployment {name!r}"
    replicas = data.get("replicas")
    if isinstance(replicas, bool) or not isinstance(replicas, int):
        raise DeclarationError(f"{at}: replicas: must be a whole number")
    if not 0 <= replicas <= MAX_REPLICAS:
        raise DeclarationError(f"{at}: replicas: must be between 0 and {MAX_REPLICAS}")
    node_labels = data.get("node_labels", {})
    if not isinstance(node_labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in node_labels.items()
    ):
        raise DeclarationError(f"{at}: node_labels: must be a table of strings ({{gpu = 'a100'}})")
    spawn = {k: v for k, v in data.items() if k not in OWN_FIELDS}
    if "id" in spawn:
        raise DeclarationError(f"{at}: id: a deployment has none; its replicas are {name}-<k>")
    labels = spawn.get("labels") or {}
    if isinstance(labels, dict) and ({DEPLOYMENT_LABEL, REVISION_LABEL} & set(labels)):
        raise DeclarationError(f"{at}: labels: {DEPLOYMENT_LABEL} and {REVISION_LABEL} are hive's")
    try:
        SpawnRequest.model_validate({**spawn, "id": replica_id(name, 0)})
    except ValidationError as exc:
        field, message = field_errors(exc, top="(deployment)", model=SpawnRequest)[0]
        raise DeclarationError(f"{at}: {field}: {message}") from None
    return Deployment(name, replicas, dict(node_labels), spawn)


def read_deployments(path: Path) -> list[Deployment]:
    """The ``[[deployments]]`` of a TOML file (at most 1 MiB; a pipe as ``-f <(...)`` too)."""
    only = "a deployments file holds [[deployments]] tables"
    items = read_tables(path, "deployments", only, named=True)
    if not isinstance(items, list) or not items:
        raise DeclarationError(f"{path}: deployments: must be one or more [[deployments]] tables")
    found: dict[str, Deployment] = {}
    for index, item in enumerate(items):
        deployment = parse_deployment(item, f"{path}: deployments[{index}]")
        if deployment.name in found:
            raise DeclarationError(f"{path}: deployment {deployment.name!r}: declared twice")
        found[deployment.name] = deployment
    return list(found.values())

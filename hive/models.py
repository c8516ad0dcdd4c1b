"""The wire shapes of hive's API: what clients send and what hive answers.

These models are the contract: the API validates requests with them, serializes responses with
them, and the OpenAPI document is generated from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    create_model,
    field_validator,
    model_validator,
)

from hive.config import RestartPolicy
from hive.device_models import CpuDevice as CpuDevice
from hive.device_models import Devices as Devices
from hive.device_models import DeviceSummary
from hive.device_models import GpuDevice as GpuDevice
from hive.device_models import GpuProcess as GpuProcess
from hive.engine_config import StartupPhase


class State(StrEnum):
    """Where a worker is in its life (see the transition table in the registry)."""

    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    STOPPED = "stopped"
    FAILED = "failed"


#: States in which a worker's process runs.
LIVE_STATES = frozenset({State.STARTING, State.READY, State.BUSY})
#: States a worker rests in once its process is gone.
DOWN_STATES = frozenset({State.STOPPED, State.FAILED})

Desired = Literal["running", "stopped"]
Role = Literal["regular", "prefill", "decode"]

WORKER_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
#: A worker id in a path: an id, or a successor's ``<id>~<generation>`` (the key its process
#: keeps for life, and heartbeats by, after it takes its worker's id).
WORKER_KEY_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}(~[0-9]+)?$"
DEVICE_PATTERN = (
    r"^(auto|cpu|gpu|CPU-[0-9]+|GPU-[0-9]+"
    r"|GPU-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$"
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED_ENV = ("HIVE_", "CUDA_VISIBLE_DEVICES")


def _printable(value: str) -> str:
    """Refuse NUL and line breaks: they cannot travel through argv, env or one-line logs."""
    if any(c in value for c in "\x00\r\n"):
        raise ValueError("must not contain NUL or line breaks")
    return value


#: Patterns that document in the OpenAPI schema what the validators below enforce (with clearer
#: messages than a pattern mismatch), so that clients and fuzzers see the real contract.
_PRINTABLE = r"^[^\x00\r\n]*$"
Text = Annotated[str, AfterValidator(_printable), Field(json_schema_extra={"pattern": _PRINTABLE})]


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a boolean")
    return value


#: Refuses JSON's ``true`` where an integer is due (pydantic's lax mode would take it as 1).
#: Placed after the bounds, so that the schema still shows them as minimum and maximum.
NotBool = BeforeValidator(_not_bool)


def _not_bool_number(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


NotBoolNumber = BeforeValidator(_not_bool_number)
CoreCount = Annotated[int, Field(ge=1), NotBool]
CoreList = Annotated[list[Annotated[int, Field(ge=0), NotBool]], Field(min_length=1)]
WorkerId = Annotated[str, StringConstraints(pattern=WORKER_ID_PATTERN)]


def _not_an_option(value: str) -> str:
    if value.startswith("-"):
        raise ValueError("must not start with '-' (it would be read as an option)")
    return _printable(value)


class SpawnRequest(BaseModel):
    """The body of ``POST /v1/workers``: what to run, where, and how to keep it running."""

    # ``register`` would shadow BaseModel.register, so the attribute is ``register_``.
    # The schema also says what the validator below enforces: a bootstrap port is a prefill's.
    model_config = ConfigDict(
        extra="forbid",
        validate_by_name=True,
        serialize_by_alias=True,
        json_schema_extra={
            "if": {
                "required": ["bootstrap_port"],
                "properties": {"bootstrap_port": {"type": "integer"}},
            },
            "then": {"required": ["role"], "properties": {"role": {"const": "prefill"}}},
        },
    )

    model: Annotated[
        str,
        StringConstraints(min_length=1, max_length=256),
        Field(json_schema_extra={"pattern": r"^[^-\x00\r\n][^\x00\r\n]*$"}),
    ]
    backend: str | None = None
    id: WorkerId | None = None
    device: Annotated[str, StringConstraints(pattern=DEVICE_PATTERN)] = "auto"
    gpus: Annotated[int, Field(ge=1, le=64), NotBool] | None = None
    cpus: Annotated[CoreCount | CoreList | None, Field(json_schema_extra={"uniqueItems": True})] = (
        None
    )
    gpu_memory_mib: Annotated[int, Field(ge=1), NotBool] | None = None
    #: Host memory to reserve (MiB); none: what hive learned or estimates (docs/behaviour.md).
    memory_mib: Annotated[int, Field(ge=1), NotBool] | None = None
    port: Annotated[int, Field(ge=1024, le=65535), NotBool] | None = None
    args: list[Text] = []
    env: dict[str, Text] = Field(
        default={},
        json_schema_extra={
            "propertyNames": {
                "pattern": r"^(?!HIVE_)(?!CUDA_VISIBLE_DEVICES$)[A-Za-z_][A-Za-z0-9_]*$"
            }
        },
    )
    labels: dict[Annotated[str, StringConstraints(min_length=1, max_length=128)], Text] = Field(
        default={}, json_schema_extra={"propertyNames": {"pattern": r"^[^=\x00\r\n]+$"}}
    )
    restart: RestartPolicy | None = None
    # Strict: ``"register": 0`` or ``"yes"`` is not a boolean (JSON Schema agrees).
    register_: StrictBool = Field(True, alias="register")
    #: The worker's part with the routers: ``regular``, or ``prefill``/``decode`` for
    #: prefill/decode disaggregation.
    role: Role = "regular"
    #: A prefill worker's bootstrap port (``{bootstrap_port}`` in the backend's command); taken
    #: from ``port_range`` when not given. Only for ``role: prefill``.
    bootstrap_port: Annotated[int, Field(ge=1024, le=65535), NotBool] | None = None
    #: What sglang-router weighs the worker by (its own defaults).
    priority: Annotated[int, Field(ge=0, le=1_000_000), NotBool] = 50
    cost: Annotated[float, Field(gt=0, le=1_000_000), NotBoolNumber] = 1.0

    @model_validator(mode="after")
    def _bootstrap_only_for_prefill(self) -> SpawnRequest:
        if self.bootstrap_port is not None and self.role != "prefill":
            raise ValueError("bootstrap_port: only a worker with role 'prefill' has one")
        return self

    @field_validator("model")
    @classmethod
    def _model_is_not_an_option(cls, model: str) -> str:
        return _not_an_option(model)

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
            if name.startswith(_RESERVED_ENV):
                raise ValueError(f"{name} is set by hive and may not be overridden")
        return env

    @field_validator("cpus")
    @classmethod
    def _unique_cores(cls, cpus: int | list[int] | None) -> int | list[int] | None:
        if isinstance(cpus, list):
            if len(set(cpus)) != len(cpus):
                raise ValueError("core ids must be unique")
            return sorted(cpus)
        return cpus

    @field_validator("labels")
    @classmethod
    def _label_keys(cls, labels: dict[str, str]) -> dict[str, str]:
        for key in labels:
            _printable(key)
            if "=" in key:
                raise ValueError(f"label key {key!r} must not contain '='")
        return labels


class Worker(BaseModel):
    """One worker as every response shows it. Frozen: the registry swaps records, never edits."""

    model_config = ConfigDict(frozen=True)

    id: str
    model: str
    backend: str
    device: str
    gpus: list[str] = []
    cpus: list[int] = []
    pid: int | None = None
    port: int
    url: str
    state: State
    desired: Desired = "running"
    error: str | None = None
    exit_code: int | None = None
    restarts: int = 0
    created_at: datetime
    started_at: datetime | None = None
    ready_at: datetime | None = None
    stopped_at: datetime | None = None
    labels: dict[str, str] = {}
    in_flight: int | None = None
    last_heartbeat_at: datetime | None = None
    rss_bytes: int | None = None
    cpu_percent: float | None = None
    gpu_memory_used_mib: int | None = None
    restart: RestartPolicy = "on-failure"
    next_restart_at: datetime | None = None
    #: A graceful stop is waiting for in-flight requests to finish (it left the routers first).
    draining: bool = False
    #: Sync status per router URL: ``registered``, ``removed``, or why not yet.
    routers: dict[str, str] = {}
    role: Role = "regular"
    bootstrap_port: int | None = None
    priority: int = 50
    cost: float = 1.0
    #: How hive holds the worker's whole process tree: its own ``cgroup`` (v2), or ``tags``
    #: (an environment tag found by a scan of /proc, with hive as child subreaper).
    containment: Literal["cgroup", "tags"] | None = None
    #: Counts the worker's replacements: 1 for the worker as first spawned, one more for each
    #: successor that took its place (``POST /v1/workers/{id}/replace``, ``hive apply``).
    generation: int = 1
    #: Where the worker is declared: ``config:<file>`` (``[[workers]]`` in hive's config, or a
    #: file of ``workers_dir``), ``apply:<source>`` (``hive apply``); None when only spawned.
    declared: str | None = None
    #: A replacement under way, on the worker being replaced: the successor's id and how far
    #: it is (``"web~2 starting"``, ``"web~2 ready, registering"``, ``"draining the old"``).
    replacement: str | None = None
    #: On a successor (its id is ``<id>~<generation>`` until it takes over): the id it replaces.
    replacing: str | None = None
    #: Where the current attempt's start-up went, phase by phase (:mod:`hive.workers.phases`).
    startup: list[StartupPhase] = []
    #: Memory hive reserves for the worker (MiB): host, and per GPU where it shares its GPUs;
    #: where the figures come from; the current attempt's measured peaks (GPU: all its GPUs).
    memory_mib: int | None = None
    gpu_memory_mib: int | None = None
    memory_source: Literal["declared", "learned", "estimated"] | None = None
    memory_peak_mib: int | None = None
    gpu_memory_peak_mib: int | None = None
    #: The reservation still counts: the worker runs, or its memory is not back yet.
    memory_held: bool = False


def successor_id(worker_id: str, generation: int) -> str:
    """The id a successor has until it takes over: ``<id>~<generation>`` (``~`` is never in
    a worker id, so it can clash with none)."""
    return f"{worker_id}~{generation}"


def base_id(worker_id: str) -> str:
    """The worker id a successor's id is for (``web~2`` -> ``web``); an id is its own."""
    return worker_id.split("~", 1)[0]


def process_key(record: Worker) -> str:
    """What the worker's processes are known by (cgroup, environment tag, heartbeat path):
    its id in generation 1, else the successor id it was started under, which a process keeps
    for life because it cannot be told a new one."""
    if record.generation == 1 or "~" in record.id:
        return record.id
    return successor_id(record.id, record.generation)


class WorkerList(BaseModel):
    workers: list[Worker]
    total: int


class Heartbeat(BaseModel):
    """What a worker reports about itself, every heartbeat interval and on each change."""

    model_config = ConfigDict(extra="forbid")

    state: Literal["ready", "busy"]
    in_flight: Annotated[int, Field(ge=0), NotBool] | None = None


class FleetStatus(BaseModel):
    """This hive as a node of a fleet in etcd (``[fleet]``)."""

    node: str
    #: ``connected``, or ``unreachable`` (workers run on regardless; ``error`` says why).
    etcd: Literal["connected", "unreachable"]
    error: str | None = None
    #: Since when it has been so.
    since: datetime
    lease_ttl: int
    #: Workers etcd's desired set declares for this node.
    desired: int = 0
    #: The node's name: ``held`` by this hive, ``taken`` by another hive's lease (``holder``
    #: says whose: this hive then publishes nothing and runs no desired worker), or
    #: ``pending`` (not known yet: etcd has not answered since the lease was granted).
    claim: Literal["held", "taken", "pending"] = "pending"
    holder: dict[str, Any] | None = None
    #: The watch of the desired set: ``watching``, ``reading`` it whole, ``retrying`` after it
    #: ended (``watch_error`` says why), or ``off`` (the name is not held).
    watch: Literal["off", "reading", "watching", "retrying"] = "off"
    watch_error: str | None = None


class LastReload(BaseModel):
    """hive's last read of its configuration and declared workers: at start, or on SIGHUP."""

    at: datetime
    trigger: Literal["start", "SIGHUP"]
    #: False: refused (``message`` says why); the running configuration stays.
    ok: bool
    message: str


class Node(BaseModel):
    hostname: str
    version: str
    started_at: datetime
    devices: DeviceSummary
    workers: dict[State, int]
    #: Where hive answers: its TCP API and its unix socket (no token needed there).
    api_url: str | None = None
    socket: str | None = None
    #: With ``[fleet]``: this node's name and whether etcd answers.
    fleet: FleetStatus | None = None
    #: The configuration file read (null: none, the defaults), the state directory, where the
    #: API token comes from and, from a file, the file's path (never the token).
    config_file: str | None = None
    state_dir: str | None = None
    token_source: Literal["config", "HIVE_TOKEN", "file"] | None = None
    token_file: str | None = None
    last_reload: LastReload | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str


ErrorCode = Literal[
    "invalid",
    "unauthorized",
    "forbidden",
    "not_found",
    "conflict",
    "too_large",
    "no_capacity",
    "internal",
]


class ErrorDetail(BaseModel):
    code: ErrorCode
    message: str
    worker: Worker | None = None
    fields: list[dict[str, Any]] | None = None
    #: A refusal for want of host memory: needed, free, budget and who holds the rest.
    memory: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    """Every error hive answers: ``{"error": {"code": ..., "message": ...}}``."""

    error: ErrorDetail


def _replace_fields() -> dict[str, Any]:
    """Each spawn field but ``id``, left out by default, typed as the spawn request types it:
    ``null`` only where that takes it (a pinned port cleared), so the schema says what the route
    accepts (a null model was schema-valid and answered 422)."""
    return {
        name: (info.annotation, Field(None, alias=info.alias))
        for name, info in SpawnRequest.model_fields.items()
        if name != "id"
    }


class _Changes(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_by_name=True, serialize_by_alias=True)

    def applied_to(self, spec: SpawnRequest) -> SpawnRequest:
        """``spec`` with the fields given here (``null`` clears one, such as a pinned port),
        validated as a whole: an error names the field."""
        changes = self.model_dump(by_alias=True, exclude_unset=True)
        return SpawnRequest.model_validate({**spec.model_dump(by_alias=True), **changes})


#: The body of ``POST /v1/workers/{id}/replace``: the spawn request's fields that change (any of
#: them but ``id``); the successor runs the worker's request with these applied.
ReplaceRequest: type[_Changes] = create_model(  # type: ignore[call-overload]
    "ReplaceRequest", __base__=_Changes, **_replace_fields()
)


class DeclaredWorker(SpawnRequest):
    """A worker as declared in a file (``[[workers]]``, ``workers_dir``, ``hive apply -f``):
    a spawn request whose ``id`` is required."""

    id: WorkerId  # type: ignore[assignment]


class ApplyRequest(BaseModel):
    """The body of ``POST /v1/apply``: the declared set, and what to do with the rest."""

    model_config = ConfigDict(extra="forbid")

    workers: list[DeclaredWorker]
    #: Stop and remove every worker that is not in ``workers``.
    prune: StrictBool = False
    #: Only say what would be done (``hive diff``).
    dry_run: StrictBool = False
    #: Let ``prune`` remove every worker on the host, or workers declared elsewhere (another
    #: source, the configuration, etcd) or spawned through the API: refused (422) without it.
    force: StrictBool = False
    #: Where the declarations come from, shown in each record's ``declared`` (``apply:<source>``).
    source: Annotated[str, StringConstraints(min_length=1, max_length=512)] = "api"

    @field_validator("workers")
    @classmethod
    def _unique_ids(cls, workers: list[DeclaredWorker]) -> list[DeclaredWorker]:
        seen: set[str] = set()
        for worker in workers:
            if worker.id in seen:
                raise ValueError(f"worker {worker.id!r} is declared twice")
            seen.add(worker.id)
        return workers


class PlanItem(BaseModel):
    """One worker in an apply's plan, and (unless a dry run) what became of it."""

    id: str
    #: ``start``: declared, unchanged, and not running, though no operator stopped it (hive's
    #: own shutdown with ``on_exit = "stop"``, a reboot, a policy that gave up): started again.
    action: Literal["create", "replace", "unchanged", "start", "prune"]
    #: The fields that differ, for ``replace``: ``{field: [running, declared]}``.
    changes: dict[str, list[Any]] = {}
    #: What happened: ``done``, or the error that stopped it (the worker is left as it was).
    result: str | None = None


class ApplyResult(BaseModel):
    """What ``POST /v1/apply`` answers: the plan in order, each item with its result."""

    items: list[PlanItem]
    dry_run: bool


# -- what hive keeps beside a record ------------------------------------------------------------


#: What starts each line hive itself writes into a worker's log (``--- hive: <time> <text>``).
MARKER = "--- hive: "


@dataclass(frozen=True, slots=True)
class Entry:
    """A record with what hive keeps about it but never shows: the request and its token."""

    record: Worker
    spec: SpawnRequest
    token: str


def holds_resources(record: Worker) -> bool:
    """A worker keeps its port and devices while it runs or while a restart is due."""
    return record.state in LIVE_STATES or record.next_restart_at is not None

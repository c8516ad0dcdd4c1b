"""hive's settings: the TOML file as pydantic models, their defaults, and where files live.

The file is found at ``--config``, else ``$HIVE_CONFIG``, else ``<config dir>/hive.toml``; a missing
file means every default. Directories come from platformdirs, so ``XDG_CONFIG_HOME``,
``XDG_STATE_HOME`` and ``XDG_RUNTIME_DIR`` move them. Every error names the file and the key.
"""

from __future__ import annotations

import os
import re
import string
import tomllib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import platformdirs
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from hive.addresses import http_url
from hive.engine_config import BUILTIN_BACKENDS, LoadConfig, PhasePattern
from hive.errors import ConfigError, UnknownBackend
from hive.validation import field_errors

if TYPE_CHECKING:
    from hive.models import SpawnRequest

APP = "hive"

#: Names a backend ``command`` may use as ``{placeholder}``.
PLACEHOLDERS = frozenset(
    {
        "model", "port", "host", "python", "id", "device", "gpus", "ncpus", "cpus", "state_dir",
        "bootstrap_port", "role", "gpu_memory_mib", "gpu_memory_fraction",
    }
)  # fmt: skip

RestartPolicy = Literal["no", "on-failure", "always"]


def config_dir() -> Path:
    return platformdirs.user_config_path(APP)


def state_dir() -> Path:
    return platformdirs.user_state_path(APP)


def runtime_dir() -> Path:
    with warnings.catch_warnings():  # no XDG_RUNTIME_DIR: platformdirs falls back and warns
        warnings.simplefilter("ignore")
        return platformdirs.user_runtime_path(APP)


def default_config_path() -> Path:
    return config_dir() / "hive.toml"


class BackendConfig(BaseModel):
    """How to run one kind of model server."""

    model_config = ConfigDict(extra="forbid")

    command: Annotated[list[str], Field(min_length=1)]
    health_path: str | None = "/health"
    startup_timeout: Annotated[float, Field(gt=0)] = 120.0
    #: A passing readiness probe makes the worker ready only when the socket listening on its
    #: port is held by one of its own processes (:mod:`hive.workers.listener`); ``false`` for
    #: an engine whose port another process holds for it (a container engine's port proxy).
    listener_check: bool = True
    #: GPUs only (true), the CPU only (false), a GPU with room else the CPU ("optional"), or a
    #: GPU whenever the host has one, else the CPU ("auto"): docs/configuration.md.
    gpu: bool | Literal["optional", "auto"] = "optional"
    env: dict[str, str] = {}
    #: Arguments (after ``role_args``) and environment (after ``env``, with placeholders) by
    #: the kind of device the worker was placed on: how this engine runs there.
    device_args: dict[Literal["cpu", "gpu"], list[str]] = {}
    device_env: dict[Literal["cpu", "gpu"], dict[str, str]] = {}
    #: Once ready, the health path is probed every ``liveness_period`` seconds; this many
    #: failures in a row make the worker ``failed``.
    liveness_period: Annotated[float, Field(gt=0)] = 10.0
    liveness_failures: Annotated[int, Field(ge=1)] = 3
    #: Arguments added after ``command`` for a worker of each router role (placeholders as in
    #: ``command``): how this engine is told to prefill or decode.
    role_args: dict[Literal["regular", "prefill", "decode"], list[str]] = {}
    #: Arguments added when the worker was given a share of its GPUs' memory (``gpu_memory_mib``)
    #: rather than whole GPUs: how this engine is told to keep to its share.
    share_args: list[str] = []
    #: Where the engine says how busy it is; hive reads it when the worker sends no heartbeats.
    load: LoadConfig | None = None
    #: The Python environment (a venv, or any directory with ``bin/python``) the engine lives in:
    #: ``{python}`` is its interpreter and its ``bin`` comes first on the worker's ``PATH``.
    #: Default: hive's own interpreter and ``PATH``.
    venv: Path | None = None
    #: The key routers must use for this backend's workers (``api_key``, or the first line of
    #: ``api_key_file``): sent to sglang-router with each registration, never logged or shown.
    api_key: str | None = None
    api_key_file: Path | None = None
    #: Let the router health-check a new worker itself. Default: only when ``health_path`` is
    #: the router's ``/health``; otherwise hive, which has seen it ready, says not to.
    router_health_check: bool | None = None
    #: When hive runs as root: the user (and group) its workers run as. Default: hive's own.
    user: Annotated[str, Field(min_length=1)] | None = None
    group: Annotated[str, Field(min_length=1)] | None = None
    #: Where its workers start (absolute; default: each its own, ``<state_dir>/work/<id>``).
    cwd: str | None = None
    #: A worker with requests in flight whose engine's progress (``load.progress``, a
    #: llama-server's slots) stands still this long is ``failed`` (``stalled: ...``); 0: never.
    stall_timeout: Annotated[float, Field(ge=0)] = 60.0
    #: Every this many seconds, an idle worker is asked for a one-token generation
    #: (``POST /v1/completions``), failed as stalled if none comes within ``stall_timeout``.
    deep_probe_period: Annotated[float, Field(gt=0)] | None = None
    #: The log lines that end the engine's start-up phases, in the record's ``startup``.
    startup_phases: list[PhasePattern] = []

    def read_api_key(self) -> str | None:
        """The key this backend's engines expect: ``api_key``, or the first line of
        ``api_key_file`` (raises OSError when it cannot be read)."""
        if self.api_key_file is not None:
            return Path(self.api_key_file).read_text().strip() or None
        return self.api_key

    @field_validator("role_args", "device_args")
    @classmethod
    def _role_placeholders(cls, table: dict[str, list[str]]) -> dict[str, list[str]]:
        for args in table.values():
            cls._known_placeholders(args)
        return table

    @field_validator("share_args")
    @classmethod
    def _share_placeholders(cls, args: list[str]) -> list[str]:
        return cls._known_placeholders(args)

    @field_validator("device_env")
    @classmethod
    def _env_placeholders(cls, table: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for env in table.values():
            cls._known_placeholders(list(env.values()))
        return table

    @field_validator("command")
    @classmethod
    def _known_placeholders(cls, command: list[str]) -> list[str]:
        for arg in command:
            for _, name, spec, conv in string.Formatter().parse(arg):
                if name is None:
                    continue
                if name not in PLACEHOLDERS or spec or conv:
                    known = " ".join(f"{{{p}}}" for p in sorted(PLACEHOLDERS))
                    raise ValueError(f"unknown placeholder {{{name}}} in {arg!r}; known: {known}")
        return command

    @field_validator("health_path", "cwd")
    @classmethod
    def _absolute(cls, path: str | None) -> str | None:
        if path == "":
            return None  # no probe: the worker is ready when it heartbeats ``ready``
        if path is not None and not path.startswith("/"):
            raise ValueError("must start with '/'")
        return path


class FleetConfig(BaseModel):
    """This hive as a node of a fleet whose shared state is in etcd (docs/fleet-etcd.md)."""

    model_config = ConfigDict(extra="forbid")

    #: etcd's client URLs (``http://`` or ``https://``), tried in turn.
    endpoints: Annotated[list[str], Field(min_length=1)]
    #: The root of hive's keys in etcd.
    prefix: str = "/hive"
    #: This node's name in the fleet. Default: the host's name.
    node: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")] | None = None
    #: Seconds this node's lease lives without a renewal: a dead hive's node and workers leave
    #: the fleet view this long after it died.
    lease_ttl: Annotated[int, Field(ge=2, le=3600)] = 10
    #: What this node offers, for deployments' ``node_labels`` (published with the node).
    labels: dict[str, str] = {}
    #: Campaign to be the fleet's scheduler (one hive at a time is, elected through etcd).
    schedule: StrictBool = True
    #: Seconds a node may be gone from etcd (its lease expired) before the scheduler places its
    #: replicas on other nodes.
    reschedule_after: Annotated[float, Field(ge=0, le=86400)] = 60.0
    #: TLS towards etcd: the CA that signed etcd's certificate, and this client's own.
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, endpoints: list[str]) -> list[str]:
        for url in endpoints:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} must be an http:// or https:// URL")
        return endpoints

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}", key):
                raise ValueError(
                    f"label key {key!r}: letters, digits, '.', '_', '/' and '-', at most 128"
                )
            if len(value) > 256 or any(c in value for c in "\x00\r\n"):
                raise ValueError(f"label {key!r}: a value of at most 256 characters on one line")
        return labels

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, prefix: str) -> str:
        if not prefix.startswith("/") or prefix.endswith("/") or len(prefix) < 2:
            raise ValueError("must start with '/' and not end with one, like \"/hive\"")
        return prefix


class RouterConfig(BaseModel):
    """An upstream router that hive keeps in sync with its ready workers."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["sglang"] = "sglang"
    url: str
    api_key: str = ""
    advertise_host: str = "127.0.0.1"


def _listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be HOST:PORT, got {value!r}")
    return value


class Config(BaseModel):
    """Everything ``hive serve`` reads from its TOML file."""

    model_config = ConfigDict(extra="forbid")

    listen: str = "127.0.0.1:7070"
    #: TLS on the TCP API: this certificate (chain) and key. Then ``https://`` only.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: Mutual TLS: only clients with a certificate this CA signed may connect over TCP.
    tls_client_ca_file: Path | None = None
    token: str = ""
    token_file: Path | None = None
    socket: Path | None = None
    state_dir: Path | None = None
    port_range: tuple[int, int] = (18000, 18999)
    worker_host: str = "127.0.0.1"
    default_backend: str = "demo"
    default_restart: RestartPolicy = "on-failure"
    stop_timeout: Annotated[float, Field(gt=0)] = 30.0
    drain_timeout: Annotated[float, Field(ge=0)] = 30.0
    heartbeat_timeout: Annotated[float, Field(gt=0)] = 15.0
    #: At SIGTERM/SIGINT: ``detach`` leaves the workers running for the next hive to adopt (a
    #: restart or an upgrade of hive costs no model load); ``stop`` stops them all.
    on_exit: Literal["stop", "detach"] = "detach"
    #: With ``detach``: the command asked at SIGTERM whether the host is shutting down (its
    #: first line ``stopping``); then the workers are stopped, and started again at boot as
    #: their restart policy says (:mod:`hive.host.shutdown`). Empty: never asked.
    shutdown_check: list[str] = ["systemctl", "is-system-running"]
    retention: Annotated[float, Field(ge=0)] = 3600.0
    max_log_bytes: Annotated[int, Field(ge=4096)] = 50_000_000
    metrics_public: bool = False
    device_refresh: Annotated[float, Field(gt=0)] = 2.0
    usage_refresh: Annotated[float, Field(gt=0)] = 5.0
    router_reconcile: Annotated[float, Field(gt=0)] = 5.0
    #: An API connection must have a request under way this many seconds after it opens
    #: (and after each answer), or it is dropped: slow or silent clients hold nothing.
    http_header_timeout: Annotated[float, Field(gt=0)] = 10.0
    #: Open API connections over TCP at most (and as many over the unix socket).
    http_max_connections: Annotated[int, Field(ge=1)] = 1024
    events_keepalive: Annotated[float, Field(gt=0)] = 15.0
    events_buffer: Annotated[int, Field(ge=1)] = 10_000
    events_queue: Annotated[int, Field(ge=1)] = 1_000
    restart_delay: Annotated[float, Field(gt=0)] = 1.0
    restart_delay_max: Annotated[float, Field(gt=0)] = 60.0
    restart_reset_after: Annotated[float, Field(ge=0)] = 600.0
    max_restarts: Annotated[int, Field(ge=0)] | None = None
    #: Host memory (MiB) workers may reserve in total. Default: the host's memory less a
    #: reserve for the system (:func:`hive.devices.host_memory.default_budget`).
    host_memory_mib: Annotated[int, Field(ge=1)] | None = None
    #: How workers are held: ``cgroup`` (v2, one per worker), ``tags`` (environment tag and
    #: subreaper), or ``auto`` (a cgroup where hive can write one, else tags).
    containment: Literal["auto", "cgroup", "tags"] = "auto"
    backends: dict[str, BackendConfig] = {}
    routers: list[RouterConfig] = []
    #: Declared workers (spawn requests with an ``id``): started at boot, kept, and reconciled
    #: on SIGHUP (:mod:`hive.desired.declared`). Validated when hive reads them, with the
    #: file's name.
    workers: list[dict[str, Any]] = []
    #: A directory of TOML files of more ``[[workers]]``; relative to the config file's
    #: directory. Default: ``workers.d`` beside the config file.
    workers_dir: Path | None = None
    #: Join a fleet in etcd: publish this node and its workers, take desired workers from it.
    fleet: FleetConfig | None = None

    @field_validator("listen")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        return _listen(value)

    @field_validator("port_range")
    @classmethod
    def _ports(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if not 1024 <= low <= high <= 65535:
            raise ValueError("must be [low, high] with 1024 <= low <= high <= 65535")
        return value

    @field_validator("backends", mode="before")
    @classmethod
    def _merge_builtins(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        merged: dict[str, Any] = {name: dict(b) for name, b in BUILTIN_BACKENDS.items()}
        for name, table in value.items():
            if isinstance(table, dict) and name in merged:
                merged[name] = {**merged[name], **table}
            else:
                merged[name] = table
        return merged

    @model_validator(mode="after")
    def _tls_pair(self) -> Config:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file: give both tls_cert_file and tls_key_file, or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file: mutual TLS needs tls_cert_file and tls_key_file")
        return self

    @model_validator(mode="after")
    def _defaults(self) -> Config:
        if not self.backends:
            self.backends = {n: BackendConfig(**b) for n, b in BUILTIN_BACKENDS.items()}
        if self.default_backend not in self.backends:
            raise ValueError(
                f"default_backend: {self.default_backend!r} is not a configured backend"
            )
        return self

    # Backends: every lookup goes through these two.
    def backend_name(self, spec: SpawnRequest) -> str:
        """The backend a request runs on: the one it names, else ``default_backend``."""
        return spec.backend or self.default_backend

    def backend(self, name: str) -> BackendConfig:
        """The backend called ``name``; :class:`UnknownBackend` naming those configured."""
        try:
            return self.backends[name]
        except KeyError:
            raise UnknownBackend(name, sorted(self.backends)) from None

    # Resolved paths: the file's value, else the platformdirs default.
    @property
    def socket_path(self) -> Path:
        return self.socket or runtime_dir() / "hive.sock"

    @property
    def state_path(self) -> Path:
        return self.state_dir or state_dir()

    @property
    def logs_path(self) -> Path:
        return self.state_path / "logs"

    @property
    def token_path(self) -> Path:
        return self.token_file or config_dir() / "token"

    @property
    def listen_host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def api_url(self) -> str:
        """The TCP API as a client on this host reaches it (a wildcard ``listen`` as loopback)."""
        url = http_url(self.listen_host, self.listen_port)
        return "https://" + url.removeprefix("http://") if self.tls else url


def _format_error(path: Path | str, error: ValidationError) -> str:
    """One line per bad key, naming the file; a misspelled key with the nearest known one."""
    errors = field_errors(error, top="(top level)", model=Config)
    return "\n".join(f"{path}: {key}: {message}" for key, message in errors)


def find_config_path(explicit: str | os.PathLike[str] | None = None) -> tuple[Path, bool]:
    """Where the configuration comes from, and whether it was named explicitly."""
    if explicit:
        return Path(explicit), True
    if env := os.environ.get("HIVE_CONFIG"):
        return Path(env), True
    return default_config_path(), False


def load_config(explicit: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate the configuration; a file named explicitly must exist."""
    path, named = find_config_path(explicit)
    try:
        text = path.read_text()
    except FileNotFoundError:
        if named:
            raise ConfigError(f"{path}: no such file") from None
        return Config()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(text, path)


def parse_config(text: str, path: Path | str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(path, exc)) from None

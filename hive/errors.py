"""Every error hive names, by its cause: one tree, rooted at :class:`HiveError`.

* HiveError
  x RequestError ............ the request is at fault: the caller can fix it
    + InvalidRequest ........ a field or a body that is not valid
      - MalformedBody ....... a body that is not JSON at all, or nested too deeply
      - UnknownBackend ...... a backend the configuration does not have
      - DeclarationError .... a declared set of workers that cannot be used, whole
    + NotAuthenticated ...... no token, or one hive does not know
    + NotPermitted .......... a token good for less than this (a worker's own)
    + NotFound
      - UnknownWorker ....... no worker with this id
    + Conflict .............. it clashes with what hive holds or does now
      - DuplicateWorker ..... the id is taken
      - IllegalTransition ... the worker's state does not allow it
      - PortTaken ........... the port asked for is held, by a worker or another process
  x CapacityError ........... the host has no room for it now
    + NoCapacity ............ what workers hold is taken: cores, GPUs, GPU memory, ports
      - NoFreePort .......... every port of ``port_range`` is held
      - NoMemory ............ the host memory (``host_memory_mib``) a worker needs is held
    + NoDiskRoom ............ ``state_dir`` is full
  x StateError .............. hive cannot keep its own state
    + JournalError .......... the journal could not be written
  x ConfigError ............. the configuration cannot be used
  x UpstreamError ........... a service hive talks to could not be reached, or refused
    + RouterError ........... an SGLang router
    + EtcdError ............. the fleet's etcd
      - Compacted ........... a watch asked for history etcd no longer keeps

Each carries its message (one sentence that names the field or the thing at fault), the
worker record it concerns when there is one, and its own ids and figures as attributes.
Nothing here knows HTTP: what a cause is on the wire (status and error code) is decided in
one table, :data:`hive.api.errors.WIRE`, and nowhere else.

Outside the tree, on purpose: the client's own errors (:mod:`hive.client`, another program's
side of the wire), the CLI's usage errors and the daemon's start-up errors (each printed where
it is raised), and private signals that never leave their module (the event stream's
overflow, a probe's unreadable answer, a containment the kernel refused, a journal file that
cannot be read at load).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from hive.models import State, Worker


class HiveError(Exception):
    """Something hive refuses or cannot do, for a cause it can name."""

    def __init__(self, message: str, *, worker: Worker | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The worker the error concerns, answered with it (its record as it stands).
        self.worker = worker


# -- the request is at fault ---------------------------------------------------------------------


class RequestError(HiveError):
    """The request is at fault: asked again unchanged, it is refused again."""


class InvalidRequest(RequestError):
    """A field or a body that is not valid; the message names the field."""


class MalformedBody(InvalidRequest):
    """A body that is not JSON at all (or nested too deeply to read)."""


class UnknownBackend(InvalidRequest):
    """A backend the configuration does not have."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"backend: no backend {name!r} (configured: {', '.join(known)})")
        self.name = name
        self.known = known


class DeclarationError(InvalidRequest):
    """A declared set that cannot be used; the message names the file, the worker and the
    field. Nothing of the set is applied."""


class NotAuthenticated(RequestError):
    """No token, or a token hive does not know."""


class NotPermitted(RequestError):
    """A token good for less than this request: a worker's, for its own heartbeat only."""


class NotFound(RequestError):
    """What the request names does not exist."""


class UnknownWorker(NotFound):
    def __init__(self, worker_id: str) -> None:
        super().__init__(f"no worker {worker_id!r}")
        self.worker_id = worker_id


class Conflict(RequestError):
    """The request clashes with what hive holds or does now (a worker's state, an id, a port,
    a shut-down under way)."""


class DuplicateWorker(Conflict):
    """The id is taken; ``field`` names the request's field that asked for it, if any."""

    def __init__(self, worker_id: str, field: str | None = None) -> None:
        prefix = f"{field}: " if field else ""
        super().__init__(f"{prefix}worker {worker_id!r} already exists")
        self.worker_id = worker_id


class IllegalTransition(Conflict):
    """The worker's state does not allow the change."""

    def __init__(self, worker_id: str, from_: State, to: State) -> None:
        super().__init__(f"worker {worker_id!r} cannot go from {from_} to {to}")
        self.worker_id, self.from_, self.to = worker_id, from_, to


class PortTaken(Conflict):
    """The port asked for (in ``field``: ``port``, ``bootstrap_port``) is held: by the worker
    ``holder``, or, when ``holder`` is None, by another process on this host."""

    def __init__(self, port: int, holder: str | None, field: str = "port") -> None:
        by = f"worker {holder!r}" if holder is not None else "another process on this host"
        super().__init__(f"{field}: {port} is in use by {by}")
        self.port, self.holder, self.field = port, holder, field


# -- the host has no room ------------------------------------------------------------------------


class CapacityError(HiveError):
    """The host has no room for it now; it may fit later, or elsewhere."""


class NoCapacity(CapacityError):
    """What workers hold is taken: no cores, GPUs, GPU memory or port that fit the request
    (or no device of the kind asked). A worker that stops frees some."""


class NoFreePort(NoCapacity):
    """Every port of ``port_range`` is held."""

    def __init__(self, low: int, high: int) -> None:
        super().__init__(f"no free port in port_range {low}-{high}")
        self.low, self.high = low, high


class NoMemory(NoCapacity):
    """The host memory a worker needs (``needed_mib``) is more than is free of what workers
    may reserve (``budget_mib``, config ``host_memory_mib``); ``held`` says which workers hold
    the rest, and how much each."""

    def __init__(
        self, worker_id: str, needed_mib: int, source: str, budget_mib: int, held: dict[str, int]
    ) -> None:
        free = budget_mib - sum(held.values())
        holders = ", ".join(f"{w} {mib} MiB" for w, mib in sorted(held.items(), key=_largest))
        super().__init__(
            f"memory: {worker_id!r} needs {needed_mib} MiB of host memory ({source}), "
            f"{max(free, 0)} MiB of host_memory_mib {budget_mib} MiB are free"
            + (f"; held by {holders}" if holders else "")
        )
        self.worker_id, self.needed_mib, self.source = worker_id, needed_mib, source
        self.budget_mib, self.held, self.free_mib = budget_mib, held, max(free, 0)

    @property
    def figures(self) -> dict[str, object]:
        """The figures as the API answers them beside the message."""
        return {
            "needed_mib": self.needed_mib,
            "source": self.source,
            "free_mib": self.free_mib,
            "host_memory_mib": self.budget_mib,
            "held": self.held,
        }


def _largest(item: tuple[str, int]) -> tuple[int, str]:
    return -item[1], item[0]


class NoDiskRoom(CapacityError):
    """``state_dir`` is full: too little free space (``free_bytes``), or no free inodes."""

    def __init__(
        self, state_dir: Path, free_bytes: int, short_of: Literal["space", "inodes"]
    ) -> None:
        what = f"{free_bytes // 1024} KiB free" if short_of == "space" else "no free inodes"
        super().__init__(
            f"state_dir {state_dir} is full ({what}): no room for a worker's log or the "
            "journal; free space there, or move state_dir"
        )
        self.state_dir, self.free_bytes, self.short_of = state_dir, free_bytes, short_of


# -- hive's own state ----------------------------------------------------------------------------


class StateError(HiveError):
    """hive cannot keep its own state: a change it made is not where it must be."""


class JournalError(StateError):
    """The journal could not be written: the change it was to hold is not on disk."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot write {path}: {reason}")
        self.path = path
        self.reason = reason


# -- configuration -------------------------------------------------------------------------------


class ConfigError(HiveError):
    """The configuration cannot be used; the message names the file and the key."""


# -- services hive talks to ----------------------------------------------------------------------


class UpstreamError(HiveError):
    """A service hive talks to could not be reached, or refused; the message says which."""


class RouterError(UpstreamError):
    """An SGLang router could not be reached or refused; ``status`` is the HTTP status the
    router answered with, None when it did not answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class EtcdError(UpstreamError):
    """etcd could not be reached, or refused the request; the message says which and why."""


class Compacted(EtcdError):
    """A watch asked for a revision etcd no longer keeps; read everything again."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted (oldest kept: {revision})")
        self.revision = revision

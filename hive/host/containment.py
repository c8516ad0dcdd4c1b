"""Containment: which processes belong to a worker, whatever they do, and ending them all.

A worker is its whole tree. A process-group kill misses a descendant that double-forks and
calls ``setsid()`` (real engines do: vLLM with Ray, multiprocessing spawners, shell wrappers),
so hive keeps each worker in one of two kinds of containment, chosen at start-up:

``cgroup``
    Where hive can write to a cgroup v2 hierarchy (systemd gives one with ``Delegate=yes``),
    every worker runs in a cgroup of its own, ``<base>/worker.<id>``: its processes are
    ``cgroup.procs``, ending them is ``cgroup.kill``, and "gone" means ``cgroup.events`` says
    ``populated 0``. ``<base>`` is hive's own cgroup when it was given one (hive moves itself
    into the leaf ``<base>/supervisor`` so the workers can be its siblings), or
    ``hive.<instance>`` under the hierarchy's root when hive runs in the root cgroup. A worker
    process is moved into its cgroup the moment it is spawned; the environment tag below also
    catches anything it forked in that instant.

``tags``
    Elsewhere, hive is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so orphaned descendants
    re-parent to hive instead of init, and every worker process carries a tag in its
    environment (``HIVE_INSTANCE``, ``HIVE_WORKER_ID``, ``HIVE_ATTEMPT``) that a scan of
    ``/proc`` finds after any fork or a restart of hive.

Either way the tag is set, so a process of an earlier attempt (a stale ``HIVE_ATTEMPT``) can be
told from the current one. The ``instance`` is derived from ``state_dir``: the same for every
hive that adopts the same workers, different for two hives on one host.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

log = logging.getLogger("hive.containment")

Kind = Literal["cgroup", "tags"]

#: The environment tag every worker process carries (and inherits to its descendants).
INSTANCE_ENV, WORKER_ENV, ATTEMPT_ENV = "HIVE_INSTANCE", "HIVE_WORKER_ID", "HIVE_ATTEMPT"
_PR_SET_CHILD_SUBREAPER = 36
_LEAF = "supervisor"
_PREFIX = "worker."


class ContainmentError(OSError):
    """A worker's process could not be put in its containment."""


def instance_of(state_dir: Path) -> str:
    """A short name for the hive that owns ``state_dir``, stable across its restarts."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Tag:
    """The tag found in one process's environment."""

    pid: int
    instance: str
    worker_id: str
    attempt: str | None


def read_tag(pid: int) -> Tag | None:
    """The hive tag in ``pid``'s environment, or None (no tag, gone, or not readable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            raw = file.read()
    except OSError:
        return None
    values: dict[bytes, bytes] = {}
    for item in raw.split(b"\0"):
        name, sep, value = item.partition(b"=")
        if sep and name in (b"HIVE_INSTANCE", b"HIVE_WORKER_ID", b"HIVE_ATTEMPT"):
            values[name] = value
    instance, worker = values.get(b"HIVE_INSTANCE"), values.get(b"HIVE_WORKER_ID")
    if instance is None or worker is None:
        return None
    attempt = values.get(b"HIVE_ATTEMPT")
    return Tag(
        pid,
        instance.decode(errors="replace"),
        worker.decode(errors="replace"),
        attempt.decode(errors="replace") if attempt is not None else None,
    )


def _tagged(instance: str) -> Iterator[Tag]:
    """Every live process whose environment carries this hive instance's tag."""
    me = os.getpid()
    for pid in _pids():
        if pid == me:
            continue
        tag = read_tag(pid)
        if tag is not None and tag.instance == instance and not _is_zombie(pid):
            yield tag


class _TagIndex:
    """This instance's tagged processes by worker, from one pass over ``/proc`` that the calls
    within ``max_age`` seconds share: a hundred workers stopped at once cost a few passes, not
    a few hundred. Safe from any thread."""

    def __init__(self, instance: str, max_age: float = 0.05) -> None:
        self.instance = instance
        self.max_age = max_age
        self._lock = threading.Lock()
        self._index: dict[str, set[int]] = {}
        self._at: float | None = None

    def pids_of(self, worker_id: str) -> set[int]:
        with self._lock:
            if self._at is None or time.monotonic() - self._at > self.max_age:
                index: dict[str, set[int]] = {}
                for tag in _tagged(self.instance):
                    index.setdefault(tag.worker_id, set()).add(tag.pid)
                self._index, self._at = index, time.monotonic()
            return set(self._index.get(worker_id, ()))


def _pids() -> Iterator[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


class Containment(Protocol):
    """What the lifecycle needs of either kind."""

    kind: Kind
    instance: str

    def prepare(self, worker_id: str) -> None: ...
    def enter(self, worker_id: str, pid: int) -> None: ...
    def members(self, worker_id: str) -> set[int]: ...
    def kill(self, worker_id: str) -> None: ...
    def empty(self, worker_id: str) -> bool: ...
    def release(self, worker_id: str) -> None: ...
    def oom_kills(self, worker_id: str) -> int | None: ...
    def inventory(self) -> dict[str, set[int]]: ...
    def owner_of(self, pid: int) -> str | None: ...
    def close(self) -> None: ...


class Tags:
    """Containment by environment tag and subreaping, for hosts without a writable cgroup."""

    kind: Kind = "tags"

    def __init__(self, instance: str) -> None:
        self.instance = instance
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            log.warning("cannot become a child subreaper: %s", os.strerror(ctypes.get_errno()))

    def prepare(self, worker_id: str) -> None:
        return None

    def enter(self, worker_id: str, pid: int) -> None:
        return None

    def members(self, worker_id: str) -> set[int]:
        return {tag.pid for tag in _tagged(self.instance) if tag.worker_id == worker_id}

    def kill(self, worker_id: str) -> None:
        for pid in self.members(worker_id):
            _pidfd_kill(pid, signal.SIGKILL, self.instance)

    def empty(self, worker_id: str) -> bool:
        return not self.members(worker_id)

    def release(self, worker_id: str) -> None:
        return None

    def oom_kills(self, worker_id: str) -> int | None:
        return None

    def inventory(self) -> dict[str, set[int]]:
        found: dict[str, set[int]] = {}
        for tag in _tagged(self.instance):
            found.setdefault(tag.worker_id, set()).add(tag.pid)
        return found

    def owner_of(self, pid: int) -> str | None:
        tag = read_tag(pid)
        return tag.worker_id if tag is not None and tag.instance == self.instance else None

    def close(self) -> None:
        return None


class Cgroups:
    """One cgroup v2 per worker under ``base``."""

    kind: Kind = "cgroup"

    def __init__(self, base: Path, instance: str, mount: Path) -> None:
        self.base = base
        self.instance = instance
        self.mount = mount
        # Only a process that forked in the instant between its spawn and its move into the
        # cgroup is outside it (with the worker's tag): a pass over /proc shared by the calls
        # of 50 ms is fresh enough for those; the cgroup itself is read anew every time.
        self._tags = _TagIndex(instance)

    @classmethod
    def discover(cls, instance: str) -> tuple[Cgroups | None, str]:
        """hive's cgroup tree, or None and why not (no cgroup v2, not writable...)."""
        mount = _cgroup2_mount()
        if mount is None:
            return None, "no cgroup v2 hierarchy is mounted"
        own = _own_cgroup()
        if own is None:
            return None, "hive's own cgroup v2 is not in /proc/self/cgroup"
        here = mount / own.lstrip("/")
        if here == mount:
            base = mount / f"hive.{instance}"
        elif here.name == _LEAF:
            base = here.parent
        else:
            base = here
        try:
            base.mkdir(exist_ok=True)
            probe = base / f"{_PREFIX}probe-{os.getpid()}"
            probe.mkdir()
            probe.rmdir()
            if here != mount and here.name != _LEAF:
                leaf = base / _LEAF
                leaf.mkdir(exist_ok=True)
                (leaf / "cgroup.procs").write_text(str(os.getpid()))
        except OSError as exc:
            return None, f"cannot write to the cgroup {base}: {exc.strerror or exc}"
        # The memory controller for the workers, where base may hand it on: their memory.events
        # say when the OOM killer ended one of their processes. Best effort (else: the kernel log).
        with contextlib.suppress(OSError):
            if "memory" in (base / "cgroup.controllers").read_text().split():
                (base / "cgroup.subtree_control").write_text("+memory")
        return cls(base, instance, mount), f"cgroup v2 under {base}"

    def path(self, worker_id: str) -> Path:
        return self.base / f"{_PREFIX}{worker_id}"

    def prepare(self, worker_id: str) -> None:
        self.path(worker_id).mkdir(exist_ok=True)

    def enter(self, worker_id: str, pid: int) -> None:
        """Move ``pid`` into the worker's cgroup; ContainmentError if the kernel refuses."""
        try:
            (self.path(worker_id) / "cgroup.procs").write_text(str(pid))
        except ProcessLookupError:
            pass
        except OSError as exc:
            raise ContainmentError(
                f"cannot move the worker into its cgroup {self.path(worker_id)}: "
                f"{exc.strerror or exc}"
            ) from None

    def members(self, worker_id: str) -> set[int]:
        """The cgroup's processes, and any process with the worker's tag outside it (forked
        in the instant between the spawn and the move), which is moved in."""
        found = _procs(self.path(worker_id))
        for pid in self._tags.pids_of(worker_id) - found:
            with contextlib.suppress(OSError):
                self.enter(worker_id, pid)
            found.add(pid)
        return found

    def figures(self, worker_id: str) -> tuple[set[int], int | None, int] | None:
        """What the worker's cgroup holds and has used, as the kernel counts it: its pids, its
        resident memory in bytes (``memory.stat``'s ``anon`` + ``file_mapped``, what RSS counts;
        None where the memory controller is not enabled for hive's cgroups) and its CPU time in
        µs (``cpu.stat``'s ``usage_usec``, children that ended included). A few small reads, no
        scan of the process table. None when the cgroup is gone."""
        path = self.path(worker_id)
        try:
            with open(path / "cpu.stat", "rb") as file:
                cpu = int(file.readline().split()[1])  # the first line is usage_usec
        except (OSError, ValueError, IndexError):
            return None
        try:  # the worker's own cgroup (hive does not delegate, so an engine makes none below)
            with open(path / "cgroup.procs", "rb") as file:
                pids = {int(pid) for pid in file.read().split()}
        except (OSError, ValueError):
            return None
        return pids, _resident(path), cpu

    def kill(self, worker_id: str) -> None:
        path = self.path(worker_id)
        try:
            (path / "cgroup.kill").write_text("1")
        except FileNotFoundError:
            if path.exists():  # a kernel before 5.14: no cgroup.kill
                for pid in self.members(worker_id):
                    _pidfd_kill(pid, signal.SIGKILL)
        except OSError as exc:
            log.warning("cgroup.kill of %s: %s", path, exc.strerror)

    def empty(self, worker_id: str) -> bool:
        try:
            events = (self.path(worker_id) / "cgroup.events").read_text()
        except FileNotFoundError:
            return True
        except OSError:
            return not self.members(worker_id)
        return "populated 0" in events.splitlines()

    def release(self, worker_id: str) -> None:
        _remove_tree(self.path(worker_id))

    def oom_kills(self, worker_id: str) -> int | None:
        """``memory.events``' ``oom_kill``: the worker's processes the OOM killer ended so far
        (None without the memory controller)."""
        try:
            with open(self.path(worker_id) / "memory.events", "rb") as file:
                for line in file:
                    if line.startswith(b"oom_kill "):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return None

    def inventory(self) -> dict[str, set[int]]:
        """Every worker cgroup and its processes, and every tagged process of this hive that
        is in none (hive died between spawning it and moving it into its cgroup)."""
        found: dict[str, set[int]] = {}
        with contextlib.suppress(OSError):
            for child in self.base.iterdir():
                if child.is_dir() and child.name.startswith(_PREFIX):
                    found[child.name.removeprefix(_PREFIX)] = _procs(child)
        for tag in _tagged(self.instance):
            found.setdefault(tag.worker_id, set()).add(tag.pid)
        return found

    def owner_of(self, pid: int) -> str | None:
        """The worker whose cgroup holds ``pid`` (or, before it was moved there, whose tag it
        carries); None for any other process."""
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            text = ""
        for line in text.splitlines():
            if line.startswith("0::"):
                path = self.mount / line[3:].lstrip("/")
                with contextlib.suppress(ValueError, IndexError):
                    first = path.relative_to(self.base).parts[0]
                    if first.startswith(_PREFIX):
                        return first.removeprefix(_PREFIX)
        tag = read_tag(pid)
        return tag.worker_id if tag is not None and tag.instance == self.instance else None

    def close(self) -> None:
        """At a clean exit: remove the empty worker cgroups, and the base if hive made it."""
        for worker_id, pids in self.inventory().items():
            if not pids:
                self.release(worker_id)
        if self.base.name == f"hive.{self.instance}":
            with contextlib.suppress(OSError):
                self.base.rmdir()


def choose(mode: Literal["auto", "cgroup", "tags"], state_dir: Path) -> tuple[Containment, str]:
    """The containment this host allows, and a sentence for hive's log.

    Raises RuntimeError when ``mode`` is ``cgroup`` and no writable cgroup v2 is there.
    """
    instance = instance_of(state_dir)
    if mode in ("auto", "cgroup"):
        cgroups, why = Cgroups.discover(instance)
        if cgroups is not None:
            return cgroups, f"containment: {why}"
        if mode == "cgroup":
            raise RuntimeError(f"containment = 'cgroup', but {why}")
        return Tags(instance), f"containment: tags and subreaper ({why})"
    return Tags(instance), "containment: tags and subreaper (containment = 'tags')"


def _cgroup2_mount() -> Path | None:
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, sep, right = line.partition(" - ")
        if sep and right.split(" ", 1)[0] == "cgroup2":
            return Path(left.split(" ")[4])
    return None


def _own_cgroup() -> str | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return line[3:] or "/"
    return None


def _resident(path: Path) -> int | None:
    """``anon`` + ``file_mapped`` of a cgroup's ``memory.stat``; None without that file."""
    try:
        with open(path / "memory.stat", "rb") as file:
            return sum(
                int(line.split()[1])
                for line in file
                if line.startswith((b"anon ", b"file_mapped "))
            )
    except (OSError, ValueError, IndexError):
        return None


def _procs(path: Path) -> set[int]:
    """The pids in the cgroup at ``path`` and every cgroup below it."""
    found: set[int] = set()
    try:
        for directory, _subdirs, _files in os.walk(path):
            with contextlib.suppress(OSError):
                text = (Path(directory) / "cgroup.procs").read_text()
                found.update(int(pid) for pid in text.split())
    except OSError:
        pass
    return found


def _remove_tree(path: Path) -> None:
    """rmdir a cgroup and the ones below it (an empty cgroup is removed by rmdir alone)."""
    for directory, _subdirs, _files in sorted(os.walk(path), key=lambda w: -len(w[0])):
        try:
            os.rmdir(directory)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EBUSY):
                log.warning("cannot remove cgroup %s: %s", directory, exc.strerror)


def _pidfd_kill(pid: int, sig: int, instance: str | None = None) -> None:
    """Signal ``pid`` through a pidfd; with ``instance``, only if it still carries this hive's
    tag once the pidfd holds it (the pid cannot be recycled after that, but might have been
    before: a busy host reuses pids within seconds)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if instance is not None:
            tag = read_tag(pid)
            if tag is None or tag.instance != instance:
                return  # not ours (any more): never signalled
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] in (b"Z", b"X")


@dataclass(frozen=True, slots=True)
class Group:
    """One worker's processes as its containment sees them."""

    containment: Containment
    worker_id: str

    def members(self) -> set[int]:
        return self.containment.members(self.worker_id)

    def kill(self) -> None:
        self.containment.kill(self.worker_id)

    def empty(self) -> bool:
        return self.containment.empty(self.worker_id)


def end_strays(containment: Containment, worker_id: str, pids: set[int] | frozenset[int]) -> None:
    """SIGKILL processes of a worker that nothing watches; its whole cgroup when it has one
    and no live record needs it (the caller decides that)."""
    members = containment.members(worker_id)
    if members and members <= set(pids):
        containment.kill(worker_id)
    for pid in pids:
        _pidfd_kill(pid, signal.SIGKILL, containment.instance)

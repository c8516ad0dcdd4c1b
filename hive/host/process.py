"""The OS level of running a worker: start it, notice its exit, end its whole tree.

Policy lives in the supervisor; this module only does what it is told, the Linux way:

- fork and exec (subprocess's ``vfork``) with ``setsid``: no shell, each worker leads its own
  session and process group, in a directory of its own (never hive's: a ``hive`` folder there
  would be imported in hive's place), stdin is /dev/null and stdout/stderr are the worker's log
  file (a file, not a pipe, so a worker outlives a crash of hive without a broken pipe).
- CPU affinity is a property of the spawning *thread* and is inherited at clone, so the spawner
  thread takes the worker's affinity just before the spawn: it is in force before the worker's
  first instruction and every thread the worker starts inherits it.
- Exit is noticed through a pidfd registered with the event loop, the moment it happens, with no
  polling; hive's own children are then reaped with ``waitpid`` for their exit status.
- A stop signals the process group and every process found in the worker's session or tree, each
  through a pidfd so that a recycled pid is never signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from hive.host.descriptors import in_reserve, kept_back, said_plainly, wait_gone

if TYPE_CHECKING:
    from hive.host.containment import Group


@dataclass(frozen=True, slots=True)
class Launch:
    """Everything needed to start one worker process."""

    argv: list[str]
    env: dict[str, str]
    log_path: Path
    cpus: frozenset[int] | None = None
    #: Run as this user and group (hive must be root); None: as hive itself.
    user: str | None = None
    group: str | None = None
    #: The directory it starts in (made when missing); None: hive's own.
    cwd: Path | None = None


def describe_exit(returncode: int | None) -> str:
    """``exited with code 3``, ``killed by signal 9 (SIGKILL)``, or that the code is unknown."""
    if returncode is None:
        return "exited (exit status unknown: not hive's child)"
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = "unknown"
    return f"killed by signal {-returncode} ({name})"


def start_time(pid: int) -> float | None:
    """The process's start time (seconds since the epoch), to tell it from a recycled pid."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


class Spawner:
    """Starts processes from one dedicated thread, whose affinity each spawn borrows."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hive-spawn")
        self._own_affinity = frozenset(os.sched_getaffinity(0))
        self._lock = threading.Lock()

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    async def start(self, launch: Launch, spawned: Callable[[int], None] | None = None) -> Process:
        """Start the process; raises OSError (for example FileNotFoundError) if it cannot,
        and KeyError for a ``user`` or ``group`` this host does not have.

        ``spawned(pid)`` runs on the spawning thread the moment the process exists (to move
        it into its cgroup before it can fork); if it raises, the process is killed and the
        error raised here.
        """
        loop = asyncio.get_running_loop()
        pid, pidfd, popen = await loop.run_in_executor(self._executor, self._spawn, launch, spawned)
        process = Process(pid, pidfd, child=True)
        process.popen = popen
        return process

    def _spawn(
        self, launch: Launch, spawned: Callable[[int], None] | None
    ) -> tuple[int, int, subprocess.Popen[bytes] | None]:
        """Spawn and hold it by a pidfd at once: one hive cannot watch is killed, not left."""
        try:
            pid, popen = self._fork_exec(launch)
        except OSError as exc:
            raise said_plainly(exc) from None
        try:
            pidfd = os.pidfd_open(pid)
            if in_reserve(pidfd):  # a worker for life: not on one of hive's last descriptors
                os.close(pidfd)
                raise kept_back()
            if spawned is not None:
                try:
                    spawned(pid)
                except BaseException:
                    os.close(pidfd)
                    raise
        except BaseException as exc:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            if popen is not None:
                popen.returncode = -signal.SIGKILL
            if isinstance(exc, OSError):
                raise said_plainly(exc) from None
            raise
        return pid, pidfd, popen

    def _fork_exec(self, launch: Launch) -> tuple[int, subprocess.Popen[bytes]]:
        """Fork and exec (subprocess's vfork; posix_spawn can neither change directory nor
        user), in the launch's directory (made when missing; ``/`` without one), as its user.
        Signals hive ignores (SIGPIPE, SIGXFSZ) are the default again in the child."""
        if launch.user is not None:
            try:
                pwd.getpwnam(launch.user)
            except KeyError:
                raise KeyError(f"user {launch.user!r}") from None
        if launch.group is not None:
            try:
                grp.getgrnam(launch.group)
            except KeyError:
                raise KeyError(f"group {launch.group!r}") from None
        if launch.cwd is not None:
            try:
                launch.cwd.mkdir(mode=0o750, parents=True, exist_ok=True)
            except OSError as exc:
                why = f"cannot make its directory {launch.cwd}: {exc.strerror or exc}"
                raise OSError(exc.errno, why) from None
        log = os.open(launch.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            with self._lock:
                if launch.cpus is not None:
                    os.sched_setaffinity(0, launch.cpus)
                try:
                    popen = subprocess.Popen(
                        launch.argv,
                        env=launch.env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        cwd=launch.cwd or "/",
                        start_new_session=True,
                        user=launch.user,
                        group=launch.group,
                        extra_groups=[] if launch.user is not None else None,
                    )
                finally:
                    if launch.cpus is not None:
                        os.sched_setaffinity(0, self._own_affinity)
        finally:
            os.close(log)
        return popen.pid, popen


class Process:
    """A running process watched through a pidfd; ``exited`` resolves when it is gone.

    For hive's own children the result is the return code (negative: killed by that signal);
    for a process hive did not start (adopted) it is None, because only the parent may know.
    """

    def __init__(self, pid: int, pidfd: int, child: bool) -> None:
        self.pid = pid
        self.child = child
        self.returncode: int | None = None
        #: ``time.monotonic()`` when the exit was noticed (the pidfd turned readable).
        self.exited_at: float | None = None
        self._pidfd: int | None = pidfd
        #: When started through subprocess (to change user): kept so that subprocess never
        #: reaps it behind hive's back, and told the exit code once hive has reaped it.
        self.popen: subprocess.Popen[bytes] | None = None
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int | None] = self._loop.create_future()
        self._loop.add_reader(pidfd, self._on_exit)

    @classmethod
    def watch(cls, pid: int, *, child: bool) -> Process:
        """Watch ``pid``; raises ProcessLookupError if it is already gone and reaped."""
        pidfd = os.pidfd_open(pid)
        return cls(pid, pidfd, child)

    @property
    def running(self) -> bool:
        return not self.exited.done()

    def _on_exit(self) -> None:
        noticed = time.monotonic()
        if self.child:
            status: int | None
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: the status is lost
                status = None
            else:
                if pid == 0:  # not exited after all
                    return
            self.returncode = os.waitstatus_to_exitcode(status) if status is not None else None
            if self.popen is not None:
                self.popen.returncode = self.returncode if self.returncode is not None else -1
                self.popen = None
        self.exited_at = noticed
        self._close()
        if not self.exited.done():
            self.exited.set_result(self.returncode)

    def _close(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def signal(self, sig: int) -> None:
        """Signal the process itself, never a recycled pid."""
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def signal_group(self, sig: int) -> None:
        """Signal the worker's process group, while the leader is unreaped (so the id is ours)."""
        # The group id is the leader's pid (it called setsid) and cannot be reused while the
        # leader lives: for our unreaped child that is certain, for an adopted one while the
        # pidfd still says it runs.
        if self._pidfd is not None and (self.child or self.running):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
        else:
            self.signal(sig)

    def detach(self) -> None:
        """Stop watching without touching the process (hive exits and leaves it running)."""
        self._close()
        if not self.exited.done():
            self.exited.cancel()


@dataclass(slots=True)
class _Member:
    pid: int
    #: None when hive had no descriptor left for one: then signalled by pid, watched by polling.
    pidfd: int | None
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    poll: asyncio.Task[None] | None = None


class Tree:
    """The processes that belong to a worker: its session, its group, its descendants, and
    whatever its containment (cgroup or environment tag) says is its own.

    Each member is held through a pidfd from the moment it is found, so a signal can never
    reach a process that merely inherited a recycled pid.
    """

    def __init__(self, leader: Process, group: Group | None = None) -> None:
        self.leader = leader
        self.group = group
        self._members: dict[int, _Member] = {}
        self._loop = asyncio.get_running_loop()

    async def scan(self) -> None:
        """Find members: descendants of the leader, processes in its session or group, and
        the members of its containment. The search reads the whole process table, so it runs
        off the loop: a worker's exit never holds up what the loop has to tell (the ``failed``
        event, the routers) while hundreds of others run."""
        found = await asyncio.to_thread(self._discover)
        for pid in found - self._members.keys() - {self.leader.pid, os.getpid()}:
            self._adopt(pid)

    def _discover(self) -> set[int]:
        """What can be read of the tree now (out of descriptors, nothing: see :meth:`signal`)."""
        try:
            return self._search()
        except (OSError, psutil.Error):
            return set()

    def _search(self) -> set[int]:
        if self.group is not None and self.group.containment.kind == "cgroup":
            # Everything the worker started since it entered its cgroup is in it, wherever it
            # moved in the process tree; the group adds anything tagged that got out first.
            return self.group.members()
        known = set(self._members)
        found: set[int] = set()
        with contextlib.suppress(psutil.NoSuchProcess):
            found.update(p.pid for p in psutil.Process(self.leader.pid).children(recursive=True))
        for pid in psutil.pids():
            if pid == self.leader.pid or pid in known:
                continue
            with contextlib.suppress(OSError):
                if os.getsid(pid) == self.leader.pid or os.getpgid(pid) == self.leader.pid:
                    found.add(pid)
        if self.group is not None:
            found.update(self.group.members())
        return found

    def _adopt(self, pid: int) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        except OSError:  # no descriptor left: held by its pid (a narrow chance of reuse)
            member = self._members[pid] = _Member(pid, None)
            member.poll = asyncio.create_task(wait_gone(pid))
            member.poll.add_done_callback(lambda _: member.gone.set())
            return
        member = _Member(pid, pidfd)
        self._members[pid] = member

        def on_exit() -> None:
            self._loop.remove_reader(pidfd)
            member.gone.set()

        self._loop.add_reader(pidfd, on_exit)

    def signal(self, sig: int) -> None:
        """Signal every process of the tree; SIGTERM comes with SIGCONT, so that a stopped
        (SIGSTOPped) process can act on it."""
        sigs = (sig, signal.SIGCONT) if sig == signal.SIGTERM else (sig,)
        for one in sigs:
            self.leader.signal_group(one)
            if not self._leader_leads_group():
                # Signalled once only: a second SIGTERM that lands after the worker's own
                # handler is gone (it is on its way out) would turn a clean exit into
                # "killed by SIGTERM".
                self.leader.signal(one)
            for member in self._members.values():
                if not member.gone.is_set():
                    with contextlib.suppress(ProcessLookupError):
                        if member.pidfd is None:
                            os.kill(member.pid, one)
                        else:
                            signal.pidfd_send_signal(member.pidfd, one)

    def kill(self) -> None:
        """SIGKILL everything, through the containment first (it sees what a scan missed)."""
        if self.group is not None:
            with contextlib.suppress(OSError):  # out of descriptors: the signals below still go
                self.group.kill()
        self.signal(signal.SIGKILL)

    async def wait(self, timeout: float) -> bool:
        """Wait until the leader, every member and the containment are empty; False if time
        ran out."""
        deadline = time.monotonic() + timeout
        waits: list[asyncio.Future[object]] = [asyncio.shield(self.leader.exited)]
        waits += [asyncio.ensure_future(m.gone.wait()) for m in self._members.values()]
        _, pending = await asyncio.wait(waits, timeout=timeout)
        for future in pending:
            future.cancel()
        if pending:
            return False
        while self.group is not None and not self._group_empty():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def _group_empty(self) -> bool:
        assert self.group is not None
        try:
            return self.group.empty()
        except OSError:  # cannot be read now (out of descriptors): not known to be empty
            return False

    def _leader_leads_group(self) -> bool:
        """True when the leader is still in its own process group (the group signal hit it)."""
        if not self.leader.running:
            return False
        try:
            return os.getpgid(self.leader.pid) == self.leader.pid
        except OSError:
            return False

    def alive(self) -> list[int]:
        pids = [self.leader.pid] if self.leader.running else []
        return pids + [m.pid for m in self._members.values() if not m.gone.is_set()]

    def close(self) -> None:
        for member in self._members.values():
            if member.pidfd is None:
                if member.poll is not None:
                    member.poll.cancel()
                continue
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(member.pidfd)
            with contextlib.suppress(OSError):
                os.close(member.pidfd)
        self._members.clear()


async def terminate(
    process: Process, timeout: float, kill_timeout: float = 5.0, group: Group | None = None
) -> bool:
    """SIGTERM the worker's whole tree, SIGKILL whatever is left after ``timeout``.

    Returns True when every process of the tree is gone (and its containment is empty).
    """
    tree = Tree(process, group)
    try:
        await tree.scan()
        tree.signal(signal.SIGTERM)
        if await tree.wait(timeout):
            await tree.scan()  # a child may have been forked between the scan and the signal
            if not tree.alive():
                return True
        await tree.scan()
        tree.kill()
        return await tree.wait(kill_timeout)
    finally:
        tree.close()


def zombie_children() -> set[int]:
    """hive's own children that have exited and wait to be reaped."""
    found = set()
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                if child.status() == psutil.STATUS_ZOMBIE:
                    found.add(child.pid)
    return found


def reap_orphans(leaders: Iterable[int]) -> None:
    """Reap hive's exited children other than ``leaders`` (whose exit their watcher reaps)."""
    for pid in zombie_children() - set(leaders):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)

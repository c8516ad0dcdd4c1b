"""Why an attempt ended, in one line: "out of memory" when the host says so, and the line of the
worker's log that says why, not the noise a dying engine prints last.

A worker the kernel's OOM killer ended shows only "killed by signal 9"; an engine whose child
was the OOM killer's pick (vLLM's EngineCore) exits with code 0 or 1. The host knows better:

- the worker's cgroup counts the kills in ``memory.events`` (``oom_kill``): read when the
  attempt starts and when it ends, a rise means the OOM killer ended a process of the worker;
- elsewhere (no cgroup, or no memory controller for it), the kernel log (``/dev/kmsg``, when
  hive may read it) names the pid it killed: a leader killed by SIGKILL is looked for there.

The line quoted is the last that looks like an error (``ValueError: ...``, ``CUDA error``,
``ERROR ...``, ``out of memory``) in the last :data:`WINDOW` bytes of the log, passing over
boilerplate that engines print after the error (``See https://...``, ``For further information
visit https://...``, a bare URL, traceback carets); else the last line that is not
boilerplate. Everything here reads files: call it from a thread (``asyncio.to_thread``); every
read is bounded in bytes.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hive.host.process import describe_exit
from hive.models import MARKER

#: Bytes of the log's end that are searched for the line that says why.
WINDOW = 64 * 1024
#: A quoted line is cut to this many characters.
LINE_MAX = 500
#: Bytes of the kernel log read at most, and how far (seconds) its clock may be off hive's.
_KMSG_MAX = 8 * 1024 * 1024
_KMSG_SLACK = 60.0

_NOISE = re.compile(
    r"^\W*https?://\S+\W*$"  # a bare URL
    r"|^(See|Visit|For (further|more) information|More information)\b"
    r"|^Traceback \(most recent call last\)"
    r"|^(The above exception was the direct cause|During handling of the above exception)"
    r"|^[\s^~]+$",  # traceback carets
    re.IGNORECASE,
)
_ERRORISH = re.compile(
    r"(Error|Exception)\b|\berror\b|\bfatal\b|\bpanic\b|\bcritical\b|out of memory|\bOOM\b"
    r"|segmentation fault|core dumped|\baborted\b|died unexpectedly|\bfailed\b",
    re.IGNORECASE,
)
#: A log record at a calm level is no error, whatever words it uses.
_CALM = re.compile(r"\b(DEBUG|INFO|NOTICE|WARNING|WARN)\b")
_KILLED = re.compile(rb"Killed process (\d+) \(([^)]*)\)")
_OOM_KILL = re.compile(rb"oom-kill:.*?\btask=([^,]*),pid=(\d+)")


def pick_line(text: str) -> str | None:
    """The line of a log's end that best says why the worker ended (see the module)."""
    lines = []
    for raw in text.splitlines():
        line = raw.split(MARKER, 1)[0].strip()  # hive's own lines, even glued onto another
        if line and not _NOISE.search(line):
            lines.append(line)
    for line in reversed(lines):
        if _ERRORISH.search(line) and not _CALM.search(line):
            return line[:LINE_MAX]
    return lines[-1][:LINE_MAX] if lines else None


def read_tail(path: Path, window: int = WINDOW) -> str:
    """The last ``window`` bytes of the log at ``path``, reaching into its rotated part
    (``<path>.1``) when the log holds less; from a line's start. "" for what is not a regular
    file (never blocks on a FIFO)."""
    data = _tail_bytes(path, window)
    if len(data) < window:
        data = _tail_bytes(path.with_name(path.name + ".1"), window - len(data)) + data
    return data.decode(errors="replace")


def _tail_bytes(path: Path, window: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or window <= 0:
            return b""
        start = max(0, info.st_size - window)
        data = os.pread(fd, window, start)
    except OSError:
        return b""
    finally:
        os.close(fd)
    if start > 0:  # the window began inside a line: not a line of its own
        data = data[data.find(b"\n") + 1 :] if b"\n" in data else b""
    return data


def oom_from_cgroup(before: int | None, after: int | None) -> str | None:
    """What ``memory.events``' ``oom_kill`` says happened between the attempt's start and end."""
    if before is None or after is None or after <= before:
        return None
    kills = after - before
    return f"the kernel's OOM killer ended {kills} process{'es' if kills > 1 else ''} of its cgroup"


def oom_from_kernel_log(pid: int, since: float, kmsg: str = "/dev/kmsg") -> str | None:
    """What the kernel log says, when hive may read it: that its OOM killer ended ``pid`` after
    ``since`` (``time.monotonic()``, less a slack: the log's clock is not quite hive's)."""
    try:
        fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    found: str | None = None
    earliest = (since - _KMSG_SLACK) * 1_000_000
    want = str(pid).encode()
    read = 0
    try:
        while read < _KMSG_MAX:
            try:
                record = os.read(fd, 16384)
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten while read: go on with the next
                    continue
                break  # EAGAIN: no more records (or the log cannot be read)
            if not record:
                break
            read += len(record)
            head, _, message = record.partition(b";")
            fields = head.split(b",")
            if len(fields) < 3 or not fields[2].isdigit() or int(fields[2]) < earliest:
                continue
            if (match := _KILLED.search(message)) and match.group(1) == want:
                found = f"the kernel's OOM killer ended its pid {pid} ({match.group(2).decode()})"
            elif (match := _OOM_KILL.search(message)) and match.group(2) == want:
                found = f"the kernel's OOM killer ended its pid {pid} ({match.group(1).decode()})"
    finally:
        os.close(fd)
    return found


@dataclass(frozen=True, slots=True)
class Attempt:
    """What hive knew of an attempt when it started it."""

    pid: int
    #: ``time.monotonic()`` at the start.
    started: float
    #: Its cgroup's ``oom_kill`` count then (None: no cgroup, or no memory controller).
    oom_kills: int | None


def explain(
    attempt: Attempt | None,
    code: int | None,
    log: Path,
    oom_kills_now: Callable[[], int | None],
) -> tuple[str | None, str | None]:
    """Why ``attempt`` (None: one hive did not start, but adopted) ended with ``code``: what
    the host says of memory (None: nothing), and the line of the log at ``log`` that says why
    (None: an empty log). Reads files: call it from a thread."""
    oom = None
    if attempt is not None:
        oom = oom_from_cgroup(attempt.oom_kills, oom_kills_now())
        if oom is None and code == -signal.SIGKILL:
            oom = oom_from_kernel_log(attempt.pid, attempt.started)
    return oom, pick_line(read_tail(log))


def error_of_exit(code: int | None, wanted: bool, oom: str | None, last: str | None) -> str:
    """The record's ``error`` for a process that ended on its own with ``code``: ``exited with
    code 3: <line>``, ``killed by signal 9 (SIGKILL) (its last output: <line>)`` (a killed
    worker's last line is what it said last, not why it died), ``exited with code 0 while it
    was wanted running: <line>``, each after ``out of memory (<what the host says>); `` when
    the host says so."""
    ended = describe_exit(code)
    if code == 0 and wanted:
        ended += " while it was wanted running"
    if code is not None and code < 0:
        error = ended + (f" (its last output: {last})" if last else "")
    else:
        error = ended + (f": {last}" if last else "")
    return error if oom is None else f"out of memory ({oom}); {error}"

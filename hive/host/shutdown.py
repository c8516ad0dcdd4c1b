"""Whether the host itself is shutting down, asked once when hive gets SIGTERM.

A ``systemctl restart hive`` and a reboot both send hive SIGTERM; only a reboot (poweroff,
halt, kexec) ends the workers too, with systemd's last SIGTERM and SIGKILL to what
is left. systemd's manager says which: its ``SystemState`` is ``stopping`` exactly while the
shutdown target's job is queued or running, which a reboot queues before it stops the first
service, and a restart of one unit never does. ``systemctl is-system-running`` prints it
(over the system bus, which the unit's ``After=dbus.service`` keeps up until hive has stopped).
The files under ``/run`` are no such answer: ``/run/nologin`` and
``/run/systemd/shutdown/scheduled`` appear minutes before a scheduled shutdown (a restart of
hive meanwhile is not one), and need not be there for an immediate one.

The command is ``shutdown_check`` in the configuration (tests name one that prints what they
need). Anything but ``stopping`` on its first line, or no answer within 5 s, is not a shutdown:
hive does what ``on_exit`` says.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Sequence

#: What systemd's manager state is while the host shuts down.
STOPPING = "stopping"
#: Seconds the check may take.
TIMEOUT = 5.0


def _ask(argv: Sequence[str]) -> str:
    """The first line ``argv`` prints (at most 200 characters), or why there is none."""
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"no answer within {TIMEOUT:g}s"
    except OSError as exc:
        return f"cannot run it: {exc.strerror or exc}"
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    return lines[0][:200] if lines else f"nothing (exit code {done.returncode})"


async def host_shutting_down(argv: Sequence[str]) -> tuple[bool, str]:
    """Whether ``argv`` (``systemctl is-system-running``) says the host is shutting down, and
    what it answered. Run in a thread: hive's loop goes on meanwhile."""
    answer = await asyncio.to_thread(_ask, argv)
    return answer == STOPPING, answer


async def stop_for_shutdown(on_exit: str, check: Sequence[str]) -> tuple[bool, str]:
    """Whether a hive that detaches (``on_exit``) stops its workers all the same, the host
    shutting down; and what its log line says of it."""
    if on_exit != "detach" or not check:
        return False, ""
    down, answer = await host_shutting_down(check)
    if down:
        return True, (
            "; the host is shutting down: every worker is withdrawn from the routers and "
            "stopped, and started again at boot as its restart policy says"
        )
    return False, f"; not a host shutdown ({' '.join(check)}: {answer})"

"""A worker that tries to read hive's whole API over the unix socket, as hive's own user (or
root) may: two probes, each with an empty environment (no tag) and, where it can, moved out of
the worker's cgroup into the root cgroup, ask for ``GET /v1/workers``:

- ``child``: a child of the worker's process;
- ``orphan``: double-forked and ``setsid()``, so that it re-parents away from the worker (to hive
  when hive is the child subreaper, else to init).

Each waits for ``$ROGUE_DIR/<id>/go`` (written by the test once the worker is ready), then
writes ``$ROGUE_DIR/<id>/<name>.json``: the status hive answered, its cgroup and its
environment's size. The worker itself then runs the demo worker. Run as
``rogue_worker.py --probe NAME SOCKET DIR``.
"""

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path


def probe(name: str, path: str, out: Path) -> None:
    leave_cgroup()
    deadline = time.monotonic() + 60
    while not (out / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(b"GET /v1/workers HTTP/1.1\r\nHost: hive\r\nConnection: close\r\n\r\n")
            head = sock.recv(64).decode(errors="replace")
        status = int(head.split()[1])
    except (OSError, ValueError, IndexError) as exc:
        status = -1
        head = str(exc)
    report = {
        "status": status,
        "cgroup": Path("/proc/self/cgroup").read_text(),
        "environ": len(Path("/proc/self/environ").read_bytes()),
        "ppid": os.getppid(),
    }
    (out / f"{name}.tmp").write_text(json.dumps(report))
    (out / f"{name}.tmp").rename(out / f"{name}.json")


def leave_cgroup() -> None:
    """Into the root of the cgroup v2 tree, if this process is in one and may move."""
    mount = next(
        (line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
         if line.split()[2] == "cgroup2"),
        None,
    )  # fmt: skip
    if mount is None:
        return
    with contextlib.suppress(OSError):
        (Path(mount) / "cgroup.procs").write_text(str(os.getpid()))


def spawn_probe(name: str, path: str, out: str) -> None:
    os.execve(sys.executable, [sys.executable, __file__, "--probe", name, path, out], {})


if sys.argv[1:2] == ["--probe"]:
    probe(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
    sys.exit(0)

sock = os.environ["ROGUE_SOCKET"]
out = str(Path(os.environ["ROGUE_DIR"]) / os.environ["HIVE_WORKER_ID"])
if os.fork() == 0:
    spawn_probe("child", sock, out)
middle = os.fork()
if middle == 0:
    os.setsid()
    if os.fork() == 0:
        spawn_probe("orphan", sock, out)
    os._exit(0)
os.waitpid(middle, 0)
os.execv(sys.executable, [sys.executable, "-m", "hive.demo_worker", *sys.argv[1:]])

"""A worker whose grandchild re-parents away from it, then calls hive's unix socket as the
worker's user (or root) may: double-forked and ``setsid()``, its parent gone, it is no
descendant of any process hive started. It stays in the worker's cgroup; with
``ORPHAN_ENV=clear`` it drops its environment (and so hive's tag), with ``keep`` it keeps it.

It waits until it has re-parented and ``$ORPHAN_DIR/<id>/go`` exists (the test writes it once
the worker is ready), asks for ``GET /v1/workers``, sends its worker's heartbeat, and asks for
``GET /v1/workers`` again on a connection made by a child that exited (and was reaped) before
the request went, then writes ``$ORPHAN_DIR/<id>/orphan.json``: the three statuses, its
parent, cgroup and environment's size, and exits. The worker itself then runs the demo worker.
Run as ``orphaning_worker.py --orphan SOCKET DIR WORKER_ID MIDDLE_PID``.
"""

import json
import os
import socket
import sys
import time
from pathlib import Path

LIST = b"GET /v1/workers HTTP/1.1\r\nHost: hive\r\nConnection: close\r\n\r\n"


def call(path: str, request: bytes) -> int:
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
            return send(sock, request)
    except OSError:
        return -1


def send(sock: socket.socket, request: bytes) -> int:
    try:
        sock.settimeout(10)
        sock.sendall(request)
        head = sock.recv(64).decode(errors="replace")
        return int(head.split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def handed_off(path: str, request: bytes) -> int:
    """The status hive answers on a connection whose maker is gone when the request is sent:
    a child connects, hands the socket over and exits, and is reaped, so the pid that the
    kernel gives hive for the connection names no process."""
    ours, theirs = socket.socketpair()
    connector = os.fork()
    if connector == 0:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
            socket.send_fds(theirs, [b"x"], [sock.fileno()])
        os._exit(0)
    _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    os.waitpid(connector, 0)
    ours.close()
    theirs.close()
    with socket.socket(fileno=fds[0]) as sock:
        return send(sock, request)


def orphan(path: str, out: Path, worker_id: str, middle: int) -> None:
    deadline = time.monotonic() + 60
    while (os.getppid() == middle or not (out / "go").exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    listed = call(path, LIST)
    body = b'{"state": "ready", "in_flight": 0}'
    heartbeat = call(
        path,
        f"POST /v1/workers/{worker_id}/heartbeat HTTP/1.1\r\nHost: hive\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + body,
    )
    report = {
        "list": listed,
        "handed_off": handed_off(path, LIST),
        "heartbeat": heartbeat,
        "ppid": os.getppid(),
        "middle": middle,
        "cgroup": Path("/proc/self/cgroup").read_text(),
        "environ": len(Path("/proc/self/environ").read_bytes()),
    }
    (out / "orphan.tmp").write_text(json.dumps(report))
    (out / "orphan.tmp").rename(out / "orphan.json")


if sys.argv[1:2] == ["--orphan"]:
    orphan(sys.argv[2], Path(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    sys.exit(0)

sock = os.environ["ORPHAN_SOCKET"]
worker = os.environ["HIVE_WORKER_ID"]
out = str(Path(os.environ["ORPHAN_DIR"]) / worker)
env = {} if os.environ.get("ORPHAN_ENV") == "clear" else dict(os.environ)
middle = os.fork()
if middle == 0:
    os.setsid()
    argv = [sys.executable, __file__, "--orphan", sock, out, worker, str(os.getpid())]
    if os.fork() == 0:
        os.execve(sys.executable, argv, env)
    os._exit(0)
os.waitpid(middle, 0)
os.execv(sys.executable, [sys.executable, "-m", "hive.demo_worker", *sys.argv[1:]])

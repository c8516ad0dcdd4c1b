"""A process that is not a worker, listening on a worker's port: ``foreign_listener.py PORT``.

A plain socket server on 127.0.0.1 that answers every HTTP request ``200 {"status": "ok"}``, as a
healthy engine would, so that a readiness probe that reaches it passes. It prints ``listening``
once it listens, counts the requests it answered on stdout (``answered N``), and runs until
killed.
"""

from __future__ import annotations

import socket
import sys
import threading

BODY = b'{"status": "ok"}'
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
ANSWER = HEAD % len(BODY) + BODY
answered = 0
lock = threading.Lock()


def serve(conn: socket.socket) -> None:
    global answered
    with conn:
        pending = b""
        while True:
            while b"\r\n\r\n" not in pending:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                pending += chunk
            _, _, pending = pending.partition(b"\r\n\r\n")
            conn.sendall(ANSWER)
            with lock:
                answered += 1
                print(f"answered {answered}", flush=True)


def main() -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", int(sys.argv[1])))
    server.listen()
    print("listening", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()

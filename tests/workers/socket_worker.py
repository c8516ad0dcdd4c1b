"""A worker that tries to drive hive's whole API through the unix socket (``$PROBE_SOCKET``).

It runs as hive's own user, so the socket's file mode lets it connect. It records what hive
answered to each call in ``$PROBE_RESULTS`` (JSON), then runs the demo worker.
"""

import http.client
import json
import os
import socket
import sys


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("hive")
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


own = os.environ["HIVE_WORKER_ID"]
calls = {
    "list": ("GET", "/v1/workers", None),
    "spawn": ("POST", "/v1/workers", {"model": "m", "id": "spawned-by-a-worker"}),
    "stop_other": ("POST", f"/v1/workers/{os.environ['PROBE_OTHER']}/stop", None),
    "own_heartbeat": ("POST", f"/v1/workers/{own}/heartbeat", {"state": "ready"}),
}
results = {}
for name, (method, path, body) in calls.items():
    connection = UnixConnection(os.environ["PROBE_SOCKET"])
    payload = json.dumps(body).encode() if body is not None else None
    connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    results[name] = [response.status, json.loads(response.read() or b"null")]
    connection.close()
with open(os.environ["PROBE_RESULTS"], "w") as file:
    json.dump(results, file)
os.execv(sys.executable, [sys.executable, "-m", "hive.demo_worker", *sys.argv[1:]])

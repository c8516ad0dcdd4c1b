"""The smallest worker hive can supervise: stdlib only, answers ``GET /health`` with 200, and
``GET /slots`` as an idle llama-server does (one slot, not processing), for hive's load reads.

It speaks HTTP/1.1 and keeps connections alive, as every engine hive runs does (uvicorn,
cpp-httplib, aiohttp), one thread per connection, so hive's kept-alive probe connection does
not hold off anyone else.

``python bench/tiny_worker.py --port P`` (or ``--port-base B --index N`` for port B+N, as
supervisord's ``%(process_num)d`` and circus' ``$(circus.wid)`` give). Used by the scale figure,
where hundreds of demo workers (about 40 MB each) would not fit.
"""

from __future__ import annotations

import argparse
import http.server

ANSWERS = {"/health": b'{"status": "ok"}', "/slots": b'[{"id": 0, "is_processing": false}]'}


class Health(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    #: Headers and body leave in one write (flushed after each request), as an engine's server
    #: sends them: two small writes would wait on the client's delayed ACK (Nagle), 40 ms each.
    wbufsize = -1

    def do_GET(self) -> None:
        body = ANSWERS.get(self.path)
        ok = body is not None
        body = body or b'{"error": "not found"}'
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: hundreds of these share one disk


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int)
    parser.add_argument("--port-base", type=int)
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args()
    port = args.port if args.port is not None else args.port_base + args.index
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Health)
    # A long select timeout: an idle worker wakes for requests only, not twice a second.
    server.serve_forever(poll_interval=3600)


if __name__ == "__main__":
    main()

"""The smallest worker hive can supervise: stdlib only, answers ``GET /health`` with 200.

``python bench/tiny_worker.py --port P`` (or ``--port-base B --index N`` for port B+N, as
supervisord's ``%(process_num)d`` and circus' ``$(circus.wid)`` give). Used by the scale figure,
where hundreds of demo workers (about 40 MB each) would not fit.
"""

from __future__ import annotations

import argparse
import http.server


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.path == "/health"
        body = b'{"status": "ok"}' if ok else b'{"error": "not found"}'
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
    server = http.server.HTTPServer(("127.0.0.1", port), Health)
    # A long select timeout: an idle worker wakes for requests only, not twice a second.
    server.serve_forever(poll_interval=3600)


if __name__ == "__main__":
    main()

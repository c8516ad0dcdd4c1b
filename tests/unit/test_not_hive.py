"""``hive --url`` at something that is not hive (issue 29): one sentence, exit 1, whatever the
server sent, where the CLI printed the page's HTML line by line (or a traceback). The server is
Python's own http.server in a thread, answering HTML as any web server would."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hive.cli.main import main

PAGE = b"<!DOCTYPE html>\n<html>\n<head><title>Welcome</title></head>\n<body>\n<p>hi</p>\n</body>\n"


class NotHive(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/v1/node"):
            self.send_error(404)  # its HTML error page
            return
        body = b'{"hello": "world"}' if self.path.startswith("/v1/events") else PAGE
        self.send_response(200)
        kind = "application/json" if body.startswith(b"{") else "text/html"
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), NotHive)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def one_line(capsys: pytest.CaptureFixture[str], url: str, *argv: str) -> str:
    assert main(["--url", url, "--token", "t", *argv]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_an_html_page_is_not_hive(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert one_line(capsys, url, "list") == (
        f"hive: {url} is not hive: it answered GET /v1/workers with an HTML page (HTTP 200), "
        "where hive answers JSON"
    )


def test_an_html_error_page_is_not_hive(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert one_line(capsys, url, "status") == (
        f"hive: {url} is not hive: it answered GET /v1/node with an HTML page (HTTP 404), "
        "where hive answers JSON"
    )


def test_streams_that_are_not_hive(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert one_line(capsys, url, "events") == (
        f"hive: {url} is not hive: it answered GET /v1/events with application/json "
        "(HTTP 200), where hive answers an event stream"
    )
    assert "is not hive: it answered GET /v1/workers/w/logs with an HTML page (HTTP 200)" in (
        one_line(capsys, url, "logs", "-f", "w")
    )

"""Trust holds (issue 28): what a browser sends on its own grants nothing, a page's session is
random, read-only, revocable; a short token stops start-up; guessing the token is slow.

The status page's credential used to be a cookie, which a browser hands to every port of the
host: a worker's server that the browser opened got it and could read hive's API. Here a client
logs in as the page does, keeps whatever a browser would keep (its cookies) and uses only those,
as a worker that reads cookies would.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import re
from collections.abc import Iterator

import pytest
import requests
from hivetest import Hive, running_hive

from harness.waits import wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def hive() -> Iterator[Hive]:
    with running_hive() as daemon:
        yield daemon


def log_in(hive: Hive, token: str) -> requests.Response:
    return requests.post(
        f"{hive.url}/login", data={"token": token}, allow_redirects=False, timeout=10
    )


def test_what_a_browser_would_send_to_a_worker_grants_nothing(hive: Hive) -> None:
    browser = requests.Session()  # keeps cookies, as a browser does
    right = browser.post(f"{hive.url}/login", data={"token": hive.token}, timeout=10)
    # Whatever the browser kept, a worker it visits gets: those cookies must not read.
    worker = requests.get(f"{hive.url}/v1/workers", cookies=browser.cookies, timeout=10)
    assert worker.status_code == 401, f"cookies {dict(browser.cookies)} read the API"
    assert right.status_code == 200, right.text
    assert right.headers["Cache-Control"] == "no-store"
    session = right.json()["session"]
    assert len(session) >= 40 and session != hive.token
    for name, value in browser.cookies.items():
        assert session not in value and hive.token not in value, name
    # The cookie the earlier page set (an HMAC of the token, the same for the token's life).
    legacy = hmac.new(hive.token.encode(), b"hive status page session", hashlib.sha256)
    forged = {"hive_session": legacy.hexdigest()}
    for path in ("/v1/workers", "/v1/node", "/v1/events"):
        assert requests.get(f"{hive.url}{path}", cookies=forged, timeout=10).status_code == 401
    # The session itself, sent by the page as a header, reads.
    bearer = {"Authorization": f"Bearer {session}"}
    assert requests.get(f"{hive.url}/v1/workers", headers=bearer, timeout=10).status_code == 200


def test_a_session_reads_is_revoked_at_logout_and_each_is_new(hive: Hive) -> None:
    first = log_in(hive, hive.token).json()
    second = log_in(hive, hive.token).json()
    assert first["session"] != second["session"]
    assert 3600 <= first["expires_in"] <= 24 * 3600
    bearer = {"Authorization": f"Bearer {first['session']}"}
    assert requests.get(f"{hive.url}/v1/node", headers=bearer, timeout=10).status_code == 200
    changed = requests.post(
        f"{hive.url}/v1/workers", json={"model": "m"}, headers=bearer, timeout=10
    )
    assert changed.status_code == 403, changed.text
    assert "read" in changed.json()["error"]["message"]
    out = requests.post(f"{hive.url}/logout", headers=bearer, timeout=10)
    assert out.status_code == 204
    assert requests.get(f"{hive.url}/v1/node", headers=bearer, timeout=10).status_code == 401
    other = {"Authorization": f"Bearer {second['session']}"}
    assert requests.get(f"{hive.url}/v1/node", headers=other, timeout=10).status_code == 200


def test_the_only_cookie_a_log_in_sets_is_the_old_ones_expiry(hive: Hive) -> None:
    right = log_in(hive, hive.token)
    for header in right.raw.headers.getlist("Set-Cookie"):
        assert re.match(r'hive_session=(""|);', header), header
        assert "Max-Age=0" in header, header


def test_failed_log_ins_are_limited_per_peer_and_logged_once(hive: Hive) -> None:
    codes = [log_in(hive, f"guess-{i}").status_code for i in range(40)]
    assert codes[0] == 401
    assert 429 in codes, codes
    assert codes.count(401) <= 12, codes  # a burst of 10, and what refilled meanwhile
    limited = log_in(hive, "guess-again")
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) >= 1
    # While limited, even the right token waits on a new connection: a guess cannot be told
    # right from wrong (test_the_right_token_is_held_back_only_where_it_could_be_a_guess).
    assert log_in(hive, hive.token).status_code == 429
    bearer = {"Authorization": "Bearer not-the-token-at-all"}
    assert requests.get(f"{hive.url}/v1/node", headers=bearer, timeout=10).status_code == 429
    # The unix socket is never limited: the local operator gets in.
    listed = hive.cli("list", env={"HIVE_URL": f"unix://{hive.socket}"})
    assert listed.returncode == 0, listed.stderr
    lines = [line for line in hive.log().splitlines() if "failed log-ins or unknown" in line]
    assert len(lines) == 1, lines
    assert "127.0.0.1" in lines[0]
    # Once it slows down, the right token works again.
    wait_for(lambda: log_in(hive, hive.token).status_code == 200, timeout=30, interval=1.0)
    metrics = requests.get(f"{hive.url}/metrics", headers=hive.headers, timeout=10).text
    assert 'hive_auth_failures_total{kind="login"}' in metrics
    assert re.search(r"^hive_auth_refused_total [1-9]", metrics, re.M), metrics


class Connection:
    """One kept-alive TCP connection to hive; a request fails the test if it was re-opened."""

    def __init__(self, hive: Hive) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", hive.port, timeout=10)
        self.conn.connect()
        assert self.conn.sock is not None
        self.local = self.conn.sock.getsockname()

    def get(self, path: str, token: str) -> int:
        self.conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        response = self.conn.getresponse()
        response.read()
        sock = self.conn.sock
        assert sock is not None and sock.getsockname() == self.local, "the connection was closed"
        return response.status

    def close(self) -> None:
        self.conn.close()


def fresh(hive: Hive, token: str) -> int:
    """A request with ``token`` on a connection of its own."""
    bearer = {"Authorization": f"Bearer {token}"}
    return requests.get(f"{hive.url}/v1/node", headers=bearer, timeout=10).status_code


def limit(hive: Hive) -> None:
    """Wrong tokens from this address until one is refused: the address is limited now."""
    wait_for(lambda: fresh(hive, "not-the-token-at-all") == 429, timeout=60, interval=0,
             what="a wrong token refused 429")  # fmt: skip


def test_the_right_token_is_held_back_only_where_it_could_be_a_guess() -> None:
    """On a connection that carried the API token, and with a page's session, a limited
    address's right credentials are served; a new connection's API token still waits, as a
    guess does, and so does a connection's once it sent a wrong one. Each round shows that the
    address was limited when the first two were served: a new connection's right token, asked
    after them, is refused, and a limited address only regains tries (429s take none)."""
    # A hive of its own: the module's hive is limited by other tests; and the kept-alive
    # connection must outlive the guessing.
    with running_hive("http_header_timeout = 120\n") as hive:
        proven = Connection(hive)
        try:
            assert proven.get("/v1/node", hive.token) == 200
            session = log_in(hive, hive.token).json()["session"]
            for _ in range(20):
                limit(hive)
                mine, page = proven.get("/v1/node", hive.token), fresh(hive, session)
                theirs = fresh(hive, hive.token)
                assert (mine, page) == (200, 200), (mine, page, theirs)
                if theirs == 429:
                    break
            assert theirs == 429, "a new connection's right token was never refused"
            for _ in range(20):
                limit(hive)
                wrong = proven.get("/v1/node", "not-the-token-either")
                again = proven.get("/v1/node", hive.token)
                theirs = fresh(hive, hive.token)
                if theirs == 429:
                    break
            assert theirs == 429, "a new connection's right token was never refused"
            # After a wrong credential the connection is a stranger's again: held back.
            assert wrong in (401, 429) and again == 429, (wrong, again)
        finally:
            proven.close()


@pytest.mark.parametrize("content", ["", "short-token\n", "   \n"])
def test_a_short_or_empty_token_file_stops_start_up(content: str) -> None:
    daemon = Hive()
    try:
        daemon.token_file.parent.mkdir(parents=True, exist_ok=True)
        daemon.token_file.write_text(content)
        proc = daemon.launch()
        assert proc.wait(30) == 1
        log = daemon.log()
        assert f"the token file {daemon.token_file}" in log, log
        assert "at least 16" in log and "Traceback" not in log
    finally:
        daemon.cleanup()


def test_a_short_hive_token_stops_start_up() -> None:
    daemon = Hive(env={"HIVE_TOKEN": "abc"})
    try:
        proc = daemon.launch()
        assert proc.wait(30) == 1
        assert "HIVE_TOKEN holds a token of 3 characters" in daemon.log(), daemon.log()
    finally:
        daemon.cleanup()

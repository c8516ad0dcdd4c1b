"""The status page in a real headless Chromium: log in with the token (never in the URL), see
GPUs and workers, watch a spawn and a kill change the page live, read a log tail on click, log
out. The browser holds no cookie that grants anything: the session lives in the tab's
``sessionStorage`` and the page sends it as a bearer header itself.

Set ``HIVE_SCREENSHOT`` to a path to keep the page's screenshot (docs/status-page.png is one).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import requests
from hivetest import TAG, Hive, running_hive

from harness.chromium import Browser, chromium_path
from harness.nvml import FakeGpu, build_fake_nvml, write_config

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed"),
]


@pytest.fixture(scope="module")
def gpu_hive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hive]:
    lib = build_fake_nvml(tmp_path_factory.mktemp("nvml"))
    config = tmp_path_factory.mktemp("nvml-config") / "gpus.conf"
    cores = sorted(os.sched_getaffinity(0))
    write_config(
        config,
        [
            FakeGpu(0, name="NVIDIA H100 80GB HBM3", total_mib=81920, used_mib=0,
                    cpus=str(cores[0])),
            FakeGpu(1, name="NVIDIA H100 80GB HBM3", total_mib=81920, used_mib=0,
                    cpus=str(cores[-1])),
        ],
    )  # fmt: skip
    env = {"LD_LIBRARY_PATH": str(lib), "FAKE_NVML_CONFIG": str(config)}
    with running_hive("device_refresh = 0.2\n", env) as hive:
        yield hive


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    chromium = await Browser(TAG).start()
    try:
        yield chromium
    finally:
        await chromium.close()


def _row(worker_id: str, column: int) -> str:
    """JavaScript: the text of a column of the worker's row, or null."""
    cell = f"document.querySelector('tr[data-id=\"{worker_id}\"]')?.children[{column}]"
    return f"({cell}?.textContent ?? null)"


async def _log_in(browser: Browser, token: str) -> None:
    await browser.evaluate(f"document.getElementById('token').value = {json.dumps(token)}")
    await browser.evaluate("document.getElementById('login-button').click()")


async def test_the_page_logs_in_and_follows_the_workers_live(
    gpu_hive: Hive, browser: Browser
) -> None:
    try:
        await _follow_the_workers(gpu_hive, browser)
    finally:
        await gpu_hive.close_http()


async def _follow_the_workers(hive: Hive, browser: Browser) -> None:
    await browser.goto(f"{hive.url}/")
    await browser.until("!document.getElementById('login').hidden", what="the login form")

    # A wrong token: the page says so, and shows nothing of the host.
    await _log_in(browser, "not-the-token")
    await browser.until(
        "!document.getElementById('login-error').hidden", what="the wrong-token message"
    )
    assert await browser.evaluate("document.getElementById('view').hidden") is True

    await _log_in(browser, hive.token)
    await browser.until("document.body.dataset.ready === 'true'", what="the page, logged in")
    url = await browser.evaluate("location.href")
    assert hive.token not in url and url == f"{hive.url}/"
    assert await browser.evaluate("document.cookie") == ""

    # Everything the browser would send on its own to another port of this host (its
    # cookies) grants nothing; the session is the tab's, sent by the page's script.
    cookies = {
        c["name"]: c["value"] for c in (await browser.send("Network.getAllCookies"))["cookies"]
    }
    listed = requests.get(f"{hive.url}/v1/workers", cookies=cookies, timeout=10)
    assert listed.status_code == 401
    session = await browser.evaluate("sessionStorage.getItem('hive-session')")
    assert session and session != hive.token and session not in str(cookies)
    bearer = {"Authorization": f"Bearer {session}"}
    assert requests.get(f"{hive.url}/v1/workers", headers=bearer, timeout=10).status_code == 200
    refused = requests.post(
        f"{hive.url}/v1/workers", json={"model": "m"}, headers=bearer, timeout=10
    )
    assert refused.status_code == 403  # a session reads, never changes
    gpus = await browser.evaluate("[...document.querySelectorAll('[data-gpu]')].length")
    assert gpus == 2

    # A spawn appears on its own (the event stream), on its GPU.
    worker = await hive.spawn(
        {"model": "demo-gpu", "id": "pg-a", "device": "GPU-0", "restart": "no"}, wait=True
    )
    await browser.until(f"{_row('pg-a', 2)} === 'ready'", what="pg-a ready on the page")
    assert await browser.evaluate(_row("pg-a", 3)) == "GPU-0 (1 GPU)"
    await browser.until(
        "document.querySelector('[data-gpu=\"GPU-0\"]').textContent.includes('pg-a')",
        what="pg-a on GPU-0's card",
    )
    second = await hive.spawn({"model": "demo-cpu", "id": "pg-b", "restart": "no"}, wait=True)
    await browser.until(f"{_row('pg-b', 2)} === 'ready'", what="pg-b on the page")

    # A kill shows as failed with its error, live.
    os.kill(worker["pid"], signal.SIGKILL)
    await browser.until(f"{_row('pg-a', 2)} === 'failed'", what="pg-a failed on the page")
    await browser.until(f"({_row('pg-a', 7)} || '').includes('SIGKILL')", what="pg-a's error")

    # A click shows the worker's last log lines.
    await browser.evaluate("document.querySelector('tr[data-id=\"pg-b\"]').click()")
    await browser.until(
        "document.getElementById('log').textContent.includes('attempt 1')", what="pg-b's log"
    )
    assert "pg-b" in await browser.evaluate("document.getElementById('log-title').textContent")

    shot = os.environ.get("HIVE_SCREENSHOT")
    path = await browser.screenshot(Path(shot) if shot else hive.home / "page.png")
    assert path.stat().st_size > 10_000

    # Removed: gone from the page.
    await hive.call("DELETE", "/v1/workers/pg-a")
    await browser.until(f"{_row('pg-a', 0)} === null", what="pg-a gone from the page")
    await hive.call("DELETE", "/v1/workers/pg-b")
    assert second["id"] == "pg-b"

    # Log out: the session is dead at once, and the page asks for the token again.
    await browser.evaluate("document.getElementById('logout-button').click()")
    await browser.until("!document.getElementById('login').hidden", what="the login form again")
    assert requests.get(f"{hive.url}/v1/workers", headers=bearer, timeout=10).status_code == 401


async def test_the_page_needs_no_token_to_load_and_nothing_from_outside(gpu_hive: Hive) -> None:
    page = requests.get(f"{gpu_hive.url}/", timeout=10)
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "http://" not in page.text and "https://" not in page.text
    # The data stays behind the token: without it, the API refuses.
    assert requests.get(f"{gpu_hive.url}/v1/workers", timeout=10).status_code == 401
    # A wrong token in the form is a 401, no session; the right one a session, no cookie.
    wrong = requests.post(
        f"{gpu_hive.url}/login", data={"token": "nope"}, allow_redirects=False, timeout=10
    )
    assert wrong.status_code == 401 and "session" not in wrong.text
    assert "hive_session" not in wrong.cookies
    right = requests.post(
        f"{gpu_hive.url}/login", data={"token": gpu_hive.token}, allow_redirects=False, timeout=10
    )
    assert right.status_code == 200 and right.json()["session"]
    assert not [c for c in right.cookies if c.value]


def test_a_malformed_login_form_is_a_failed_log_in_not_an_error(gpu_hive: Hive) -> None:
    for headers, data in (
        ({"Content-Type": "multipart/form-data"}, b""),
        ({"Content-Type": "multipart/form-data; boundary=x"}, b"garbage"),
        ({"Content-Type": "application/x-www-form-urlencoded"}, b"\xff\xfe=%%"),
    ):
        r = requests.post(
            f"{gpu_hive.url}/login", headers=headers, data=data, allow_redirects=False, timeout=10
        )
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
    assert "Traceback" not in gpu_hive.log()

"""The status page in a real headless Chromium: log in with the token (never in the URL), see
GPUs and workers, watch a spawn and a kill change the page live, read a log tail on click, log
out. The browser holds no cookie that grants anything: the session lives in the tab's
``sessionStorage`` and the page sends it as a bearer header itself. The page says at once when
hive stops answering and greys every figure; it fits a phone's 390 px; each worker's figures
and each GPU's memory are bars of the workers' shares.

Set ``HIVE_SCREENSHOTS`` to a folder to keep the page's screenshots at 390, 1280 and 1920 px
(docs/status-page-*.png are those).
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import requests
from hivetest import TAG, Hive, running_hive

from harness.chromium import Browser, chromium_path
from harness.nvml import FakeGpu, FakeProc, build_fake_nvml, write_config

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed"),
]


def _write_gpus(
    config: Path, used: tuple[int, int] = (0, 0), procs: tuple[FakeProc, ...] = ()
) -> None:
    cores = sorted(os.sched_getaffinity(0))
    write_config(
        config,
        [
            FakeGpu(0, name="NVIDIA H100 80GB HBM3", total_mib=81920, used_mib=used[0],
                    cpus=str(cores[0])),
            FakeGpu(1, name="NVIDIA H100 80GB HBM3", total_mib=81920, used_mib=used[1],
                    cpus=str(cores[-1])),
        ],
        procs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def nvml_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake NVML's config: rewriting it changes what the running hive sees."""
    config = tmp_path_factory.mktemp("nvml-config") / "gpus.conf"
    _write_gpus(config)
    return config


@pytest.fixture(scope="module")
def gpu_hive(tmp_path_factory: pytest.TempPathFactory, nvml_config: Path) -> Iterator[Hive]:
    lib = build_fake_nvml(tmp_path_factory.mktemp("nvml"))
    env = {"LD_LIBRARY_PATH": str(lib), "FAKE_NVML_CONFIG": str(nvml_config)}
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


async def _open(browser: Browser, hive: Hive) -> None:
    """The page, logged in."""
    await browser.goto(f"{hive.url}/")
    await browser.until("!document.getElementById('login').hidden", what="the login form")
    await _log_in(browser, hive.token)
    await browser.until("document.body.dataset.ready === 'true'", what="the page, logged in")


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
    await browser.until(f"({_row('pg-a', 11)} || '').includes('SIGKILL')", what="pg-a's error")

    # A click shows the worker's last log lines.
    await browser.evaluate("document.querySelector('tr[data-id=\"pg-b\"]').click()")
    await browser.until(
        "document.getElementById('log').textContent.includes('attempt 1')", what="pg-b's log"
    )
    assert "pg-b" in await browser.evaluate("document.getElementById('log-title').textContent")

    path = await browser.screenshot(hive.home / "page.png")
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


async def test_log_out_is_hidden_on_the_log_in_form(gpu_hive: Hive, browser: Browser) -> None:
    # It was shown there: the form's "display: flex" overrode its "hidden".
    await browser.goto(f"{gpu_hive.url}/")
    await browser.until("!document.getElementById('login').hidden", what="the login form")
    shown = "getComputedStyle(document.getElementById('logout')).display"
    assert await browser.evaluate(shown) == "none"
    assert await browser.evaluate("document.getElementById('logout-button').offsetParent") is None
    await _log_in(browser, gpu_hive.token)
    await browser.until("document.body.dataset.ready === 'true'", what="the page, logged in")
    assert await browser.evaluate(shown) != "none"
    await browser.evaluate("document.getElementById('logout-button').click()")
    await browser.until("!document.getElementById('login').hidden", what="the login form again")
    assert await browser.evaluate(shown) == "none"


def _share(selector: str) -> str:
    """JavaScript: the drawn width of a bar's part as a share of its bar, or null."""
    part = f"document.querySelector({json.dumps(selector)})"
    return (
        f"({part} ? {part}.getBoundingClientRect().width / "
        f"{part}.parentElement.getBoundingClientRect().width : null)"
    )


async def test_figures_are_bars_of_the_workers_shares_and_fit_a_phone(
    gpu_hive: Hive, nvml_config: Path, browser: Browser
) -> None:
    a = await gpu_hive.spawn(
        {"model": "demo-gpu", "id": "bar-a", "device": "GPU-0", "restart": "no"}, wait=True
    )
    b = await gpu_hive.spawn(
        {"model": "demo-gpu", "id": "bar-b", "device": "GPU-1", "restart": "no"}, wait=True
    )
    c = await gpu_hive.spawn({"model": "demo-cpu", "id": "bar-c", "restart": "no"}, wait=True)
    try:
        # bar-a holds 20 GiB of GPU-0's 80, something else 10 GiB more; bar-b 40 GiB of GPU-1.
        procs = (FakeProc(0, a["pid"], 20480), FakeProc(1, b["pid"], 40960))
        _write_gpus(nvml_config, used=(30720, 40960), procs=procs)
        await _open(browser, gpu_hive)
        gpu0 = '[data-gpu="GPU-0"] .bar > div'
        await browser.until(
            f"Math.abs({_share(gpu0 + '[data-worker=bar-a]')} - 0.25) < 0.01",
            what="bar-a's quarter of GPU-0's memory bar",
        )
        assert abs(await browser.evaluate(_share(gpu0 + ".other")) - 0.125) < 0.01
        gpu1 = '[data-gpu="GPU-1"] .bar > div[data-worker=bar-b]'
        assert abs(await browser.evaluate(_share(gpu1)) - 0.5) < 0.01
        # Each worker's figures are bars too: bar-a's GPU memory is a quarter of its GPU's.
        await browser.until(
            "Math.abs(" + _share('tr[data-id="bar-a"] td[data-col="GPU memory"] .bar > div')
            + " - 0.25) < 0.01",
            what="bar-a's GPU memory bar in its row",
        )  # fmt: skip
        for column in ("CPU", "memory"):
            cells = f'tr[data-id="bar-c"] td[data-col="{column}"] .bar'
            await browser.until(
                f"!!document.querySelector('{cells}')", what=f"bar-c's {column} bar"
            )
        # The CPU node's load has its unit, as the CLI's 100.0% has.
        load = await browser.evaluate("document.querySelector('#cpus .card').textContent")
        assert re.search(r"load \d+(\.\d)?%", load), load

        # A phone: nothing is wider than the screen; the worker table stacks.
        await browser.viewport(390)
        await browser.until("document.documentElement.clientWidth === 390", what="390 px")
        width = await browser.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page is {width} px wide on a 390 px screen"
        assert await browser.evaluate(f"{_row('bar-a', 2)} === 'ready'")

        shots = os.environ.get("HIVE_SCREENSHOTS")
        for screen in (390, 1280, 1920):
            await browser.viewport(screen)
            await browser.until(f"document.documentElement.clientWidth === {screen}", what="width")
            folder = Path(shots) if shots else gpu_hive.home
            path = await browser.screenshot(folder / f"status-page-{screen}.png")
            assert path.stat().st_size > 10_000
    finally:
        _write_gpus(nvml_config)
        for worker in (a, b, c):
            await gpu_hive.call("DELETE", f"/v1/workers/{worker['id']}")
        await gpu_hive.close_http()


async def test_the_log_in_form_fits_a_phone(gpu_hive: Hive, browser: Browser) -> None:
    await browser.viewport(390)
    await browser.goto(f"{gpu_hive.url}/")
    await browser.until("!document.getElementById('login').hidden", what="the login form")
    width = await browser.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the log-in form is {width} px wide on a 390 px screen"


async def test_the_page_says_at_once_when_hive_is_gone_and_greys_every_figure(
    browser: Browser,
) -> None:
    with running_hive() as hive:
        try:
            await _stale_after_sigkill(hive, browser)
        finally:
            await hive.close_http()


async def _stale_after_sigkill(hive: Hive, browser: Browser) -> None:
    await hive.spawn({"model": "demo-cpu", "id": "st-a", "restart": "no"}, wait=True)
    await hive.spawn({"model": "demo-cpu", "id": "st-b", "restart": "no"}, wait=True)
    await _open(browser, hive)
    cpu_card = "document.querySelector('#cpus .card').textContent"
    await browser.until(f"{cpu_card}.includes('st-a')", what="st-a on the CPU card")

    # A stopped worker is off the CPU card's running workers, and the table says stopped.
    stopped = await hive.stop_worker("st-b")
    assert stopped["state"] == "stopped"
    await browser.until(f"{_row('st-b', 2)} === 'stopped'", what="st-b stopped on the page")
    await browser.until(f"!{cpu_card}.includes('st-b')", what="st-b off the CPU card")
    banner = "document.getElementById('stale-banner')"
    assert await browser.evaluate(f"!{banner} || {banner}.hidden") is True

    # Frozen (the connection held, nothing answered): stale too, and fresh once it answers.
    hive.signal(signal.SIGSTOP)
    try:
        await browser.until(f"{banner} && !{banner}.hidden", what="the banner while hive is frozen")
    finally:
        hive.signal(signal.SIGCONT)
    await browser.until(f"{banner}.hidden", what="the banner gone once hive answers")
    assert await browser.evaluate("document.body.classList.contains('stale')") is False

    hive.kill()  # SIGKILL: no goodbye on the event stream, the connection just ends
    text = await browser.until(
        f"{banner} && !{banner}.hidden && {banner}.textContent", what="the unreachable banner"
    )
    assert re.search(r"hive unreachable since \d\d:\d\d:\d\d", text), text
    assert await browser.evaluate("getComputedStyle(" + banner + ").display") != "none"
    # Every figure is marked: greyed, and each card and the worker table labelled "stale".
    figures = await browser.evaluate(
        "[...document.querySelectorAll('.card'), document.getElementById('workers')]"
        ".map((el) => getComputedStyle(el).opacity)"
    )
    assert len(figures) >= 2 and all(float(o) < 1 for o in figures), figures
    labels = await browser.evaluate(
        "[...document.querySelectorAll('.card')].map((el) => getComputedStyle(el, '::after')"
        ".content).concat([getComputedStyle(document.querySelector('#workers caption'),"
        " '::after').content])"
    )
    assert labels and all(label == '"stale"' for label in labels), labels
    shots = os.environ.get("HIVE_SCREENSHOTS")
    path = await browser.screenshot((Path(shots) if shots else hive.home) / "status-page-stale.png")
    assert path.stat().st_size > 10_000

"""A real headless Chromium, driven over the DevTools protocol (a websocket), for page tests.

Debian's ``chromium`` is started headless on a free loopback port with a fresh profile, the
flags that keep it off the network (this machine has none), and ``--no-sandbox`` as root. One
page target is opened; :meth:`Browser.evaluate` runs JavaScript in it and returns the value,
:meth:`Browser.screenshot` writes a PNG (at the width :meth:`Browser.viewport` sets).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from harness.net import free_port
from harness.procs import Tag, kill_tree
from harness.waits import async_wait_for

#: Where Debian's package puts it.
CHROMIUM = "/usr/bin/chromium"

_FLAGS = (
    "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
    "--window-size=1280,900",
)  # fmt: skip


def chromium_path() -> str | None:
    """Chromium's executable, or None when it is not installed."""
    found = os.environ.get("HIVE_CHROMIUM") or shutil.which("chromium") or CHROMIUM
    return found if Path(found).exists() else None


class Browser:
    """One Chromium process and one page in it."""

    def __init__(self, tag: Tag) -> None:
        self.tag = tag
        self.port = free_port()
        self.profile = Path(tempfile.mkdtemp(prefix="hive-chromium-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)

    async def start(self) -> Browser:
        path = chromium_path()
        if path is None:
            raise RuntimeError("chromium is not installed (apt-get install chromium)")
        flags = [*_FLAGS, f"--remote-debugging-port={self.port}", f"--user-data-dir={self.profile}"]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")
        self.proc = subprocess.Popen(
            [path, *flags, "about:blank"],
            env={**os.environ, **self.tag.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._session = aiohttp.ClientSession()
        base = f"http://127.0.0.1:{self.port}"

        async def page_target() -> Mapping[str, Any] | None:
            try:
                async with self._session.get(f"{base}/json/list") as r:  # type: ignore[union-attr]
                    targets = await r.json()
            except aiohttp.ClientError:
                return None
            return next((t for t in targets if t.get("type") == "page"), None)

        target = await async_wait_for(page_target, timeout=60, what="chromium's page target")
        self._ws = await self._session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events in between are skipped)."""
        assert self._ws is not None
        message_id = next(self._ids)
        await self._ws.send_str(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = await asyncio.wait_for(self._ws.receive(), 30)
            if message.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"chromium's DevTools socket: {message.type}")
            data = json.loads(message.data)
            if data.get("id") == message_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return dict(data.get("result", {}))

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` in the page (awaited if it is a promise)."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, expression: str, timeout: float = 30.0, what: str = "") -> Any:
        """Wait until ``expression`` is truthy in the page; returns its value."""

        async def holds() -> Any:
            try:
                return await self.evaluate(expression)
            except RuntimeError:
                return None  # mid-navigation: the page is being replaced

        return await async_wait_for(holds, timeout=timeout, what=what or expression)

    async def viewport(self, width: int, height: int = 900) -> None:
        """Lay the page out as on a screen ``width`` CSS pixels wide (a phone: 390)."""
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=width < 600,
        )

    async def screenshot(self, path: Path) -> Path:
        result = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(result["data"]))
        return path

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self.proc is not None:  # its renderers too, if it does not end them itself
            await asyncio.to_thread(kill_tree, self.proc, 15.0)
        shutil.rmtree(self.profile, ignore_errors=True)

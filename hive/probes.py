"""Health probes: ask a worker's health path and say what came back; never change a record.

The readiness probe polls until the worker answers 2xx; the liveness probe watches a ready
worker and returns why it is unhealthy once it failed ``liveness_failures`` times in a row
(skipping any period in which the worker heartbeated: that already proves it alive). Both
return results; the worker's lifecycle decides what they mean.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import aiohttp

from hive.config import BackendConfig
from hive.registry import now

_TIMEOUT = aiohttp.ClientTimeout(total=2.0)
#: Readiness is polled after 50 ms, then each wait half again as long, up to every 1 s.
_FIRST_POLL, _MAX_POLL = 0.05, 1.0


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe: whether it passed, and what came back (``HTTP 503``, an error's text)."""

    ok: bool
    detail: str


class Prober:
    """Probes over one HTTP session shared by every worker."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=_TIMEOUT)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check(self, url: str) -> ProbeResult:
        """GET ``url`` once: passed on 2xx."""
        if self._session is None:
            return ProbeResult(False, "hive is not probing")
        try:
            async with self._session.get(url) as response:
                ok = 200 <= response.status < 300
                return ProbeResult(ok, f"HTTP {response.status}")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return ProbeResult(False, str(exc) or type(exc).__name__)

    async def until_ready(
        self, url: str, seen: Callable[[ProbeResult], None] | None = None
    ) -> ProbeResult:
        """Poll ``url`` until it answers 2xx; returns that result (cancel to give up).

        ``seen`` hears every result, so a timeout can say what the probe last got.
        """
        delay = _FIRST_POLL
        while True:
            result = await self.check(url)
            if seen is not None:
                seen(result)
            if result.ok:
                return result
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, _MAX_POLL)

    async def until_unhealthy(
        self,
        url: str,
        backend: BackendConfig,
        last_heartbeat: Callable[[], datetime | None],
    ) -> str:
        """Watch a ready worker; returns why it is unhealthy (cancel to stop watching)."""
        failures = 0
        period = timedelta(seconds=backend.liveness_period)
        while True:
            await asyncio.sleep(backend.liveness_period)
            beat = last_heartbeat()
            if beat is not None and now() - beat < period:
                failures = 0  # it heartbeated within the period: that is proof enough of life
                continue
            result = await self.check(url)
            failures = 0 if result.ok else failures + 1
            if failures >= backend.liveness_failures:
                return (
                    f"unhealthy: {backend.health_path} failed {failures} times in a row "
                    f"(last: {result.detail})"
                )


class WorkerProbes:
    """One worker's probes of its backend's health path: results only, and the last one seen
    (so that a startup timeout can say what the probe last got)."""

    def __init__(
        self, prober: Prober, port: Callable[[], int], heartbeat: Callable[[], datetime | None]
    ) -> None:
        self._prober = prober
        self._port = port
        self._heartbeat = heartbeat
        self.last: ProbeResult | None = None

    def url(self, backend: BackendConfig) -> str | None:
        if backend.health_path is None:
            return None
        return f"http://127.0.0.1:{self._port()}{backend.health_path}"

    async def until_ready(self, backend: BackendConfig) -> bool:
        """Once the health path answers 2xx: True. False at once when there is none to probe."""
        url = self.url(backend)
        if url is None:
            return False
        await self._prober.until_ready(url, self._seen)
        return True

    def _seen(self, result: ProbeResult) -> None:
        self.last = result

    async def until_unhealthy(self, backend: BackendConfig) -> str:
        """Why a ready worker is unhealthy; never returns when there is nothing to probe."""
        url = self.url(backend)
        if url is None:
            await asyncio.Event().wait()  # nothing to probe: wait to be cancelled
        assert url is not None
        return await self._prober.until_unhealthy(url, backend, self._heartbeat)

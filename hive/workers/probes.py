"""Health probes and load reads: ask a worker's engine and say what came back; never change a
record.

The readiness probe polls until the worker answers 2xx; the liveness probe watches a ready
worker and returns why it is unhealthy once it failed ``liveness_failures`` times in a row. A
period in which something else proved the worker alive (a heartbeat, or a load read that the
engine answered) costs no probe; and a probe that times out while the engine last said it was
running requests is not a failure: a busy engine is slow, not dead. The load read
(:mod:`hive.workers.engine_load`) asks the backend's load endpoint every ``load.period`` while
the worker sends no heartbeats. All of them go over one kept-alive connection per worker
(:mod:`hive.workers.connections`), so a period's read costs one request, not a new TCP
connection nor an HTTP client's round trip. The worker's lifecycle decides what the results mean.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from hive.config import BackendConfig
from hive.host.descriptors import OUT_OF_DESCRIPTORS
from hive.timeouts import TICK, sleep_to_tick
from hive.workers.connections import Connections, HttpError
from hive.workers.engine_load import Load, LoadError, parse
from hive.workers.listener import RECHECK
from hive.workers.progress import ProgressWatch
from hive.workers.stall import LoopWatch

#: Seconds a probe or load read waits for its answer.
_TIMEOUT = 2.0
#: Readiness is polled after 50 ms, then each wait half again as long, up to every 1 s.
_FIRST_POLL, _MAX_POLL = 0.05, 1.0


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe: whether it passed, and what came back (``HTTP 503``, an error's text)."""

    ok: bool
    detail: str
    timed_out: bool = False
    #: It failed on hive's side: hive had no file descriptor for the connection. Never the
    #: worker's failure.
    hive_side: bool = False


class Prober:
    """Probes over kept-alive connections to every worker (:mod:`hive.workers.connections`)."""

    def __init__(self) -> None:
        self._connections: Connections | None = None

    async def start(self) -> None:
        self._connections = Connections()

    async def close(self) -> None:
        if self._connections is not None:
            self._connections.close()
            self._connections = None

    async def get(self, url: str, key: str | None = None) -> tuple[ProbeResult, bytes]:
        """GET ``url`` (``http://127.0.0.1:PORT/path``) once, with ``key`` as its bearer token:
        passed on 2xx, with the body it answered."""
        if self._connections is None:
            return ProbeResult(False, "hive is not probing"), b""
        authority, _, target = url.removeprefix("http://").partition("/")
        port = int(authority.rpartition(":")[2])
        try:
            status, body = await self._connections.get(port, "/" + target, _TIMEOUT, key)
        except TimeoutError:
            return ProbeResult(False, f"no answer within {_TIMEOUT:g}s", timed_out=True), b""
        except OSError as exc:
            mine = exc.errno in OUT_OF_DESCRIPTORS
            return ProbeResult(False, str(exc) or type(exc).__name__, hive_side=mine), b""
        except HttpError as exc:
            return ProbeResult(False, str(exc)), b""
        ok = 200 <= status < 300
        return ProbeResult(ok, f"HTTP {status}"), body if ok else b""

    async def check(self, url: str) -> ProbeResult:
        """GET ``url`` once: passed on 2xx."""
        return (await self.get(url))[0]

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
        proven_within: Callable[[float], bool],
        busy: Callable[[], bool],
        away: Callable[[float], float] = lambda since: 0.0,
    ) -> str:
        """Watch a ready worker; returns why it is unhealthy (cancel to stop watching).

        ``proven_within(seconds)``: something else showed the worker alive that recently.
        ``busy()``: the engine last said it runs requests, so a probe's timeout is forgiven.
        ``away(since)``: seconds hive itself did not run since then (``time.monotonic()``); a
        probe that failed while hive was away is not counted: hive, not the worker, was deaf.
        """
        failures = 0
        period = backend.liveness_period
        while True:
            await sleep_to_tick(period)
            if proven_within(period * 1.5):  # a proof as old as one period, give or take
                failures = 0
                continue
            sent = time.monotonic()
            result = await self.check(url)
            if result.ok:
                failures = 0
            elif away(sent) > 0 or result.hive_side:
                pass
            elif not (result.timed_out and busy()):
                failures += 1
            if failures >= backend.liveness_failures:
                return (
                    f"unhealthy: {backend.health_path} failed {failures} times in a row "
                    f"(last: {result.detail})"
                )


class WorkerProbes:
    """One worker's probes and load reads: results only, with the last of each kept (a startup
    timeout says what the probe last got; liveness asks whether the engine was busy)."""

    def __init__(
        self,
        prober: Prober,
        port: Callable[[], int],
        heartbeat_age: Callable[[], float | None],
        away: Callable[[float], float] = lambda since: 0.0,
        progress: ProgressWatch | None = None,
    ) -> None:
        self._prober = prober
        self._port = port
        self._heartbeat_age = heartbeat_age
        self._away = away
        #: Whether the engine progresses while it holds requests, from every load read.
        self.progress = progress if progress is not None else ProgressWatch(LoopWatch())
        self.last: ProbeResult | None = None
        #: The engine's last load report, and when (``time.monotonic()``) a read last succeeded.
        self.load: Load | None = None
        self.load_read_at: float | None = None
        #: The engine's API key, read once per attempt ("" for none).
        self._key: str | None = None

    def _url(self, path: str | None) -> str | None:
        return None if path is None else f"http://127.0.0.1:{self._port()}{path}"

    def url(self, backend: BackendConfig) -> str | None:
        return self._url(backend.health_path)

    def port(self) -> int:
        return self._port()

    def reset(self) -> None:
        """A new attempt: nothing it was told before holds."""
        self.last = self.load = self.load_read_at = self._key = None
        self.progress.reset()

    async def until_ready(
        self,
        backend: BackendConfig,
        foreign: Callable[[int], Awaitable[str | None]] | None = None,
    ) -> bool:
        """Once the health path answers 2xx: True. False at once when there is none to probe.

        ``foreign(port)``, asked after each probe that passed, says why the listener that
        answered is not the worker's own (:mod:`hive.workers.listener`); then the probe goes on,
        every ``RECHECK`` seconds, until it is.
        """
        url = self.url(backend)
        if url is None:
            return False
        while True:
            await self._prober.until_ready(url, self._seen)
            if foreign is None or (why := await foreign(self._port())) is None:
                return True
            passed = self.last.detail if self.last is not None else "2xx"
            self.last = ProbeResult(False, f"{passed}, but {why}")
            await sleep_to_tick(RECHECK)

    def _seen(self, result: ProbeResult) -> None:
        self.last = result

    async def until_unhealthy(self, backend: BackendConfig) -> str:
        """Why a ready worker is unhealthy; never returns when there is nothing to probe."""
        url = self.url(backend)
        if url is None:
            await asyncio.Event().wait()  # nothing to probe: wait to be cancelled
        assert url is not None
        return await self._prober.until_unhealthy(
            url, backend, self._proven_within, self._busy, self._away
        )

    def _proven_within(self, seconds: float) -> bool:
        age = self._heartbeat_age()
        if age is not None and age < seconds:
            return True
        return self.load_read_at is not None and time.monotonic() - self.load_read_at < seconds

    def _busy(self) -> bool:
        return self.load is not None and self.load.in_flight > 0

    async def read_load(self, backend: BackendConfig) -> Load | None:
        """Ask the engine once how busy it is; None when it did not say (kept: the last that
        it did)."""
        config, url = backend.load, self._url(backend.load.path if backend.load else None)
        if config is None or url is None:
            return None
        if self._key is None:
            try:
                self._key = backend.read_api_key() or ""
            except OSError:
                self._key = ""  # unreadable: the read goes without, and says 401 if it must
        result, body = await self._prober.get(url, self._key)
        if not result.ok:
            self.progress.seen(None, time.monotonic(), result.detail, blind=result.hive_side)
            return None
        try:
            load = parse(config, body)
        except LoadError as exc:
            self.progress.seen(None, time.monotonic(), str(exc))
            return None
        self.load, self.load_read_at = load, time.monotonic()
        self.progress.seen(load, self.load_read_at)
        return load

    async def follow_load(
        self,
        backend: BackendConfig,
        heartbeating: Callable[[], bool],
        report: Callable[[Load], None],
    ) -> None:
        """Read the engine's load and ``report`` each answer, except while the worker heartbeats
        (its own word wins); runs until cancelled.

        Every ``load.period`` while the engine runs requests or the figure moves; each read that
        finds it idle as before doubles the wait, up to the backend's ``liveness_period`` less
        the tick the sleep may add: an idle engine costs one request a liveness period (which
        also proves it alive), a busy one is followed closely, and a request that starts on an
        idle engine is seen within a liveness period (and the read's own time). A read the
        engine did not answer (in time, or readably) is tried again after ``load.period``: an
        engine too busy to answer is the one to follow closely, and keeping the idle wait
        would leave it ``ready`` for a liveness period after each such read.
        """
        if backend.load is None:
            await asyncio.Event().wait()
        assert backend.load is not None
        fastest = backend.load.period
        # Less the tick the sleep may add: a request on an idle engine is seen within a period.
        slowest = max(fastest, backend.liveness_period - TICK)
        wait: float = fastest
        last: Load | None = None
        while True:
            if not heartbeating():
                if (load := await self.read_load(backend)) is None:
                    wait = fastest
                else:
                    report(load)
                    moving = load != last or load.in_flight > 0
                    wait = fastest if moving else min(wait * 2, slowest)
                    last = load
            await sleep_to_tick(wait)

"""The demo worker's core: its state, its life (listen, load, signals, stop) and its info routes.

``DemoWorker`` owns what every route and the heartbeat read: loaded or not, the generations in
flight, and the events that wake the heartbeat and stop the server. The generation routes live
with their protocol (``hive.demo_worker.sglang``, ``hive.demo_worker.openai``) and reach the
worker through ``complete``, ``generating``, ``think`` and ``stream``; the heartbeat to hive lives
in ``hive.demo_worker.heartbeat``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from aiohttp import web

from hive import __version__
from hive.demo_worker import disaggregation
from hive.demo_worker.affinity import cpu_affinity, thread_affinities
from hive.demo_worker.heartbeat import heartbeat, heartbeat_target
from hive.demo_worker.http import errors_as_json
from hive.demo_worker.metrics import metrics_route
from hive.demo_worker.model import MAX_TOTAL_TOKENS, Completion, count_tokens, words_for
from hive.demo_worker.openai import OpenAIRoutes
from hive.demo_worker.output import quiet_aiohttp_logs, say, warn
from hive.demo_worker.sglang import SGLangRoutes

#: How long a graceful stop waits for requests still being answered.
SHUTDOWN_TIMEOUT = 5.0
EXIT_SIMULATED_FAILURE = 3


@dataclass(frozen=True)
class Options:
    host: str
    port: int
    model: str
    load_seconds: float
    latency_ms: float
    fail_after: float | None
    heartbeat: bool
    #: ``regular``, or ``prefill``/``decode`` in a router's PD mode.
    role: str = "regular"
    bootstrap_port: int | None = None
    #: What /health answers once loaded (an engine whose health check a router cannot pass).
    health_status: int = 200
    #: ``/health`` waits until no generation runs, as an engine whose health check takes the
    #: model's lock does: a probe of it times out while the worker is busy.
    health_waits_for_idle: bool = False
    #: A child like vLLM's EngineCore (:mod:`hive.demo_worker.engine_core`): seconds it takes to
    #: exit on SIGTERM; None: no child.
    child_exit_seconds: float | None = None
    #: Bind the port only once loaded, as vLLM does: nothing answers on it while loading.
    listen_after_load: bool = False
    #: Seconds after loading when generation freezes for good (requests stay in flight, the
    #: counters of ``/metrics`` stand still, ``/health`` answers): a stuck engine. None: never.
    stall_after: float | None = None


class DemoWorker:
    """The server's state: loaded or not, requests in flight, and the heartbeat's wake-up."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.worker_id = os.environ.get("HIVE_WORKER_ID") or None
        self.loaded = asyncio.Event()
        self.in_flight = 0
        #: Prompt and completion tokens of the generations in flight (what ``/get_load`` tells).
        self.tokens_in_flight = 0
        #: Set when the worker turns busy or ready: the heartbeat loop reports at once.
        self.changed = asyncio.Event()
        #: Set while no generation runs.
        self.idle = asyncio.Event()
        self.idle.set()
        self.stopping = asyncio.Event()
        self.exit_code = 0
        #: Work done so far (``/metrics``): tokens generated, and steps (each think).
        self.tokens_generated = 0
        self.steps = 0
        #: Set (``--stall-after``): every generation waits for ever from now on.
        self.frozen = asyncio.Event()
        self.created = int(time.time())

    # -- the model -------------------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        return f"[{self.worker_id or 'demo'}@{self.options.port}] {self.options.model} says: "

    def complete(self, prompt: str, max_tokens: int) -> Completion:
        words = words_for(prompt, max_tokens)
        pieces = [self.prefix] + [word if i == 0 else " " + word for i, word in enumerate(words)]
        return Completion(pieces, count_tokens(prompt), len(words))

    @property
    def state(self) -> str:
        return "busy" if self.in_flight else "ready"

    @contextlib.contextmanager
    def generating(self, completions: list[Completion]) -> Iterator[None]:
        """Count one generation in flight; wake the heartbeat when busy or ready changes."""
        if not self.loaded.is_set():
            raise web.HTTPServiceUnavailable(reason="the model is still loading")
        tokens = sum(c.prompt_tokens + c.completion_tokens for c in completions)
        self.in_flight += 1
        self.tokens_in_flight += tokens
        if self.in_flight == 1:
            self.changed.set()
            self.idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            self.tokens_in_flight -= tokens
            if self.in_flight == 0:
                self.changed.set()
                self.idle.set()

    async def think(self, tokens: int = 1, of: int = 1) -> None:
        """Wait the part ``tokens``/``of`` of the per-generation latency (for ever once
        frozen), and count it as a step that generated ``tokens``."""
        if self.frozen.is_set():
            await self.stopping.wait()
        if self.options.latency_ms > 0:
            await asyncio.sleep(self.options.latency_ms / 1000 * tokens / max(of, 1))
        if self.frozen.is_set():
            await self.stopping.wait()
        self.steps += 1
        self.tokens_generated += tokens

    async def stream(self, completion: Completion) -> AsyncIterator[str]:
        """The pieces of ``completion``, spread over the per-generation latency."""
        for piece in completion.pieces:
            await self.think(1, len(completion.pieces))
            yield piece

    # -- routes: health and info -----------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        """Every route: health and info here, then SGLang's native ones, then OpenAI's."""
        return [
            web.get("/health", self.health),
            web.get("/health_generate", self.health),
            web.get("/get_model_info", self.model_info),
            web.get("/model_info", self.model_info),
            web.get("/get_server_info", self.server_info),
            web.get("/server_info", self.server_info),
            *SGLangRoutes(self).routes(),
            *OpenAIRoutes(self).routes(),
            metrics_route(self),
        ]

    async def health(self, request: web.Request) -> web.Response:
        if not self.loaded.is_set():
            return web.json_response({"status": "loading"}, status=503)
        if self.options.health_waits_for_idle:
            await self.idle.wait()
        status = self.options.health_status
        return web.json_response({"status": "ok" if status < 300 else "unhealthy"}, status=status)

    async def model_info(self, request: web.Request) -> web.Response:
        model = self.options.model
        return web.json_response(
            {
                "model_path": model,
                "tokenizer_path": model,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": "default",
                "has_image_understanding": False,
                "has_audio_understanding": False,
                "model_type": "demo",
                "architectures": ["DemoForCausalLM"],
            }
        )

    async def server_info(self, request: web.Request) -> web.Response:
        model = self.options.model
        return web.json_response(
            {
                "model_path": model,
                "tokenizer_path": model,
                "served_model_name": model,
                "host": self.options.host,
                "port": self.options.port,
                "pid": os.getpid(),
                "cpu_affinity": cpu_affinity(),
                "threads": thread_affinities(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "worker_id": self.worker_id,
                "version": __version__,
                "max_total_num_tokens": MAX_TOTAL_TOKENS,
                "tp_size": 1,
                "dp_size": 1,
                "disaggregation_mode": self.options.role
                if self.options.role != "regular"
                else "null",
                "disaggregation_bootstrap_port": self.options.bootstrap_port,
                "loaded": self.loaded.is_set(),
                "in_flight": self.in_flight,
                "internal_states": [{}],
            }
        )

    # -- life ------------------------------------------------------------------------------------

    async def load(self) -> None:
        """Pretend to load the model, then say so on stdout (benchmarks read the ``ready_at``
        line; hive's start-up phases the ``model loaded`` one)."""
        if self.options.load_seconds > 0:
            await asyncio.sleep(self.options.load_seconds)
        say(f"demo worker: model loaded in {self.options.load_seconds:g} s")
        self.loaded.set()
        self.changed.set()
        say(f"ready_at={time.time():.6f} port={self.options.port}")
        if self.options.stall_after is not None:
            await asyncio.sleep(self.options.stall_after)
            self.frozen.set()
            stall_after = self.options.stall_after
            warn(f"demo worker: generation frozen at {time.time():.6f} ({stall_after:g} s loaded)")

    async def fail_later(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        warn(f"demo worker: simulated failure after {seconds:g} s")
        self.exit_code = EXIT_SIMULATED_FAILURE
        self.stopping.set()

    def on_signal(self, signum: signal.Signals) -> None:
        if not self.stopping.is_set():
            say(f"demo worker: {signum.name} received, stopping")
        self.stopping.set()

    async def run(self) -> int:
        """Listen, load in the background, heartbeat, and stop on a signal. With
        ``listen_after_load``: load first, then listen (and only then heartbeat)."""
        quiet_aiohttp_logs()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.on_signal, signum)

        options = self.options
        app = web.Application(middlewares=[errors_as_json, disaggregation.middleware(options.role)])
        app.add_routes(self.routes())
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        bootstrap: asyncio.Server | None = None
        tasks: list[asyncio.Task[None]] = []
        if options.fail_after is not None:
            tasks.append(asyncio.create_task(self.fail_later(options.fail_after)))
        try:
            if options.listen_after_load:
                tasks.append(asyncio.create_task(self.load()))
                await _first(self.loaded, self.stopping)
            if not self.stopping.is_set():
                try:
                    bootstrap = await self._listen(runner)
                except OSError as exc:
                    warn(f"demo worker: cannot listen on {options.host}: {exc.strerror}")
                    return 1
            if not self.stopping.is_set():
                loading = "loaded" if options.listen_after_load else "loading for"
                say(
                    f"demo worker: pid {os.getpid()} serving {options.model!r} on "
                    f"http://{options.host}:{options.port} ({loading} {options.load_seconds:g} s)"
                )
                if not options.listen_after_load:
                    tasks.append(asyncio.create_task(self.load()))
                target = heartbeat_target() if options.heartbeat else None
                if target is not None:
                    tasks.append(asyncio.create_task(heartbeat(self, *target)))
            await self.stopping.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if bootstrap is not None:
                bootstrap.close()
            await runner.cleanup()
        if self.exit_code == 0:
            say("demo worker: stopped")
        return self.exit_code

    async def _listen(self, runner: web.AppRunner) -> asyncio.Server | None:
        """Bind the port (and a prefill's bootstrap port); the bootstrap server, if any.

        With ``listen_after_load``, a port another process holds is tried again every 0.2 s
        until it is free or the worker stops (vLLM would exit; a test can free the port)."""
        options = self.options
        told = False
        while True:
            try:
                await web.TCPSite(runner, options.host, options.port).start()
                break
            except OSError as exc:
                taken = exc.errno == errno.EADDRINUSE
                if not (options.listen_after_load and taken) or self.stopping.is_set():
                    raise
                if not told:
                    warn(f"demo worker: port {options.port} is taken; trying every 0.2 s")
                    told = True
                if await _first(self.stopping, timeout=0.2):
                    return None
        if options.bootstrap_port is None:
            return None
        return await disaggregation.listen_for_bootstrap(options.host, options.bootstrap_port)


async def _first(*events: asyncio.Event, timeout: float | None = None) -> bool:
    """Wait until one of ``events`` is set (or ``timeout`` passes); whether one was."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    return bool(done)

"""The demo worker: a real HTTP model server with a fake model, for trying hive anywhere.

``python -m hive.demo_worker --port P --model M`` serves the routes an SGLang server serves, with
the same shapes, so that hive, an sglang-router and any OpenAI client can drive it exactly as they
drive a real model server, on a laptop or in CI, with no GPU and no weights:

* ``GET /health`` and ``/health_generate``: 503 ``{"status": "loading"}`` while the fake model
  "loads" (``--load-seconds``; the port already listens meanwhile), then 200 ``{"status": "ok"}``.
* ``GET /get_model_info`` (``/model_info``) and ``GET /get_server_info`` (``/server_info``): what
  a router reads when a worker joins. The server info also tells where the worker runs: its pid,
  its CPU affinity, the allowed CPUs of each of its threads, ``CUDA_VISIBLE_DEVICES`` and the
  ``HIVE_WORKER_ID`` hive gave it, so that placement and pinning can be checked from outside.
* ``GET /v1/models``, ``POST /generate`` (SGLang native), ``POST /v1/completions`` and
  ``POST /v1/chat/completions`` (OpenAI, ``"stream": true`` as Server-Sent Events). The text is
  deterministic: it names the worker (``[<worker id>@<port>] <model> says: ``) and goes on with
  words derived from the prompt, one word per token, up to the request's token limit (16 unless
  the request says otherwise). ``--latency-ms`` makes each generation take that long.
* ``GET /get_load`` (requests and tokens in flight, as a router's power-of-two policy reads
  them) and ``POST /flush_cache`` (a no-op), so that a router's fan-outs succeed too.

When hive started it (``HIVE_URL``, ``HIVE_WORKER_ID`` and ``HIVE_WORKER_TOKEN`` are set), it
heartbeats ``{"state": "ready"|"busy", "in_flight": n}`` to
``{HIVE_URL}/v1/workers/{HIVE_WORKER_ID}/heartbeat`` once loaded, every
``HIVE_HEARTBEAT_INTERVAL`` seconds and at once whenever it turns busy or ready again.
``HIVE_URL`` may be ``http://host:port`` or ``unix:///path/to/hive.sock``; ``--no-heartbeat``
turns heartbeats off. Once loaded it prints one line ``ready_at=<unix time> port=<P>`` to stdout.

SIGTERM or SIGINT stops it cleanly (exit code 0). ``--fail-after S`` simulates a crash: after S
seconds it prints ``demo worker: simulated failure after S s`` to stderr and exits with code 3.

It imports only the standard library and aiohttp, so it starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from hive import __version__

#: Tokens generated when a request names no limit.
DEFAULT_MAX_TOKENS = 16
#: The largest number of tokens one request may ask for (also the fake context size).
MAX_TOTAL_TOKENS = 4096
DEFAULT_HEARTBEAT_INTERVAL = 5.0
#: How long a graceful stop waits for requests still being answered.
SHUTDOWN_TIMEOUT = 5.0
EXIT_SIMULATED_FAILURE = 3
OWNER = "hive-demo"
#: The fake model's vocabulary: the words of the generated text are drawn from it.
VOCABULARY = (
    "amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "island", "juniper",
    "kelp", "lagoon", "meadow", "nectar", "orchid", "pebble", "quartz", "river", "saffron",
    "tundra", "umber", "valley", "willow", "xenon", "yarrow", "zephyr", "bee", "comb", "hive",
    "honey", "pollen", "swarm",
)  # fmt: skip

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    """A request the worker cannot answer: a 400 with this message."""


# -- output ---------------------------------------------------------------------------------------


def say(message: str) -> None:
    """One line to stdout, flushed at once (stdout is usually a log file)."""
    print(message, flush=True)


def warn(message: str) -> None:
    """One line to stderr, flushed at once."""
    print(message, file=sys.stderr, flush=True)


class OneLineFormatter(logging.Formatter):
    """A log record as one line: an exception is summed up, never a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        message = f"demo worker: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            detail = " ".join(str(exc).split())[:160]
            message += f" ({type(exc).__name__}: {detail})" if detail else f" ({exc!r})"
        return message


def quiet_aiohttp_logs() -> None:
    """aiohttp's own complaints (a client speaking HTTP/2 to us, say) as one line on stderr.

    A router probing whether the worker speaks gRPC sends an HTTP/2 preface: aiohttp answers 400
    and would otherwise print a traceback.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter())
    logger = logging.getLogger("aiohttp")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False


# -- the fake model -------------------------------------------------------------------------------


def words_for(prompt: str, count: int) -> list[str]:
    """``count`` words derived from ``prompt``: the same prompt always gives the same words."""
    words = []
    for index in range(count):
        digest = hashlib.sha256(f"{index}\x00{prompt}".encode()).digest()
        words.append(VOCABULARY[int.from_bytes(digest[:4], "big") % len(VOCABULARY)])
    return words


def count_tokens(prompt: str) -> int:
    return len(prompt.split())


@dataclass(frozen=True)
class Completion:
    """One generated text, as the pieces a stream sends (their concatenation is the text)."""

    pieces: list[str]
    prompt_tokens: int
    completion_tokens: int

    @property
    def text(self) -> str:
        return "".join(self.pieces)


# -- where the worker runs ------------------------------------------------------------------------


def parse_cpu_list(text: str) -> list[int]:
    """``"0-3,8"`` (the kernel's list format) as ``[0, 1, 2, 3, 8]``."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        cpus.extend(range(int(low), int(high or low) + 1))
    return cpus


def cpu_affinity() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def thread_affinities() -> dict[str, list[int]]:
    """Each thread of this process (by tid) and the CPUs it may run on, from /proc."""
    threads: dict[str, list[int]] = {}
    try:
        tids = sorted(os.listdir("/proc/self/task"), key=int)
    except OSError:
        return threads
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/status") as status:
                for line in status:
                    if line.startswith("Cpus_allowed_list:"):
                        threads[tid] = parse_cpu_list(line.split(":", 1)[1])
                        break
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
    return threads


# -- requests -------------------------------------------------------------------------------------


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("body: not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("body: must be a JSON object")
    return body


def token_limit(value: Any, name: str) -> int:
    if value is None:
        return DEFAULT_MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"{name}: must be a non-negative integer")
    return min(value, MAX_TOTAL_TOKENS)


def prompt_list(value: Any, name: str) -> tuple[list[str], bool]:
    """A prompt field that holds one text or a list of them: the texts, and whether a list."""
    if isinstance(value, str):
        return [value], False
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value, True
    raise BadRequest(f"{name}: must be a string or a non-empty list of strings")


def native_prompts(body: dict[str, Any]) -> tuple[list[str], bool]:
    """The prompts of an SGLang ``/generate`` body: ``text``, or else ``input_ids``."""
    if "text" in body:
        return prompt_list(body["text"], "text")
    ids = body.get("input_ids")
    if isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids):
        return [" ".join(map(str, ids))], False
    if (
        isinstance(ids, list)
        and ids
        and all(isinstance(row, list) and all(isinstance(i, int) for i in row) for row in ids)
    ):
        return [" ".join(map(str, row)) for row in ids], True
    raise BadRequest("text: required (a string or a list of strings)")


def request_ids(rid: Any, count: int, batch: bool) -> list[str]:
    """The request ids of a ``/generate``: the caller's ``rid`` where it gave one per prompt."""
    if batch and isinstance(rid, list) and len(rid) == count:
        return [str(r) for r in rid]
    if not batch and isinstance(rid, str) and rid:
        return [rid]
    return [uuid.uuid4().hex for _ in range(count)]


def chat_prompt(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: must be a non-empty list")
    texts = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest("messages: each must be an object with a role")
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(
                part["text"]
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
        elif content is not None:
            raise BadRequest("messages: content must be a string or a list of parts")
    return "\n".join(texts)


def streaming(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream: must be true or false")
    return stream


def error_response(status: int, message: str) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response(
        {"error": {"message": message, "type": kind, "code": status}}, status=status
    )


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as ``{"error": {"message", "type", "code"}}``: never a traceback."""
    try:
        return await handler(request)
    except BadRequest as exc:
        return error_response(400, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        warn(f"demo worker: {request.method} {request.path} failed: {exc!r}")
        return error_response(500, "internal error")


async def sse(request: web.Request, events: AsyncIterator[dict[str, Any]]) -> web.StreamResponse:
    """Answer with Server-Sent Events: one ``data:`` line per event, then ``data: [DONE]``."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    try:
        async for event in events:
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away: nothing left to tell it
    return response


# -- the worker -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    host: str
    port: int
    model: str
    load_seconds: float
    latency_ms: float
    fail_after: float | None
    heartbeat: bool


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
        self.stopping = asyncio.Event()
        self.exit_code = 0
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
        try:
            yield
        finally:
            self.in_flight -= 1
            self.tokens_in_flight -= tokens
            if self.in_flight == 0:
                self.changed.set()

    async def think(self, tokens: int = 1, of: int = 1) -> None:
        """Wait the part ``tokens``/``of`` of the per-generation latency."""
        if self.options.latency_ms > 0:
            await asyncio.sleep(self.options.latency_ms / 1000 * tokens / max(of, 1))

    async def stream(self, completion: Completion) -> AsyncIterator[str]:
        """The pieces of ``completion``, spread over the per-generation latency."""
        for piece in completion.pieces:
            await self.think(1, len(completion.pieces))
            yield piece

    # -- routes: health and info -----------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/health", self.health),
            web.get("/health_generate", self.health),
            web.get("/get_model_info", self.model_info),
            web.get("/model_info", self.model_info),
            web.get("/get_server_info", self.server_info),
            web.get("/server_info", self.server_info),
            web.get("/v1/models", self.models),
            web.get("/get_load", self.load_report),
            web.post("/flush_cache", self.flush_cache),
            web.post("/generate", self.generate),
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
        ]

    async def health(self, request: web.Request) -> web.Response:
        if not self.loaded.is_set():
            return web.json_response({"status": "loading"}, status=503)
        return web.json_response({"status": "ok"})

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
                "disaggregation_mode": "null",
                "loaded": self.loaded.is_set(),
                "in_flight": self.in_flight,
                "internal_states": [{}],
            }
        )

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.options.model,
                        "object": "model",
                        "created": self.created,
                        "owned_by": OWNER,
                    }
                ],
            }
        )

    async def load_report(self, request: web.Request) -> web.Response:
        """SGLang's ``/get_load``, one entry per data-parallel rank: what power-of-two reads."""
        return web.json_response(
            [
                {
                    "dp_rank": 0,
                    "num_reqs": self.in_flight,
                    "num_waiting_reqs": 0,
                    "num_tokens": self.tokens_in_flight,
                }
            ]
        )

    async def flush_cache(self, request: web.Request) -> web.Response:
        """The fake model has no cache; a router's fan-out flush succeeds."""
        return web.Response(text="Cache flushed.\n")

    # -- routes: generation ----------------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """SGLang's native ``POST /generate``."""
        body = await read_json(request)
        prompts, batch = native_prompts(body)
        params = body.get("sampling_params") or {}
        if not isinstance(params, dict):
            raise BadRequest("sampling_params: must be an object")
        max_tokens = token_limit(params.get("max_new_tokens"), "sampling_params.max_new_tokens")
        stream = streaming(body)
        completions = [self.complete(prompt, max_tokens) for prompt in prompts]
        ids = request_ids(body.get("rid"), len(prompts), batch)
        started = time.monotonic()

        def answer(index: int, text: str, done: bool) -> dict[str, Any]:
            completion = completions[index]
            meta: dict[str, Any] = {
                "id": ids[index],
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "cached_tokens": 0,
                "finish_reason": (
                    {"type": "length", "length": completion.completion_tokens} if done else None
                ),
                "e2e_latency": round(time.monotonic() - started, 6),
            }
            item: dict[str, Any] = {"text": text, "meta_info": meta}
            if batch and stream:
                item["index"] = index
            return item

        with self.generating(completions):
            if not stream:
                await self.think()
                items = [answer(i, c.text, True) for i, c in enumerate(completions)]
                return web.json_response(items if batch else items[0])

            async def events() -> AsyncIterator[dict[str, Any]]:
                for index, completion in enumerate(completions):
                    text = ""
                    sent = 0
                    async for piece in self.stream(completion):
                        text += piece
                        sent += 1
                        yield answer(index, text, sent == len(completion.pieces))

            return await sse(request, events())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's ``POST /v1/completions``."""
        body = await read_json(request)
        prompts, _ = prompt_list(body.get("prompt"), "prompt")
        max_tokens = token_limit(body.get("max_tokens"), "max_tokens")
        stream = streaming(body)
        completions = [self.complete(prompt, max_tokens) for prompt in prompts]
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.options.model,
        }
        usage = self.usage(completions)

        with self.generating(completions):
            if not stream:
                await self.think()
                choices = [
                    {"index": i, "text": c.text, "logprobs": None, "finish_reason": "length"}
                    for i, c in enumerate(completions)
                ]
                return web.json_response({**head, "choices": choices, "usage": usage})

            async def events() -> AsyncIterator[dict[str, Any]]:
                for index, completion in enumerate(completions):
                    async for piece in self.stream(completion):
                        choice = {"index": index, "text": piece, "logprobs": None}
                        yield {**head, "choices": [{**choice, "finish_reason": None}]}
                    choice = {"index": index, "text": "", "logprobs": None}
                    yield {**head, "choices": [{**choice, "finish_reason": "length"}]}
                if self.include_usage(body):
                    yield {**head, "choices": [], "usage": usage}

            return await sse(request, events())

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's ``POST /v1/chat/completions``."""
        body = await read_json(request)
        prompt = chat_prompt(body)
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        completion = self.complete(prompt, token_limit(limit, "max_tokens"))
        stream = streaming(body)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.options.model,
        }
        usage = self.usage([completion])

        with self.generating([completion]):
            if not stream:
                await self.think()
                message = {"role": "assistant", "content": completion.text}
                choice = {"index": 0, "message": message, "logprobs": None}
                return web.json_response(
                    {
                        **head,
                        "object": "chat.completion",
                        "choices": [{**choice, "finish_reason": "length"}],
                        "usage": usage,
                    }
                )

            def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                return {**head, "object": "chat.completion.chunk", "choices": [choice]}

            async def events() -> AsyncIterator[dict[str, Any]]:
                yield chunk({"role": "assistant", "content": ""}, None)
                async for piece in self.stream(completion):
                    yield chunk({"content": piece}, None)
                yield chunk({}, "length")
                if self.include_usage(body):
                    yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}

            return await sse(request, events())

    @staticmethod
    def usage(completions: list[Completion]) -> dict[str, int]:
        prompt = sum(c.prompt_tokens for c in completions)
        completion = sum(c.completion_tokens for c in completions)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    @staticmethod
    def include_usage(body: dict[str, Any]) -> bool:
        options = body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    # -- life ------------------------------------------------------------------------------------

    async def load(self) -> None:
        """Pretend to load the model, then say so on stdout (benchmarks read that line)."""
        if self.options.load_seconds > 0:
            await asyncio.sleep(self.options.load_seconds)
        self.loaded.set()
        self.changed.set()
        say(f"ready_at={time.time():.6f} port={self.options.port}")

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
        """Listen, load in the background, heartbeat, and stop on a signal."""
        quiet_aiohttp_logs()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.on_signal, signum)

        app = web.Application(middlewares=[errors_as_json])
        app.add_routes(self.routes())
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        options = self.options
        try:
            await web.TCPSite(runner, options.host, options.port).start()
        except OSError as exc:
            warn(f"demo worker: cannot listen on {options.host}:{options.port}: {exc.strerror}")
            await runner.cleanup()
            return 1
        say(
            f"demo worker: pid {os.getpid()} serving {options.model!r} "
            f"on http://{options.host}:{options.port} (loading for {options.load_seconds:g} s)"
        )

        tasks = [asyncio.create_task(self.load())]
        target = heartbeat_target() if options.heartbeat else None
        if target is not None:
            tasks.append(asyncio.create_task(self.heartbeat(*target)))
        if options.fail_after is not None:
            tasks.append(asyncio.create_task(self.fail_later(options.fail_after)))
        try:
            await self.stopping.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await runner.cleanup()
        if self.exit_code == 0:
            say("demo worker: stopped")
        return self.exit_code

    # -- heartbeats ------------------------------------------------------------------------------

    async def heartbeat(self, base: str, socket_path: str | None, interval: float) -> None:
        """Report ready or busy to hive every ``interval`` and at once on each change."""
        assert self.worker_id is not None
        url = f"{base}/v1/workers/{quote(self.worker_id, safe='')}/heartbeat"
        headers = {"Authorization": f"Bearer {os.environ.get('HIVE_WORKER_TOKEN', '')}"}
        connector = aiohttp.UnixConnector(path=socket_path) if socket_path else None
        timeout = aiohttp.ClientTimeout(total=min(max(interval, 2.0), 10.0))
        last_error: str | None = None
        told_conflict = False
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await self.loaded.wait()
            while True:
                self.changed.clear()
                beat = {"state": self.state, "in_flight": self.in_flight}
                error: str | None = None
                try:
                    async with session.post(url, json=beat, headers=headers) as response:
                        if response.status == 409:
                            if not told_conflict:
                                say("demo worker: hive says this worker is stopped or failed")
                            told_conflict = True
                        elif response.status >= 300:
                            error = f"HTTP {response.status} {(await response.text())[:200]}"
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                if error is not None and error != last_error:
                    warn(f"demo worker: heartbeat to {url} failed ({error}); retrying")
                elif error is None and last_error is not None:
                    say("demo worker: heartbeats are answered again")
                last_error = error
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), interval)


def heartbeat_target() -> tuple[str, str | None, float] | None:
    """Where heartbeats go, from hive's environment: (base URL, unix socket, interval)."""
    hive_url = os.environ.get("HIVE_URL", "").strip()
    if not hive_url:
        return None
    if not os.environ.get("HIVE_WORKER_ID"):
        warn("demo worker: HIVE_URL is set but HIVE_WORKER_ID is not; not heartbeating")
        return None
    raw = os.environ.get("HIVE_HEARTBEAT_INTERVAL", "")
    try:
        interval = float(raw) if raw else DEFAULT_HEARTBEAT_INTERVAL
    except ValueError:
        interval = -1.0
    if not interval > 0 or interval == float("inf"):
        warn(f"demo worker: HIVE_HEARTBEAT_INTERVAL={raw!r} is not a positive number; using 5")
        interval = DEFAULT_HEARTBEAT_INTERVAL
    if hive_url.startswith("unix://"):
        return "http://localhost", hive_url.removeprefix("unix://"), interval
    return hive_url.rstrip("/"), None, interval


# -- command line ---------------------------------------------------------------------------------


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a non-negative number")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 1 and 65535")
    return value


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m hive.demo_worker",
        description="A real HTTP model server with a fake model: hive's demo backend.",
    )
    parser.add_argument("--port", type=port_number, required=True, help="port to listen on")
    parser.add_argument("--model", required=True, help="model name it answers as")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--load-seconds",
        type=non_negative,
        default=0.0,
        metavar="S",
        help="seconds before /health turns 200 (the port listens meanwhile)",
    )
    parser.add_argument(
        "--latency-ms",
        type=non_negative,
        default=0.0,
        metavar="L",
        help="milliseconds each generation takes",
    )
    parser.add_argument(
        "--fail-after",
        type=non_negative,
        default=None,
        metavar="S",
        help=f"exit with code {EXIT_SIMULATED_FAILURE} after S seconds (a simulated crash)",
    )
    parser.add_argument(
        "--no-heartbeat", action="store_true", help="do not heartbeat, even if HIVE_URL is set"
    )
    args = parser.parse_args(argv)
    return Options(
        host=args.host,
        port=args.port,
        model=args.model,
        load_seconds=args.load_seconds,
        latency_ms=args.latency_ms,
        fail_after=args.fail_after,
        heartbeat=not args.no_heartbeat,
    )


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)

    async def serve() -> int:
        return await DemoWorker(options).run()

    return asyncio.run(serve())


if __name__ == "__main__":
    sys.exit(main())

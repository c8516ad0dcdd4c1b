"""The demo worker: a real HTTP model server with a fake model, so hive runs on any machine.

```
python -m hive.demo_worker --port P --model M [--load-seconds S] [--latency-ms L]
                           [--fail-after S] [--no-heartbeat] [--host H]
```

It speaks enough of SGLang's and OpenAI's HTTP APIs for an ``sglang-router`` to accept it and
route to it: ``/health`` (503 while "loading", then 200), ``/get_model_info``,
``/get_server_info`` (with its pid, its CPU affinity, each thread's allowed CPUs and its
``CUDA_VISIBLE_DEVICES``), ``/v1/models``, ``/generate``, ``/v1/completions`` and
``/v1/chat/completions`` (streaming too). The text it generates is deterministic and names the
worker, so a test can tell which worker answered.

When ``HIVE_URL`` is set (hive sets it), it heartbeats ``ready``/``busy`` with its in-flight count
every ``HIVE_HEARTBEAT_INTERVAL`` seconds and at once on each change between ready and busy.
Once loaded it prints ``ready_at=<unix time> port=<port>`` (benchmarks read it). SIGTERM or
SIGINT: a clean exit with code 0. ``--fail-after S`` exits with code 3 after S seconds, to play a
crash. It imports nothing from hive's daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientSession, ClientTimeout, UnixConnector, web

VERSION = "demo-1"
WORDS = [
    "amber",
    "basalt",
    "cedar",
    "delta",
    "ember",
    "fjord",
    "granite",
    "harbor",
    "indigo",
    "juniper",
    "kelp",
    "lumen",
    "meadow",
    "nimbus",
    "opal",
    "prairie",
    "quartz",
    "river",
    "sierra",
    "tundra",
    "umber",
    "valley",
    "willow",
    "xenon",
    "yarrow",
    "zephyr",
]


@dataclass
class Worker:
    """The fake model server's state."""

    model: str
    host: str
    port: int
    latency: float
    worker_id: str | None = field(default_factory=lambda: os.environ.get("HIVE_WORKER_ID"))
    loaded: bool = False
    in_flight: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def name(self) -> str:
        return f"{self.worker_id or 'demo'}@{self.port}"

    def text(self, prompt: str, max_tokens: int) -> tuple[str, int]:
        """A deterministic completion naming this worker: the same prompt, the same words."""
        digest = hashlib.sha256(f"{self.model}\0{prompt}".encode()).digest()
        count = max(1, min(max_tokens, 256))
        words = [WORDS[digest[i % len(digest)] % len(WORDS)] for i in range(count)]
        return f"[{self.name}] {self.model} says: " + " ".join(words), count

    async def generating(self) -> None:
        """One request in flight for the configured latency; wakes the heartbeat on a change."""
        self.in_flight += 1
        if self.in_flight == 1:
            self.changed.set()
        try:
            if self.latency > 0:
                await asyncio.sleep(self.latency)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.changed.set()


WORKER = web.AppKey("worker", Worker)


def _tokens(text: str) -> int:
    return max(1, len(text.split()))


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status)


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": {"message": "body is not valid JSON", "code": 400}}),
            content_type="application/json",
        ) from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": {"message": "body must be a JSON object", "code": 400}}),
            content_type="application/json",
        )
    return body


def _int(value: Any, default: int) -> int:
    return (
        value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default
    )


# -- info routes ---------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    if not worker.loaded:
        return web.json_response({"status": "loading"}, status=503)
    return web.json_response({"status": "ok"})


async def model_info(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    return web.json_response(
        {
            "model_path": worker.model,
            "tokenizer_path": worker.model,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": "demo",
            "architectures": ["DemoForCausalLM"],
        }
    )


def _thread_cpus() -> dict[str, list[int]]:
    """Each thread's allowed CPUs, as the kernel reports them."""
    threads: dict[str, list[int]] = {}
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/status") as file:
            for line in file:
                if line.startswith("Cpus_allowed_list:"):
                    threads[tid] = _parse_cpu_list(line.split(":", 1)[1].strip())
    return threads


def _parse_cpu_list(text: str) -> list[int]:
    cores: list[int] = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        cores.extend(range(int(first), int(last or first) + 1))
    return cores


async def server_info(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    return web.json_response(
        {
            "model_path": worker.model,
            "tokenizer_path": worker.model,
            "host": worker.host,
            "port": worker.port,
            "pid": os.getpid(),
            "worker_id": worker.worker_id,
            "cpu_affinity": sorted(os.sched_getaffinity(0)),
            "threads": _thread_cpus(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "version": VERSION,
            "max_total_num_tokens": 4096,
            "tp_size": 1,
            "dp_size": 1,
            "disaggregation_mode": "null",
            "internal_states": [{}],
            "loaded": worker.loaded,
            "in_flight": worker.in_flight,
        }
    )


async def models(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    entry = {"id": worker.model, "object": "model", "created": worker.created}
    return web.json_response({"object": "list", "data": [{**entry, "owned_by": "hive-demo"}]})


# -- generation ----------------------------------------------------------------------------------


async def generate(request: web.Request) -> web.StreamResponse:
    """SGLang's native ``/generate``: ``{"text": str | [str], "sampling_params": {...}}``."""
    worker = request.app[WORKER]
    body = await _json(request)
    prompts = body.get("text", body.get("prompt", ""))
    params = body.get("sampling_params") or {}
    max_tokens = _int(params.get("max_new_tokens") if isinstance(params, dict) else None, 16)
    batch = isinstance(prompts, list)
    if not all(isinstance(p, str) for p in (prompts if batch else [prompts])):
        return _error(400, "text must be a string or a list of strings")
    await worker.generating()
    results = []
    for prompt in prompts if batch else [prompts]:
        text, count = worker.text(prompt, max_tokens)
        results.append(
            {
                "text": text,
                "meta_info": {
                    "id": uuid.uuid4().hex,
                    "prompt_tokens": _tokens(prompt),
                    "completion_tokens": count,
                    "finish_reason": {"type": "length", "length": count},
                    "worker": worker.name,
                },
            }
        )
    if body.get("stream") and not batch:
        return await _sse(request, [results[0]])
    return web.json_response(results if batch else results[0])


def _prompt_of(body: dict[str, Any], chat: bool) -> str:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": {"message": "messages: required", "code": 400}}),
                content_type="application/json",
            )
        return "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    prompt = body.get("prompt", "")
    return " ".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, chat=True)


async def _openai(request: web.Request, chat: bool) -> web.StreamResponse:
    worker = request.app[WORKER]
    body = await _json(request)
    prompt = _prompt_of(body, chat)
    max_tokens = _int(body.get("max_tokens", body.get("max_completion_tokens")), 16)
    await worker.generating()
    text, count = worker.text(prompt, max_tokens)
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    base = {"id": ident, "created": int(time.time()), "model": body.get("model") or worker.model}
    usage = {
        "prompt_tokens": _tokens(prompt),
        "completion_tokens": count,
        "total_tokens": _tokens(prompt) + count,
    }
    if body.get("stream"):
        kind = "chat.completion.chunk" if chat else "text_completion"
        chunks = []
        pieces = text.split(" ")
        for i, piece in enumerate(pieces):
            piece = piece if i == 0 else " " + piece
            last = i == len(pieces) - 1
            delta: dict[str, Any] = (
                {"delta": {"role": "assistant", "content": piece} if i == 0 else {"content": piece}}
                if chat
                else {"text": piece}
            )
            chunks.append(
                {
                    **base,
                    "object": kind,
                    "choices": [{"index": 0, **delta, "finish_reason": "length" if last else None}],
                }
            )
        return await _sse(request, chunks)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None}
        kind = "text_completion"
    choice["finish_reason"] = "length"
    return web.json_response({**base, "object": kind, "choices": [choice], "usage": usage})


async def _sse(request: web.Request, chunks: list[dict[str, Any]]) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    for chunk in chunks:
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def create_app(worker: Worker) -> web.Application:
    app = web.Application()
    app[WORKER] = worker
    for path, handler in (
        ("/health", health),
        ("/health_generate", health),
        ("/get_model_info", model_info),
        ("/model_info", model_info),
        ("/get_server_info", server_info),
        ("/server_info", server_info),
        ("/v1/models", models),
    ):
        app.router.add_get(path, handler)
    app.router.add_post("/generate", generate)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


# -- heartbeats ----------------------------------------------------------------------------------


async def heartbeat(worker: Worker, url: str, token: str, interval: float) -> None:
    """Tell hive ``ready``/``busy`` every ``interval`` s and at once on each change."""
    if url.startswith("unix://"):
        connector: Any = UnixConnector(path=url.removeprefix("unix://"))
        base = "http://localhost"
    else:
        connector, base = None, url.rstrip("/")
    target = f"{base}/v1/workers/{worker.worker_id}/heartbeat"
    headers = {"Authorization": f"Bearer {token}"}
    async with ClientSession(
        connector=connector, headers=headers, timeout=ClientTimeout(total=5)
    ) as session:
        while True:
            worker.changed.clear()
            state = "busy" if worker.in_flight > 0 else "ready"
            try:
                body = {"state": state, "in_flight": worker.in_flight}
                async with session.post(target, json=body) as response:
                    if response.status >= 400 and response.status != 409:
                        _say(f"heartbeat refused: HTTP {response.status}", sys.stderr)
            except (OSError, TimeoutError, Exception) as exc:  # keep serving whatever happens
                if isinstance(exc, asyncio.CancelledError):
                    raise
                _say(f"heartbeat failed: {exc!r}", sys.stderr)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.changed.wait(), interval)


# -- running -------------------------------------------------------------------------------------


def _say(text: str, stream: Any = sys.stdout) -> None:
    print(f"demo worker: {text}", file=stream, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hive.demo_worker", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--load-seconds", type=float, default=0.0, help="time to 'load' the model")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="time per generation")
    parser.add_argument("--fail-after", type=float, help="exit with code 3 after this many s")
    parser.add_argument("--no-heartbeat", action="store_true", help="never heartbeat to hive")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    worker = Worker(args.model, args.host, args.port, args.latency_ms / 1000)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(create_app(worker), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, args.host, args.port).start()
    except OSError as exc:
        _say(f"cannot listen on {args.host}:{args.port}: {exc.strerror}", sys.stderr)
        await runner.cleanup()
        return 1
    _say(f"serving {args.model} on http://{args.host}:{args.port} (pid {os.getpid()})")
    tasks: list[asyncio.Task[Any]] = []
    failed = asyncio.Event()

    async def load() -> None:
        if args.fail_after is not None and args.fail_after <= args.load_seconds:
            return  # the simulated failure comes before the model is ever loaded
        if args.load_seconds > 0:
            await asyncio.sleep(args.load_seconds)
        worker.loaded = True
        print(f"ready_at={time.time():.6f} port={args.port}", flush=True)
        hive_url = os.environ.get("HIVE_URL")
        if hive_url and worker.worker_id and not args.no_heartbeat:
            interval = float(os.environ.get("HIVE_HEARTBEAT_INTERVAL") or 5)
            token = os.environ.get("HIVE_WORKER_TOKEN", "")
            tasks.append(asyncio.create_task(heartbeat(worker, hive_url, token, interval)))

    async def fail_later(seconds: float) -> None:
        await asyncio.sleep(seconds)
        _say(f"simulated failure after {seconds:g} s", sys.stderr)
        failed.set()
        stop.set()

    tasks.append(asyncio.create_task(load()))
    if args.fail_after is not None:
        tasks.append(asyncio.create_task(fail_later(args.fail_after)))
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if failed.is_set():
        return 3
    await runner.cleanup()
    _say("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

"""SGLang's native routes: ``POST /generate``, ``GET /get_load``, ``GET /v1/loads`` and
``POST /flush_cache``.

Same shapes as an SGLang server, so that an sglang-router can drive the demo worker: ``/generate``
takes ``text`` (or ``input_ids``), one prompt or a batch, and streams as Server-Sent Events when
asked; ``/get_load`` is what a router's power-of-two policy reads; ``/flush_cache`` lets a
router's fan-out succeed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from hive.demo_worker.http import (
    BadRequest,
    prompt_list,
    read_json,
    sse,
    streaming,
    token_limit,
)

if TYPE_CHECKING:
    from hive.demo_worker.server import DemoWorker


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


class SGLangRoutes:
    """The SGLang-native routes of one worker."""

    def __init__(self, worker: DemoWorker) -> None:
        self.worker = worker

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/get_load", self.load_report),
            web.get("/v1/loads", self.loads),
            web.post("/flush_cache", self.flush_cache),
            web.post("/generate", self.generate),
        ]

    async def load_report(self, request: web.Request) -> web.Response:
        """SGLang's ``/get_load``, one entry per data-parallel rank: what power-of-two reads."""
        return web.json_response(
            [
                {
                    "dp_rank": 0,
                    "num_reqs": self.worker.in_flight,
                    "num_waiting_reqs": 0,
                    "num_tokens": self.worker.tokens_in_flight,
                }
            ]
        )

    async def loads(self, request: web.Request) -> web.Response:
        """SGLang 0.5's ``/v1/loads`` (its core fields): what hive reads as the engine's load."""
        worker = self.worker
        core = {
            "dp_rank": 0,
            "num_running_reqs": worker.in_flight,
            "num_waiting_reqs": 0,
            "num_used_tokens": worker.tokens_in_flight,
        }
        return web.json_response(
            {"version": "demo", "num_accelerators": 0, "loads": [core]},
        )

    async def flush_cache(self, request: web.Request) -> web.Response:
        """The fake model has no cache; a router's fan-out flush succeeds."""
        return web.Response(text="Cache flushed.\n")

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """SGLang's native ``POST /generate``."""
        worker = self.worker
        body = await read_json(request)
        prompts, batch = native_prompts(body)
        params = body.get("sampling_params") or {}
        if not isinstance(params, dict):
            raise BadRequest("sampling_params: must be an object")
        max_tokens = token_limit(params.get("max_new_tokens"), "sampling_params.max_new_tokens")
        stream = streaming(body)
        completions = [worker.complete(prompt, max_tokens) for prompt in prompts]
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

        with worker.generating(completions):
            if not stream:
                await worker.think()
                items = [answer(i, c.text, True) for i, c in enumerate(completions)]
                return web.json_response(items if batch else items[0])

            async def events() -> AsyncIterator[dict[str, Any]]:
                for index, completion in enumerate(completions):
                    text = ""
                    sent = 0
                    async for piece in worker.stream(completion):
                        text += piece
                        sent += 1
                        yield answer(index, text, sent == len(completion.pieces))

            return await sse(request, events())

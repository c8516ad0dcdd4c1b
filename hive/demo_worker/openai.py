"""OpenAI's routes: ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``.

Same shapes as an OpenAI-compatible server (SGLang's among them), so that any OpenAI client can
drive the demo worker; ``"stream": true`` answers as Server-Sent Events, with a usage chunk at
the end when ``stream_options.include_usage`` asks for one.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from hive.demo_worker.http import BadRequest, prompt_list, read_json, sse, streaming, token_limit
from hive.demo_worker.model import Completion

if TYPE_CHECKING:
    from hive.demo_worker.server import DemoWorker

#: The ``owned_by`` of the model ``/v1/models`` lists.
OWNER = "hive-demo"


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


def usage_of(completions: list[Completion]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in completions)
    completion = sum(c.completion_tokens for c in completions)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class OpenAIRoutes:
    """The OpenAI-compatible routes of one worker."""

    def __init__(self, worker: DemoWorker) -> None:
        self.worker = worker

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/models", self.models),
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
        ]

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.worker.options.model,
                        "object": "model",
                        "created": self.worker.created,
                        "owned_by": OWNER,
                    }
                ],
            }
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's ``POST /v1/completions``."""
        worker = self.worker
        body = await read_json(request)
        prompts, _ = prompt_list(body.get("prompt"), "prompt")
        max_tokens = token_limit(body.get("max_tokens"), "max_tokens")
        stream = streaming(body)
        completions = [worker.complete(prompt, max_tokens) for prompt in prompts]
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": worker.options.model,
        }
        usage = usage_of(completions)

        with worker.generating(completions):
            if not stream:
                await worker.think()
                choices = [
                    {"index": i, "text": c.text, "logprobs": None, "finish_reason": "length"}
                    for i, c in enumerate(completions)
                ]
                return web.json_response({**head, "choices": choices, "usage": usage})

            async def events() -> AsyncIterator[dict[str, Any]]:
                for index, completion in enumerate(completions):
                    async for piece in worker.stream(completion):
                        choice = {"index": index, "text": piece, "logprobs": None}
                        yield {**head, "choices": [{**choice, "finish_reason": None}]}
                    choice = {"index": index, "text": "", "logprobs": None}
                    yield {**head, "choices": [{**choice, "finish_reason": "length"}]}
                if include_usage(body):
                    yield {**head, "choices": [], "usage": usage}

            return await sse(request, events())

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's ``POST /v1/chat/completions``."""
        worker = self.worker
        body = await read_json(request)
        prompt = chat_prompt(body)
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        completion = worker.complete(prompt, token_limit(limit, "max_tokens"))
        stream = streaming(body)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": worker.options.model,
        }
        usage = usage_of([completion])

        with worker.generating([completion]):
            if not stream:
                await worker.think()
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
                async for piece in worker.stream(completion):
                    yield chunk({"content": piece}, None)
                yield chunk({}, "length")
                if include_usage(body):
                    yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}

            return await sse(request, events())

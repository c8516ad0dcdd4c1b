"""sglang-router's worker API, as hive uses it (checked against sglang-router 0.3.2).

``POST /workers`` answers 202 and registers the worker in the background: the worker is in the
router only once that job has finished, and the job can fail (the router's health check of the
worker, which it retries for up to ``--worker-startup-timeout-secs``, 30 minutes by default, in
one of only ten job slots). ``GET /workers/{id}`` says how the job goes (``job_status``) until the
worker is listed. ``DELETE /workers/{id}`` is a job too. See docs/fleet.md for each field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from hive.config import BackendConfig, RouterConfig
from hive.errors import RouterError
from hive.models import Worker


@dataclass(frozen=True, slots=True)
class Listed:
    id: str
    url: str


@dataclass(frozen=True, slots=True)
class JobState:
    """Where the router's job for one worker stands."""

    state: Literal["pending", "registered", "failed", "gone"]
    message: str = ""


def registration(
    url: str, worker: Worker, backend: BackendConfig | None, api_key: str | None
) -> dict[str, Any]:
    """The body of ``POST /workers`` for ``worker``, reachable at ``url``.

    The router's own health check of a new worker is kept, with a short timeout, only where it
    can work: the backend's health path is the router's (``/health``). Elsewhere hive, which
    has seen the worker ready, tells the router not to check, so that a job cannot fail for
    30 minutes against a path the engine does not serve (and hive removes a dead worker itself,
    within milliseconds).
    """
    body: dict[str, Any] = {
        "url": url,
        "model_id": worker.model,
        "labels": {**worker.labels, "hive_worker": worker.id},
        "worker_type": worker.role,
        "priority": worker.priority,
        "cost": worker.cost,
    }
    if worker.role == "prefill" and worker.bootstrap_port is not None:
        body["bootstrap_port"] = worker.bootstrap_port
    if api_key:
        body["api_key"] = api_key
    check = backend.router_health_check if backend is not None else None
    if check is None:
        check = backend is not None and backend.health_path == "/health"
    if check:
        body["health_check_timeout_secs"] = 5
    else:
        body["disable_health_check"] = True
    return body


class SglangRouter:
    """``POST /workers``, ``GET /workers[/{id}]``, ``DELETE /workers/{id}``."""

    def __init__(self, config: RouterConfig, session: aiohttp.ClientSession) -> None:
        self.base = config.url.rstrip("/")
        self.session = session
        self.headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            async with self.session.request(
                method, self.base + path, json=body, headers=self.headers
            ) as response:
                text = await response.text()
                if response.status >= 400:
                    raise RouterError(
                        f"{method} {path}: HTTP {response.status}: {text[:200]}", response.status
                    )
                return await response.json(content_type=None) if text else None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise RouterError(f"{method} {path}: {exc or type(exc).__name__}") from None

    async def list(self) -> list[Listed]:
        body = await self._call("GET", "/workers")
        return [Listed(str(w["id"]), str(w["url"])) for w in (body or {}).get("workers", [])]

    async def add(self, body: dict[str, Any]) -> str:
        """Queue the registration; the router's id for the worker."""
        answer = await self._call("POST", "/workers", body)
        if not isinstance(answer, dict) or "worker_id" not in answer:
            raise RouterError(f"POST /workers: no worker_id in the answer: {str(answer)[:200]}")
        return str(answer["worker_id"])

    async def job(self, router_id: str) -> JobState:
        """How the router's job for this worker stands."""
        try:
            body = await self._call("GET", f"/workers/{router_id}")
        except RouterError as exc:
            if exc.status == 404:
                return JobState("gone")
            raise
        status = body.get("job_status") if isinstance(body, dict) else None
        if not isinstance(status, dict):
            return JobState("registered")
        if status.get("status") == "failed":
            return JobState("failed", str(status.get("message") or "the router's job failed"))
        return JobState("pending", str(status.get("message") or ""))

    async def remove(self, router_id: str) -> None:
        await self._call("DELETE", f"/workers/{router_id}")

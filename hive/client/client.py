"""An async client for hive's HTTP API, used by the ``hive`` CLI and by orchestrators.

```python
async with HiveClient("http://10.0.0.5:7070", token="...") as hive:
    worker = await hive.spawn({"model": "qwen", "backend": "vllm"}, wait="ready")
    for w in await hive.list_workers(state="ready"):
        print(w.id, w.url)
    await hive.stop(worker.id, wait=True)
```

``url`` is ``http://HOST:PORT`` or ``unix:///path/to/hive.sock``. Every failure raises
:class:`HiveAPIError` (hive answered with an error) or :class:`HiveConnectionError` (no answer).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import SplitResult, urlsplit

import aiohttp

from hive.client import reasons
from hive.client.sse import SSEParser
from hive.config import Config, ConfigError, load_config
from hive.models import (
    ApplyResult,
    Devices,
    Health,
    Node,
    SpawnRequest,
    Worker,
    WorkerList,
)
from hive.tlsfiles import client_context

#: A :class:`HiveConnectionError`'s reason when a followed stream (logs, events) is cut.
CLOSED_MID_STREAM = "the connection closed"

_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10, sock_read=None)


class HiveClientError(Exception):
    """Base of the client's errors."""


class HiveConnectionError(HiveClientError):
    """hive could not be reached at ``url``; ``reason`` says why (``connection refused``).
    ``maybe_down``: what a hive that is not running gives (refused, no socket, no answer), as
    opposed to a TLS handshake gone wrong, a closed connection or a name that does not resolve,
    where "is hive running?" is not the question."""

    def __init__(self, url: str, reason: str, maybe_down: bool = True) -> None:
        super().__init__(f"cannot reach hive at {url}: {reason}")
        self.url, self.reason, self.maybe_down = url, reason, maybe_down


class HiveNotHiveError(HiveClientError):
    """What answers at ``url`` is not hive: it sent an HTML page, or no JSON where hive always
    sends it. One sentence, whatever the page held."""

    def __init__(
        self, url: str, request: str, status: int, what: str, expected: str = "JSON"
    ) -> None:
        super().__init__(
            f"{url} is not hive: it answered {request} with {what} (HTTP {status}), "
            f"where hive answers {expected}"
        )
        self.url, self.status = url, status


class HiveURLError(HiveClientError, ValueError):
    """A URL that is not one of the forms hive answers on (see :data:`URL_FORMS`)."""


def _valid_port(parts: SplitResult) -> bool:
    try:
        return parts.port is None or parts.port > 0
    except ValueError:  # not a number, or over 65535
        return False


#: The forms of hive's URL, as a sentence.
URL_FORMS = "http://HOST:PORT, https://HOST:PORT or unix:///path/to/hive.sock"


def check_url(url: str) -> str:
    """``url`` if hive could be reached there, else :class:`HiveURLError` saying what is allowed."""
    parts = urlsplit(url)
    if parts.scheme == "unix" and url.removeprefix("unix://"):
        return url
    if parts.scheme in ("http", "https") and parts.hostname and _valid_port(parts):
        return url
    raise HiveURLError(f"{url!r} is not a hive URL: use {URL_FORMS}")


class HiveAPIError(HiveClientError):
    """hive answered with an error: ``status``, ``code``, ``message`` and maybe a ``worker``."""

    def __init__(self, status: int, code: str, message: str, worker: Worker | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.worker = status, code, message, worker


def default_url(config: Config | None = None) -> str:
    """``$HIVE_URL``, else the unix socket if it exists, else the configured TCP address
    (:attr:`Config.api_url <hive.config.Config.api_url>`: ``https://`` with TLS, a wildcard
    ``listen`` as loopback, an IPv6 address in brackets)."""
    return default_url_from(config)[0]


def default_url_from(config: Config | None = None) -> tuple[str, str]:
    """:func:`default_url`, and where it comes from: ``HIVE_URL``, or ``""`` for hive's own
    default (the socket, then ``listen``). The one place the CLI and the client choose it."""
    if env := os.environ.get("HIVE_URL"):
        return env, "HIVE_URL"
    config = config or local_config()
    if config.socket_path.exists():
        return f"unix://{config.socket_path}", ""
    return config.api_url, ""


def default_token(config: Config | None = None) -> str | None:
    """``$HIVE_TOKEN``, else the configured token, else the token file if readable."""
    if env := os.environ.get("HIVE_TOKEN"):
        return env
    config = config or local_config()
    if config.token:
        return config.token
    try:
        return config.token_path.read_text().strip() or None
    except OSError:
        return None


def local_config() -> Config:
    """This host's configuration as the client reads it: every default when it cannot be read."""
    try:
        return load_config()
    except ConfigError:
        return Config()


class HiveClient:
    """One connection pool to one hive. Use it as an async context manager."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        """``ca_file``: the CA that signed hive's certificate (``https://``; default: the
        system's); ``cert_file``/``key_file``: this client's certificate, for mutual TLS. A file
        that cannot be used is a :class:`hive.tlsfiles.TLSFileError` (a ValueError) naming it."""
        self.url = check_url(url or default_url())
        self.token = token if token is not None else default_token()
        self._tls: ssl.SSLContext | None = None
        self._ca_file = ca_file
        self._cert_file = cert_file
        if self.url.startswith("https://") and (ca_file or cert_file):
            self._tls = client_context(ca_file, cert_file or None, key_file)
        if self.url.startswith("unix://"):
            self._socket: str | None = self.url.removeprefix("unix://")
            self._base = "http://hive"
        else:
            self._socket = None
            self._base = self.url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HiveClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = (
                aiohttp.UnixConnector(path=self._socket)
                if self._socket
                else aiohttp.TCPConnector(ssl=self._tls if self._tls is not None else True)
            )
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._session = aiohttp.ClientSession(
                connector=connector, headers=headers, timeout=_TIMEOUT
            )
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
    ) -> tuple[int, Any]:
        query: list[tuple[str, str]] = []
        for key, value in (params or {}).items():
            if isinstance(value, list):
                query.extend((key, str(item)) for item in value)
            elif value is not None:
                query.append((key, _param(value)))
        try:
            async with self._http().request(
                method, self._base + path, params=query, json=json
            ) as response:
                body = await self._body(response, f"{method} {path}")
                if response.status >= 400:
                    raise _api_error(response.status, body)
                return response.status, body
        except aiohttp.ClientConnectionError as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: aiohttp.ClientConnectionError) -> HiveConnectionError:
        reason = reasons.reason(exc, self.url, self._ca_file, self._cert_file)
        other = (aiohttp.ClientSSLError, aiohttp.ClientConnectorCertificateError)
        down = isinstance(exc, aiohttp.ClientConnectorError) and not isinstance(exc, other)
        down = down and not isinstance(getattr(exc, "os_error", None), socket.gaierror)
        return HiveConnectionError(self.url, reason, maybe_down=down)

    async def _body(self, response: aiohttp.ClientResponse, request: str) -> Any:
        """JSON, or text where hive sends text (logs); an HTML page, JSON that does not parse,
        or an error without hive's JSON is :class:`HiveNotHiveError`."""
        kind = response.content_type
        if kind == "application/json":
            try:
                body = await response.json()
            except ValueError:
                raise HiveNotHiveError(self.url, request, response.status, "broken JSON") from None
            if response.status >= 400 and not reasons.hive_error(body):  # a model server's, say
                what = f"an error of another program ({reasons.other_error(body)})"
                raise HiveNotHiveError(self.url, request, response.status, what, "its own errors")
            return body
        if kind == "text/html" or response.status >= 400:
            what = "an HTML page" if kind == "text/html" else kind or "a body of no type"
            raise HiveNotHiveError(self.url, request, response.status, what)
        return await response.text()

    # -- the API ---------------------------------------------------------------------------

    async def health(self) -> Health:
        return Health.model_validate((await self._request("GET", "/health"))[1])

    async def node(self) -> Node:
        return Node.model_validate((await self._request("GET", "/v1/node"))[1])

    async def devices(self) -> Devices:
        return Devices.model_validate((await self._request("GET", "/v1/devices"))[1])

    async def list_workers(
        self,
        *,
        state: str | None = None,
        model: str | None = None,
        device: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[Worker]:
        params: dict[str, Any] = {"state": state, "model": model, "device": device}
        if labels:
            params["label"] = [f"{k}={v}" for k, v in labels.items()]
        _, body = await self._request("GET", "/v1/workers", params=params)
        return WorkerList.model_validate(body).workers

    async def get(self, worker_id: str) -> Worker:
        return Worker.model_validate((await self._request("GET", f"/v1/workers/{worker_id}"))[1])

    async def spawn(
        self,
        spec: SpawnRequest | Mapping[str, Any],
        *,
        wait: str | None = None,
        timeout: float | None = None,
    ) -> Worker:
        """Spawn a worker; with ``wait="ready"`` return once it is ready (or raise if it failed)."""
        if isinstance(spec, SpawnRequest):
            body = spec.model_dump(exclude_none=True, by_alias=True)
        else:
            body = dict(spec)
        params = {"wait": wait, "timeout": timeout}
        _, data = await self._request("POST", "/v1/workers", params=params, json=body)
        return Worker.model_validate(data)

    async def stop(
        self, worker_id: str, *, timeout: float | None = None, wait: bool = False
    ) -> Worker:
        params = {"timeout": timeout, "wait": wait or None}
        _, data = await self._request("POST", f"/v1/workers/{worker_id}/stop", params=params)
        return Worker.model_validate(data)

    async def restart(self, worker_id: str) -> Worker:
        _, data = await self._request("POST", f"/v1/workers/{worker_id}/restart")
        return Worker.model_validate(data)

    async def delete(self, worker_id: str) -> Worker:
        _, data = await self._request("DELETE", f"/v1/workers/{worker_id}")
        return Worker.model_validate(data)

    async def replace(
        self,
        worker_id: str,
        changes: Mapping[str, Any],
        *,
        in_place: bool = False,
        timeout: float | None = None,
    ) -> Worker:
        """Replace a worker by a successor with ``changes`` (spawn fields); returns once the
        successor has taken over (or raises, the old worker left as it was)."""
        params = {"in_place": in_place or None, "timeout": timeout}
        _, data = await self._request(
            "POST", f"/v1/workers/{worker_id}/replace", params=params, json=dict(changes)
        )
        return Worker.model_validate(data)

    async def apply(
        self,
        workers: list[Mapping[str, Any]],
        *,
        prune: bool = False,
        dry_run: bool = False,
        source: str = "api",
        force: bool = False,
    ) -> ApplyResult:
        """Make the workers match ``workers`` (declared spawn requests with ids). A ``prune``
        that would remove every worker, or workers this ``source`` did not declare, is refused
        (422) unless ``force``."""
        body = {"workers": workers, "prune": prune, "dry_run": dry_run, "source": source}
        if force:
            body["force"] = True
        _, data = await self._request("POST", "/v1/apply", json=body)
        return ApplyResult.model_validate(data)

    async def heartbeat(self, worker_id: str, state: str, in_flight: int | None = None) -> Worker:
        body = {"state": state, "in_flight": in_flight}
        _, data = await self._request("POST", f"/v1/workers/{worker_id}/heartbeat", json=body)
        return Worker.model_validate(data)

    async def logs(self, worker_id: str, tail: int = 100) -> str:
        _, text = await self._request("GET", f"/v1/workers/{worker_id}/logs", params={"tail": tail})
        return str(text)

    async def follow_logs(self, worker_id: str, tail: int = 100) -> AsyncIterator[bytes]:
        """The last ``tail`` lines, then new output as it is written, until the worker ends."""
        url = f"{self._base}/v1/workers/{worker_id}/logs"
        try:
            async with self._http().get(
                url, params={"tail": str(tail), "follow": "true"}
            ) as response:
                if response.status >= 400 or response.content_type == "text/html":
                    body = await self._body(response, f"GET {url.removeprefix(self._base)}")
                    raise _api_error(response.status, body)
                async for chunk in response.content.iter_any():
                    yield chunk
        except aiohttp.ClientConnectionError as exc:
            raise self._unreachable(exc) from None
        except aiohttp.ClientPayloadError:  # hive stopped or died mid-stream
            raise HiveConnectionError(self.url, CLOSED_MID_STREAM) from None

    async def events(self, last_event_id: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Follow ``/v1/events``: each change as ``{seq, at, id, from, to, worker}``, in order,
        with ``event_id``, the stream's id for it (``<instance>-<seq>``).

        Pass the ``event_id`` of the last event you handled as ``last_event_id`` to resume
        after a lost connection, across a restart of hive too. When hive cannot replay what you
        missed (it restarted since, or no longer holds those events), an event with
        ``{"reset": true, "oldest": seq, "instance": ...}`` comes first: forget the workers you
        knew; the current state follows, one event per worker (``"snapshot": true``), then the
        changes live.
        """
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
        try:
            async with self._http().get(f"{self._base}/v1/events", headers=headers) as response:
                if response.status >= 400:
                    raise _api_error(response.status, await self._body(response, "GET /v1/events"))
                if response.content_type != "text/event-stream":
                    what = response.content_type or "a body of no type"
                    raise HiveNotHiveError(
                        self.url, "GET /v1/events", response.status, what, "an event stream"
                    )
                parser = SSEParser()
                async for raw in response.content:
                    for event in parser.feed(raw):
                        if event.data:
                            data = {**json.loads(event.data), "event_id": event.id}
                            yield {"reset": True, **data} if event.event == "reset" else data
        except aiohttp.ClientConnectionError as exc:
            raise self._unreachable(exc) from None
        except aiohttp.ClientPayloadError:  # hive stopped or died mid-stream
            raise HiveConnectionError(self.url, CLOSED_MID_STREAM) from None


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _api_error(status: int, body: Any) -> HiveAPIError:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        worker = Worker.model_validate(error["worker"]) if error.get("worker") else None
        return HiveAPIError(status, error.get("code", "?"), error.get("message", ""), worker)
    return HiveAPIError(status, "http", f"HTTP {status}: {str(body)[:200]}")

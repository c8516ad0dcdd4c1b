"""A small etcd v3 client over etcd's own JSON gateway (``/v3/...``), on aiohttp.

The maintained Python etcd clients are synchronous gRPC wrappers or abandoned; the gateway is part
of every etcd server (3.4 and later), speaks JSON over HTTP/1.1, and needs nothing but the
aiohttp hive already runs on. Keys and values travel base64-encoded, as the gateway wants.
What hive needs: leases (grant, keep alive, revoke), put and delete (in transactions of up to
100 operations, optionally only while a key is under a given lease), a key created only if it is
absent, a range over a prefix with its revision, and a watch from a revision.

Keys are bytes in etcd. Here they are ``str``, decoded from UTF-8 with ``surrogateescape``: a
key that is not UTF-8 still comes through, and goes back to etcd as the same bytes, but
:func:`readable` says it is not text, so that a caller can skip it rather than fail on it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from hive.errors import Compacted, EtcdError

#: etcd refuses transactions of more than 128 operations by default.
TXN_OPS = 100
#: The longest watch message read (one line of the gateway's stream); etcd sends all the events
#: of up to 1,000 revisions in one, which after a while away can be many megabytes. Past this
#: the watch ends, and its caller reads the whole set instead.
MAX_WATCH_MESSAGE = 64 * 1024 * 1024


def _b64(text: str | bytes) -> str:
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    return base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text or "")


def _key(raw: str | None) -> str:
    """A key as etcd sent it (base64), as text; bytes that are not UTF-8 kept as surrogates."""
    return _unb64(raw).decode("utf-8", "surrogateescape")


def readable(key: str) -> bool:
    """Whether ``key`` is text (UTF-8 in etcd), not bytes kept as surrogates."""
    try:
        key.encode()
    except UnicodeEncodeError:
        return False
    return True


def shown(key: str) -> str:
    """``key`` for a log line: bytes that are not UTF-8 as ``\\xff``."""
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def prefix_end(prefix: str) -> str:
    """The end of the range of every key that starts with ``prefix`` (its last byte + 1)."""
    data = bytearray(prefix.encode())
    data[-1] += 1
    return data.decode()


@dataclass(frozen=True, slots=True)
class Event:
    """One change under a watched prefix: ``put`` (with the value) or ``delete``."""

    kind: str
    key: str
    value: bytes
    revision: int


def unreachable_reason(exc: Exception) -> str:
    """Why a request to an etcd member got no answer, in words (``connection refused``), not
    aiohttp's class name and its repr of the socket's error."""
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, json.JSONDecodeError):
        return "what answers there is not etcd (no JSON from its /v3/ gateway)"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        error = exc.certificate_error
        detail = getattr(error, "verify_message", None) or getattr(error, "reason", None) or error
        return f"its certificate is not trusted ({detail})"
    if isinstance(exc, aiohttp.ClientSSLError):
        error = getattr(exc, "os_error", None)
        return f"TLS failed ({getattr(error, 'reason', None) or error or exc})"
    if isinstance(exc, aiohttp.ClientConnectorError):
        error = exc.os_error
        if isinstance(error, socket.gaierror):
            return f"cannot resolve the name {exc.host!r}"
        if error.errno:
            return os.strerror(error.errno).lower()
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "it closed the connection without answering"
    return str(exc) or type(exc).__name__


#: How the error of a request no member answered begins.
UNREACHABLE = "etcd unreachable: "

#: What an etcd member answers while its cluster elects a leader: worth trying again soon.
_ELECTING = ("leader changed", "no leader")


class Etcd:
    """One etcd cluster, by its client URLs (tried in turn until one answers)."""

    def __init__(self, endpoints: Sequence[str], ssl_context: ssl.SSLContext | None = None) -> None:
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._current = 0

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True),
                timeout=aiohttp.ClientTimeout(total=None, connect=3, sock_read=None),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, path: str, body: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """POST one gateway request, trying each endpoint from the one that last answered.

        A member that answers while its cluster elects a leader (``leader changed``, ``no
        leader``) is passed over like one that does not answer, and the round is tried again
        twice, a quarter and a half second later: the election takes about that long. Every
        request hive sends is safe to send again (a put of the same value, a transaction whose
        compare fails once applied, a lease that expires unused)."""
        errors: list[str] = []
        for round_ in range(3):
            if round_:
                await asyncio.sleep(0.25 * round_)
            for i in range(len(self.endpoints)):
                index = (self._current + i) % len(self.endpoints)
                url = f"{self.endpoints[index]}{path}"
                try:
                    async with self._http().post(
                        url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)
                    ) as response:
                        data = await response.json(content_type=None)
                        if not isinstance(data, dict):
                            raise EtcdError(
                                f"{url}: what answers there is not etcd (HTTP "
                                f"{response.status}, no JSON object)"
                            )
                        if response.status >= 400:
                            message = data.get("message") or data.get("error") or response.reason
                            if not isinstance(message, str):  # not etcd's {"message": "..."}
                                message = f"what answers there is not etcd (HTTP {response.status})"
                            if any(word in str(message) for word in _ELECTING):
                                errors.append(f"{url}: {message}")
                                continue
                            raise EtcdError(f"{url}: {message}")
                        self._current = index
                        return dict(data)
                except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
                    errors.append(f"{self.endpoints[index]}: {unreachable_reason(exc)}")
            if not any(any(word in e for word in _ELECTING) for e in errors):
                break  # nobody is electing: unreachable, and waiting will not help now
        raise EtcdError(UNREACHABLE + "; ".join(errors[-len(self.endpoints) :]))

    # -- leases ----------------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        data = await self.call("/v3/lease/grant", {"TTL": ttl})
        return int(data["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew ``lease``; its remaining TTL, 0 when etcd no longer has it."""
        data = await self.call("/v3/lease/keepalive", {"ID": lease})
        return int(data.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        await self.call("/v3/lease/revoke", {"ID": lease})

    # -- keys ------------------------------------------------------------------------------------

    async def put(self, key: str, value: str, lease: int | None = None) -> None:
        await self.txn([put_op(key, value, lease)])

    async def delete(self, key: str) -> None:
        await self.txn([delete_op(key)])

    async def txn(self, ops: list[dict[str, Any]], held: tuple[str, int] | None = None) -> bool:
        """Apply ``ops`` (from :func:`put_op` and :func:`delete_op`), 100 to a transaction.

        With ``held`` (a key and a lease), each transaction applies only while that key is
        under that lease: False, and nothing more applied, when it was not."""
        compare = []
        if held is not None:
            key, lease = held
            compare = [{"key": _b64(key), "target": "LEASE", "result": "EQUAL", "lease": lease}]
        for start in range(0, len(ops), TXN_OPS):
            body = {"compare": compare, "success": ops[start : start + TXN_OPS]}
            data = await self.call("/v3/kv/txn", body)
            if compare and not data.get("succeeded"):
                return False
        return True

    async def create(self, key: str, value: str, lease: int) -> tuple[bool, bytes, int]:
        """Put ``key`` under ``lease`` only if no one has it, in one transaction: whether it was
        created, and else the value and lease it has (``b""`` and 0 if it went meanwhile)."""
        data = await self.call(
            "/v3/kv/txn",
            {
                "compare": [
                    {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": 0}
                ],
                "success": [put_op(key, value, lease)],
                "failure": [{"request_range": {"key": _b64(key)}}],
            },
        )
        if data.get("succeeded"):
            return True, value.encode(), lease
        responses = data.get("responses") or [{}]
        kvs = responses[0].get("response_range", {}).get("kvs") or [{}]
        return False, _unb64(kvs[0].get("value")), int(kvs[0].get("lease", 0) or 0)

    async def range(self, prefix: str) -> tuple[int, dict[str, bytes]]:
        """Every key under ``prefix`` and its value, with the revision they are at."""
        data = await self.call(
            "/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))}
        )
        revision = int(data.get("header", {}).get("revision", 0))
        kvs = {_key(kv["key"]): _unb64(kv.get("value")) for kv in data.get("kvs", [])}
        return revision, kvs

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[Event]]:
        """Each batch of changes under ``prefix`` from ``start_revision`` on, as etcd sends them.

        Ends (raises :class:`EtcdError`) when the connection drops, etcd cancels the watch or a
        message is over :data:`MAX_WATCH_MESSAGE`; :class:`Compacted` when ``start_revision`` is
        older than what etcd keeps. Messages are read whole, however long (aiohttp's own line
        reader stops at 128 KiB with a ``ValueError``)."""
        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _b64(prefix_end(prefix)),
                "start_revision": start_revision,
            }
        }
        url = f"{self.endpoints[self._current]}/v3/watch"
        try:
            async with self._http().post(url, json=body) as response:
                if response.status >= 400:
                    raise EtcdError(f"{url}: HTTP {response.status}")
                async for line in _lines(response.content, url):
                    if not line.strip():
                        continue
                    result = json.loads(line).get("result", {})
                    if int(result.get("compact_revision", 0) or 0):
                        raise Compacted(int(result["compact_revision"]))
                    if result.get("canceled"):
                        raise EtcdError(f"watch canceled: {result.get('cancel_reason', '')}")
                    events = [_event(e) for e in result.get("events", [])]
                    if events:
                        yield events
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise EtcdError(f"watch of {url}: {type(exc).__name__}: {exc}") from None
        raise EtcdError(f"watch of {url}: the connection ended")


async def _lines(content: aiohttp.StreamReader, url: str) -> AsyncIterator[bytes]:
    """The stream's lines, each whole, however long (up to :data:`MAX_WATCH_MESSAGE`)."""
    buffer = bytearray()
    while chunk := await content.readany():
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            buffer += chunk[start : end + 1]
            yield bytes(buffer)
            buffer.clear()
            start = end + 1
        buffer += chunk[start:]
        if len(buffer) > MAX_WATCH_MESSAGE:
            raise EtcdError(f"watch of {url}: a message over {MAX_WATCH_MESSAGE} bytes")
    if buffer:
        yield bytes(buffer)


def _event(raw: dict[str, Any]) -> Event:
    kv = raw.get("kv", {})
    kind = "delete" if raw.get("type") == "DELETE" else "put"
    return Event(kind, _key(kv.get("key")), _unb64(kv.get("value")), int(kv.get("mod_revision", 0)))


def put_op(key: str, value: str, lease: int | None = None) -> dict[str, Any]:
    request: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease is not None:
        request["lease"] = lease
    return {"request_put": request}


def delete_op(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}

"""Conditional transactions and single reads with their revisions, over the same JSON gateway
as :mod:`hive.desired.etcd` (whose client they use): what an election and a fenced writer need.

etcd compares and writes in one step: a transaction whose ``compare`` holds runs ``success``,
else ``failure``. The scheduler fences every write on the create revision of its own election
key, so a scheduler that lost the key (its lease expired, another was elected) writes nothing.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from hive.desired.etcd import Etcd, prefix_end


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text or "")


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=unb64(raw.get("key")).decode(),
        value=unb64(raw.get("value")),
        create_revision=int(raw.get("create_revision", 0) or 0),
        mod_revision=int(raw.get("mod_revision", 0) or 0),
        lease=int(raw.get("lease", 0) or 0),
    )


def created_at(key: str, revision: int) -> dict[str, Any]:
    """Holds when ``key`` exists and was created at ``revision`` (0: when it does not exist)."""
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": revision}


def range_op(key: str) -> dict[str, Any]:
    return {"request_range": {"key": b64(key)}}


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    #: The key-values that the branch's range operations read, in order.
    kvs: list[KeyValue]


async def txn(
    etcd: Etcd,
    compare: list[dict[str, Any]],
    success: list[dict[str, Any]],
    failure: list[dict[str, Any]] | None = None,
) -> TxnResult:
    """One transaction (at most 128 operations a branch: etcd's limit)."""
    body: dict[str, Any] = {"compare": compare, "success": success}
    if failure:
        body["failure"] = failure
    data = await etcd.call("/v3/kv/txn", body)
    kvs: list[KeyValue] = []
    for response in data.get("responses", []):
        for raw in (response.get("response_range") or {}).get("kvs", []):
            kvs.append(_kv(raw))
    return TxnResult(
        succeeded=bool(data.get("succeeded", False)),
        revision=int(data.get("header", {}).get("revision", 0)),
        kvs=kvs,
    )


async def get(etcd: Etcd, key: str) -> tuple[int, KeyValue | None]:
    """One key with its revisions and lease, and the store's revision."""
    data = await etcd.call("/v3/kv/range", {"key": b64(key)})
    kvs = data.get("kvs", [])
    return int(data.get("header", {}).get("revision", 0)), (_kv(kvs[0]) if kvs else None)


async def count(etcd: Etcd, prefix: str) -> int:
    """How many keys are under ``prefix`` (read without their values)."""
    data = await etcd.call(
        "/v3/kv/range",
        {"key": b64(prefix), "range_end": b64(prefix_end(prefix)), "count_only": True},
    )
    return int(data.get("count", 0) or 0)

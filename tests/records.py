"""A worker record for tests that need one without a registry: every required field filled,
any field overridden by keyword."""

from __future__ import annotations

from typing import Any

from hive.models import State, Worker
from hive.state.registry import now


def record(**fields: Any) -> Worker:
    base: dict[str, Any] = {
        "id": "w",
        "model": "m",
        "backend": "demo",
        "device": "CPU-0",
        "port": 18000,
        "url": "http://127.0.0.1:18000",
        "state": State.FAILED,
        "created_at": now(),
    }
    return Worker(**{**base, **fields})

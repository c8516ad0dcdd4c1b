"""Helpers for the journal's tests (tests/unit/test_journal.py and the full-disk case in
tests/daemon/test_journal_full_disk.py): workers added to a real registry, journals written and
read back, log lines picked out, and ``os`` calls that fail on demand."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from hive.models import SpawnRequest, Worker
from hive.state.journal import Journal
from hive.state.registry import Registry


def add(registry: Registry, worker_id: str) -> Worker:
    port = 18000 + len(registry)
    return registry.add(
        SpawnRequest(model="m", id=worker_id),
        f"token-{worker_id}",
        lambda entries: {
            "id": worker_id,
            "model": "m",
            "backend": "demo",
            "device": "CPU-0",
            "port": port,
            "url": f"http://127.0.0.1:{port}",
        },
    )


def ids(path: Path) -> list[str]:
    """The workers a fresh hive would load from ``path``'s journal."""
    return [saved.record.id for saved in Journal(path, Registry()).load()]


def workers_in(path: Path) -> list[str]:
    """The worker ids in the journal file at ``path``, read as plain JSON."""
    return [item["record"]["id"] for item in json.loads(path.read_bytes())["workers"]]


def files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def journal_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "hive.journal" and r.levelno >= logging.ERROR
    ]


def journal_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "hive.journal" and text in r.getMessage()
    ]


@contextlib.asynccontextmanager
async def writing(
    path: Path, registry: Registry, retry_interval: float = 3600.0
) -> AsyncIterator[Journal]:
    """A started journal (its first write done), closed at the end."""
    journal = Journal(path, registry)
    journal.retry_interval = retry_interval
    journal.start()
    await journal.flush()
    try:
        yield journal
    finally:
        await journal.close()


async def generations(path: Path, *workers: list[str]) -> list[bytes]:
    """Write one journal per list of worker ids, in order; the bytes of each."""
    registry, written = Registry(), []
    for wanted in workers:
        for worker_id in wanted:
            if worker_id not in registry:
                add(registry, worker_id)
        await Journal(path, registry).close()  # close() writes the journal once, synchronously
        written.append(path.read_bytes())
    return written


def failing(name: str, fail: Callable[[int], bool], error: int = errno.EIO) -> Callable[..., Any]:
    """``os.<name>`` that raises ``error`` on the calls ``fail`` picks (numbered from 1)."""
    real = getattr(os, name)
    calls = 0

    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if fail(calls):
            raise OSError(error, os.strerror(error))
        return real(*args, **kwargs)

    return call

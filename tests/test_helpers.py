"""The small helpers that several modules share, each defined once: plain tests, no daemon."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from hive.api.openapi import build_openapi
from hive.api.routes import operations
from hive.models import WORKER_ID_PATTERN, SpawnRequest

# -- the worker-id pattern -----------------------------------------------------------------------


@pytest.mark.parametrize("worker_id", ["a", "0", "qwen-1.5b_x", "a" * 63, "m.2-x_y"])
def test_worker_id_pattern_takes(worker_id: str) -> None:
    assert re.match(WORKER_ID_PATTERN, worker_id)
    assert SpawnRequest(model="m", id=worker_id).id == worker_id


@pytest.mark.parametrize("worker_id", ["", "A", "-a", ".a", "_a", "a" * 64, "a/b", "a b", "é"])
def test_worker_id_pattern_refuses(worker_id: str) -> None:
    assert not re.match(WORKER_ID_PATTERN, worker_id)
    with pytest.raises(ValidationError):
        SpawnRequest(model="m", id=worker_id)


def test_openapi_documents_the_same_worker_id_pattern() -> None:
    paths = build_openapi(operations())["paths"]
    patterns = {
        param["schema"]["pattern"]
        for ops in paths.values()
        for op in ops.values()
        for param in op["parameters"]
        if param["in"] == "path" and param["name"] == "id"
    }
    assert patterns == {WORKER_ID_PATTERN}

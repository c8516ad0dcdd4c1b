"""Fixtures of the external tier: the real vLLM and its tiny model (tests/vllms.py), and a real
sglang-router that does not retry (its failed requests are the ones hive caused)."""

from collections.abc import Iterator

import pytest
from routers import Router
from vllms import model, vllm

__all__ = ["model", "strict_router", "vllm"]


@pytest.fixture(scope="module")
def strict_router() -> Iterator[Router]:
    """sglang-router with ``--disable-retries``, for the module."""
    router = Router(None, "--disable-retries").start()
    try:
        yield router
    finally:
        router.stop()

"""Fixtures shared by the suite: a real hive daemon, and a leak check after every module."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hivetest import TAG, Hive, running_hive
from routers import Router

from harness.procs import tagged_processes, zombie_children
from harness.waits import wait_for


@pytest.fixture(autouse=True, scope="module")
def no_leaks() -> Iterator[None]:
    """After each module: nothing the tests started is still alive, and no zombie is left."""
    yield
    try:
        wait_for(lambda: not tagged_processes(TAG), timeout=15, what="test processes to end")
    except AssertionError:
        leaked = [(p.pid, " ".join(p.cmdline())[:120]) for p in tagged_processes(TAG)]
        for proc in tagged_processes(TAG):
            proc.kill()
        pytest.fail(f"processes leaked by this module: {leaked}")
    assert zombie_children(os.getpid()) == [], "the tests left zombie children"


@pytest.fixture(scope="module")
def hive() -> Iterator[Hive]:
    """One daemon for a whole module; tests give their workers distinct ids."""
    with running_hive() as daemon:
        yield daemon


@pytest.fixture(scope="module")
def router() -> Iterator[Router]:
    """One real sglang-router for a whole module (tests/routers.py)."""
    r = Router().start()
    try:
        yield r
    finally:
        r.stop()

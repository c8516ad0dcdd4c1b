"""Fixtures shared by the suite: a real hive daemon, and a leak check after every module.

The tests come in three tiers, one folder and one marker each, given here by folder:
``tests/unit`` (``-m unit``: no daemon, no subprocess; a guard below fails a unit test that
starts one), ``tests/daemon`` (``-m daemon``: a real ``hive serve``, worker processes or other
local programs) and ``tests/external`` (``-m external``: a real external program such as
llama-server, sglang-router, etcd, Chromium or promtool). Plain ``pytest`` runs them all.
"""

from __future__ import annotations

import _posixsubprocess
import multiprocessing.util
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hivetest import TAG, Hive, running_hive
from routers import Router

from harness.procs import tagged_processes, zombie_children
from harness.waits import wait_for

TESTS = Path(__file__).parent
TIERS = ("unit", "daemon", "external")


def tier_of(path: Path) -> str | None:
    """The tier a test file is in: the first folder under tests/, if it is a tier's."""
    try:
        top = path.relative_to(TESTS).parts[0]
    except (ValueError, IndexError):
        return None
    return top if top in TIERS else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with its folder's tier, so ``-m unit`` and the others select a tier."""
    for item in items:
        tier = tier_of(item.path)
        if tier is not None:
            item.add_marker(tier)


class UnitTierError(AssertionError):
    """A unit test tried to start a process."""


@pytest.fixture(autouse=True, scope="module")
def no_processes_in_unit_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    """In tests/unit, starting a process (subprocess, asyncio, multiprocessing, fork, spawn,
    os.system) fails the test: such a test belongs in tests/daemon. An attempt the code under
    test swallows still fails the module at its end."""
    if tier_of(request.node.path) != "unit":
        yield
        return
    attempts: list[str] = []

    def refuse(name: str) -> Any:
        def refused(*args: object, **kwargs: object) -> Any:
            attempts.append(f"{name}{args[:2]!r}"[:200])
            raise UnitTierError(
                f"a unit test may not start a process ({name}); move it to tests/daemon"
            )

        return refused

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "_execute_child", refuse("subprocess.Popen"))
        patch.setattr(_posixsubprocess, "fork_exec", refuse("fork_exec"))
        patch.setattr(multiprocessing.util, "spawnv_passfds", refuse("multiprocessing"))
        for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
            if hasattr(os, name):
                patch.setattr(os, name, refuse(f"os.{name}"))
        yield
    if attempts:
        pytest.fail(f"this unit module tried to start processes: {attempts}")


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

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
import signal
import subprocess
from collections import Counter
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its folder's tier, so ``-m unit`` and the others select a tier.
    In a pytest-xdist worker, also put the units of SLOW_FIRST first (every worker sorts the
    same way, as xdist requires): pytest_xdist_make_scheduler hands them out in this order."""
    for item in items:
        tier = tier_of(item.path)
        if tier is not None:
            item.add_marker(tier)
    if hasattr(config, "workerinput"):
        distinct_ids(items)
        rank = {unit: i for i, unit in enumerate(SLOW_FIRST)}
        items.sort(key=lambda item: rank.get(unit_of(item.nodeid), len(rank)))


def distinct_ids(items: list[pytest.Item]) -> None:
    """Give every test its own node id, which is all pytest-xdist knows a test by: of tests
    that share one, it would run the first alone. schemathesis 4 under pytest 9.2 gives every
    operation of a fuzz test (``test_fuzz_the_live_api[GET /health]``, ...) the id of the
    function; its name still says which, so the id takes it from there. Any id still shared
    stops the run, rather than leave tests out unsaid."""
    counts = Counter(item.nodeid for item in items)
    for item in items:
        base = getattr(item, "originalname", item.name)
        if counts[item.nodeid] > 1 and item.name.startswith(f"{base}[") and item.name[-1] == "]":
            param = item.name[len(base) + 1 : -1]
            if hasattr(item, "_id"):  # pytest 9.2: a structured id
                item._id = item._id.with_params(param)
            else:
                item._nodeid = f"{item.nodeid}[{param}]"
    shared = sorted(nodeid for nodeid, n in Counter(i.nodeid for i in items).items() if n > 1)
    if shared:
        raise pytest.UsageError(f"tests that share a node id, which xdist cannot run: {shared}")


#: Under pytest-xdist, files that share one worker, one after the other, and why.
GROUPS = {
    # Each runs a real inference engine on the CPU: vLLM (its CPU build) is CPU-bound for
    # minutes, and two engines at once on 2 cores only slow each other down towards timeouts.
    "tests/external/test_vllm.py": "engines",
    "tests/external/test_vllm_stall.py": "engines",
    # llama-server is CPU-bound too: beside a vLLM its streams ran past their timeouts.
    "tests/external/test_llama.py": "engines",
    "tests/external/test_llama_phases.py": "engines",
    "tests/external/test_llama_memory.py": "engines",
}

#: Under pytest-xdist, the units (files, or GROUPS) handed out first, slowest first, so that
#: none of them starts last and runs alone at the end. Only the order: a file not named here
#: runs all the same, in collection order after these.
SLOW_FIRST = (
    "engines",  # about 9 minutes of the 11 of a whole parallel run on a busy 2-core host
    "tests/daemon/test_cli.py",
    "tests/external/test_fleet_scheduler.py",
    "tests/daemon/test_openapi.py",  # its fuzz run takes a minute or two
    "tests/daemon/test_restart_free.py",
    "tests/daemon/test_containment.py",
)


def unit_of(nodeid: str) -> str:
    """The unit of work a test is in under pytest-xdist: its file, or the file's group."""
    path = nodeid.split("::", 1)[0]
    return GROUPS.get(path, path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``-n N --dist loadfile`` (as ``make test`` runs): each file is one unit of work, so that
    its module fixtures (a hive, a router, a vLLM) start once, in one worker; GROUPS put some
    files in one unit; the units of SLOW_FIRST go first, the rest in collection order.

    (xdist's own ``loadgroup`` cannot do this here: it groups by a suffix it writes into each
    test's node id, which pytest 9.2 no longer lets it write, so it spreads one file's tests
    over several workers.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Units(LoadFileScheduling):  # type: ignore[misc]
        def __init__(self, config: pytest.Config, log: Any) -> None:
            super().__init__(config, log)
            # The units go out in the order the workers collected them (SLOW_FIRST first: see
            # pytest_collection_modifyitems), not those with the most tests first.
            config.option.loadscopereorder = False

        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return Units(config, log)


def pytest_configure(config: pytest.Config) -> None:
    """A run started in the background (``make test &``, ``nohup``) has SIGINT ignored, and so
    would every process it starts: a test that Ctrl-C's a ``hive`` command would wait for it in
    vain. The tests' processes get SIGINT as a terminal would give it."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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
    """After each module: nothing the tests started is still alive, and no zombie is left.
    TAG is this process's, so under pytest-xdist each worker checks what it started alone."""
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

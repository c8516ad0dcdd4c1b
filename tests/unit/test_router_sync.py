"""Router sync's jobs (:class:`RouterSync`) over a real :class:`Registry`, against a small fake
of its collaborator, the router client (:class:`hive.upstream.sglang_router.SglangRouter`).

The fake has the client's four methods and answers them from a script: each registration is a
job whose states the test chooses (``pending`` until the test finishes it, ``failed`` with a
message, ``registered``), a finished registration is listed, a removal is a job too (done at
once, unless the test scripts it). The clock router sync reads for its back-off is a fake
too, moved on by the test; everything else runs as in hive: the registry's changes start the
jobs, and the reconcile loop (every 20 ms here) repairs the rest. No daemon, no subprocess, no
socket.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

import hive.upstream.router_sync as router_sync_module
from harness.waits import async_wait_for
from hive.config import Config, RouterConfig
from hive.models import SpawnRequest, State
from hive.state.registry import Change, Registry
from hive.upstream.router_sync import RouterSync
from hive.upstream.sglang_router import JobState, Listed, RouterError

pytestmark = pytest.mark.timeout(10)

ROUTER = "http://router.test:30000"
FIRST_RETRY = 2.0  # router sync waits 2 s after a failed job, then 4 s, 8 s... (its docstring)


class FakeRouter:
    """The router client's methods, answered from a script; every call is recorded."""

    made: list[FakeRouter] = []

    def __init__(self, config: RouterConfig, session: aiohttp.ClientSession) -> None:
        self.url = config.url
        self.listed: dict[str, str] = {}  # router id -> worker url, once registered
        self.urls: dict[str, str] = {}  # router id -> worker url, from the POST
        self.jobs: dict[str, list[JobState]] = {}  # router id -> the states still to answer
        self.removing: dict[str, list[JobState]] = {}  # router id -> the removal's states
        self.calls: list[tuple[str, str]] = []
        self.lists = 0
        #: The next registrations' jobs, in order (then: registered at the first look).
        self.scripts: list[list[JobState]] = []
        #: How each removal's job goes (the router is done with it at once by default).
        self.removal: list[JobState] = [JobState("gone")]
        #: The next registrations refused or unreachable, in order.
        self.add_errors: list[RouterError] = []
        #: The next removals' errors, in order (a 404 drops the entry, as the router has none).
        self.remove_errors: list[RouterError] = []
        self._ids = itertools.count(1)
        FakeRouter.made.append(self)

    async def list(self) -> list[Listed]:
        self.lists += 1
        return [Listed(router_id, url) for router_id, url in self.listed.items()]

    async def add(self, body: dict[str, Any]) -> str:
        url = body["url"]
        self.calls.append(("add", url))
        if self.add_errors:
            raise self.add_errors.pop(0)
        router_id = f"r{next(self._ids)}"
        self.jobs[router_id] = self.scripts.pop(0) if self.scripts else [JobState("registered")]
        self.urls[router_id] = url
        return router_id

    async def job(self, router_id: str) -> JobState:
        if router_id in self.removing:
            states = self.removing[router_id]
            state = states.pop(0) if len(states) > 1 else states[0]
            if state.state == "gone":
                self.listed.pop(router_id, None)
            return state
        states = self.jobs[router_id]
        state = states.pop(0) if len(states) > 1 else states[0]
        if state.state == "registered":
            self.listed[router_id] = self.urls[router_id]
        return state

    async def remove(self, router_id: str) -> None:
        self.calls.append(("remove", router_id))
        if self.remove_errors:
            error = self.remove_errors.pop(0)
            if error.status == 404:
                self.listed.pop(router_id, None)
            raise error
        self.removing[router_id] = list(self.removal)
        if self.removal[0].state == "gone":
            self.listed.pop(router_id, None)

    def finish(self, router_id: str, state: JobState) -> None:
        """The router's job ends as ``state`` (at router sync's next look)."""
        self.jobs[router_id] = [state]

    def asked(self, kind: str) -> list[str]:
        return [what for call, what in self.calls if call == kind]


class Clock:
    """``time.monotonic`` as router sync reads it; the test moves it on."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(router_sync_module, "time", clock)
    return clock


@pytest.fixture
def registry() -> Registry:
    return Registry()


@pytest.fixture
async def sync(
    registry: Registry, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[RouterSync]:
    FakeRouter.made = []
    monkeypatch.setattr(router_sync_module, "SglangRouter", FakeRouter)
    config = Config(routers=[RouterConfig(url=ROUTER)])
    sync = RouterSync(config, registry, interval=0.02)
    sync.start()
    try:
        yield sync
    finally:
        await sync.close()


@pytest.fixture
def router(sync: RouterSync) -> FakeRouter:
    [router] = FakeRouter.made
    return router


def add_worker(registry: Registry, worker_id: str, port: int) -> str:
    """A worker in ``starting`` on ``port``; its URL as the router sees it."""
    registry.add(
        SpawnRequest(model="m", id=worker_id),
        "token",
        lambda entries: {
            "id": worker_id,
            "model": "m",
            "backend": "demo",
            "device": "CPU-0",
            "port": port,
            "url": f"http://127.0.0.1:{port}",
        },
    )
    return f"http://127.0.0.1:{port}"


def statuses(registry: Registry, worker_id: str) -> list[str]:
    """Every sync status the worker's record takes from now on, in order."""
    seen: list[str] = []

    def heard(change: Change) -> None:
        status = change.worker.routers.get(ROUTER)
        before = change.before.routers.get(ROUTER) if change.before is not None else None
        if change.id == worker_id and status is not None and status != before:
            seen.append(status)

    registry.subscribe(heard)
    return seen


def status(registry: Registry, worker_id: str) -> Callable[[], str | None]:
    return lambda: registry.get(worker_id).routers.get(ROUTER)


async def passes(router: FakeRouter, n: int = 3) -> None:
    """Wait until the reconcile loop has looked at the router ``n`` more times."""
    start = router.lists
    await async_wait_for(lambda: router.lists >= start + n, timeout=5, what="reconcile passes")


async def registered(registry: Registry, router: FakeRouter, worker_id: str, port: int) -> str:
    """A ready worker, registered; the router's id for it."""
    url = add_worker(registry, worker_id, port)
    registry.became_ready(worker_id)
    await async_wait_for(lambda: status(registry, worker_id)() == "registered", timeout=5)
    [router_id] = [r for r, u in router.listed.items() if u == url]
    return router_id


# -- registration --------------------------------------------------------------------------------


async def test_a_ready_worker_is_registered_once_its_job_is_done(
    registry: Registry, router: FakeRouter
) -> None:
    seen = statuses(registry, "w")
    router.scripts.append([JobState("pending", "health check 1/3")])  # pending until finished
    url = add_worker(registry, "w", 18001)
    await passes(router)
    assert router.asked("add") == []  # starting: not sent
    registry.became_ready("w")
    await async_wait_for(lambda: router.asked("add") == [url], timeout=5, what="the job sent")
    await passes(router)  # while its job is pending, the worker is never sent again
    assert router.asked("add") == [url]
    assert status(registry, "w")() == "pending"
    router.finish("r1", JobState("registered"))
    await async_wait_for(lambda: status(registry, "w")() == "registered", timeout=5)
    await passes(router)
    assert router.asked("add") == [url]
    assert seen == ["pending", "registered"]


async def test_a_failed_job_is_tried_again_after_a_back_off_that_doubles(
    registry: Registry, router: FakeRouter, clock: Clock
) -> None:
    seen = statuses(registry, "w")
    failed = JobState("failed", "health check failed")
    router.scripts += [[failed], [failed]]  # the third job registers
    url = add_worker(registry, "w", 18001)
    registry.became_ready("w")
    await async_wait_for(lambda: status(registry, "w")() == "failed: health check failed")
    await passes(router)
    assert router.asked("add") == [url]  # not before its back-off
    clock.now += FIRST_RETRY
    await async_wait_for(lambda: len(seen) == 4, timeout=5, what="the retry to fail")
    clock.now += FIRST_RETRY  # 2 s again is not enough after a second failure
    await passes(router)
    assert len(router.asked("add")) == 2
    clock.now += FIRST_RETRY
    await async_wait_for(lambda: status(registry, "w")() == "registered", timeout=5)
    assert router.asked("add") == [url, url, url]
    assert seen == [
        "pending",
        "failed: health check failed",
        "pending",
        "failed: health check failed",
        "pending",
        "registered",
    ]


async def test_a_refused_registration_backs_off_like_a_failed_job(
    registry: Registry, router: FakeRouter, clock: Clock
) -> None:
    router.add_errors.append(RouterError("POST /workers: HTTP 400: bad url", 400))
    url = add_worker(registry, "w", 18001)
    registry.became_ready("w")
    await async_wait_for(
        lambda: status(registry, "w")() == "failed: POST /workers: HTTP 400: bad url", timeout=5
    )
    await passes(router)
    assert router.asked("add") == [url]
    clock.now += FIRST_RETRY
    await async_wait_for(lambda: status(registry, "w")() == "registered", timeout=5)


async def test_a_router_that_does_not_answer_the_post_is_tried_at_the_next_pass(
    registry: Registry, router: FakeRouter
) -> None:
    router.add_errors.append(RouterError("POST /workers: Connection reset by peer"))
    url = add_worker(registry, "w", 18001)
    registry.became_ready("w")
    # No back-off for an unreachable router: the next reconcile pass sends it again.
    await async_wait_for(lambda: status(registry, "w")() == "registered", timeout=5)
    assert router.asked("add") == [url, url]


async def test_a_worker_that_asks_not_to_be_registered_is_not(
    registry: Registry, router: FakeRouter
) -> None:
    registry.add(
        SpawnRequest.model_validate({"model": "m", "id": "quiet", "register": False}),
        "token",
        lambda entries: {
            "id": "quiet",
            "model": "m",
            "backend": "demo",
            "device": "CPU-0",
            "port": 18002,
            "url": "http://127.0.0.1:18002",
        },
    )
    registry.became_ready("quiet")
    await passes(router)
    assert router.calls == [] and registry.get("quiet").routers == {}


# -- removal -------------------------------------------------------------------------------------


async def test_a_worker_that_fails_is_removed_from_the_router(
    registry: Registry, router: FakeRouter
) -> None:
    router_id = await registered(registry, router, "w", 18001)
    seen = statuses(registry, "w")
    router.removal = [JobState("pending", "draining"), JobState("gone")]
    registry.attempt_ended("w", State.FAILED, exit_code=-9, error="killed by SIGKILL")
    await async_wait_for(lambda: status(registry, "w")() == "removed", timeout=5)
    assert router.asked("remove") == [router_id]
    assert router.listed == {}  # removed only once the router's job is done
    assert seen == ["removal pending", "removed"]
    await passes(router)
    assert router.asked("add") == [router.asked("add")[0]]  # a failed worker is not sent again


async def test_withdraw_takes_a_worker_out_before_it_is_stopped(
    registry: Registry, router: FakeRouter, sync: RouterSync
) -> None:
    router_id = await registered(registry, router, "w", 18001)
    registry.set_desired("w", "stopped")  # as the supervisor's stop does, then withdraws
    await sync.withdraw("w")
    assert router.asked("remove") == [router_id]  # asked before the process is signalled
    await async_wait_for(lambda: status(registry, "w")() == "removed", timeout=5)
    assert router.listed == {}
    await passes(router)
    assert router.asked("remove") == [router_id] and router_id not in router.listed


async def test_a_forgotten_worker_is_removed(registry: Registry, router: FakeRouter) -> None:
    router_id = await registered(registry, router, "w", 18001)
    registry.attempt_ended("w", State.STOPPED, exit_code=0, error=None)
    registry.remove("w")
    await async_wait_for(lambda: router.asked("remove") == [router_id], timeout=5)
    await passes(router)
    assert router.listed == {}


def not_found(router_id: str) -> RouterError:
    """What the client raises for sglang-router's answer to a DELETE of a worker it lacks."""
    body = f'{{"error":"Worker {router_id} not found","code":"WORKER_NOT_FOUND"}}'
    return RouterError(f"DELETE /workers/{router_id}: HTTP 404: {body}", 404)


async def test_a_404_to_the_removal_means_removed(registry: Registry, router: FakeRouter) -> None:
    """The router dropped the worker itself (its own health check) before hive asked: its
    WORKER_NOT_FOUND is the removal done, not a removal pending for ever (issue 27)."""
    router_id = await registered(registry, router, "w", 18001)
    seen = statuses(registry, "w")
    router.remove_errors.append(not_found(router_id))
    registry.attempt_ended("w", State.FAILED, exit_code=-9, error="killed by SIGKILL")
    await async_wait_for(lambda: router.asked("remove") == [router_id], timeout=5)
    await passes(router)
    assert status(registry, "w")() == "removed"
    assert seen == ["removed"]


async def test_a_removal_unanswered_is_removed_once_the_router_lists_it_no_more(
    registry: Registry, router: FakeRouter
) -> None:
    router_id = await registered(registry, router, "w", 18001)
    seen = statuses(registry, "w")
    router.remove_errors.append(RouterError(f"DELETE /workers/{router_id}: Connection reset"))
    registry.attempt_ended("w", State.FAILED, exit_code=-9, error="killed by SIGKILL")
    # The reconcile loop removes what the router still lists of a failed worker...
    await async_wait_for(lambda: router.listed == {}, timeout=5, what="removed by reconcile")
    # ...and says so once the router lists it no more.
    await async_wait_for(lambda: status(registry, "w")() == "removed", timeout=5)
    assert router.asked("remove") == [router_id, router_id]
    # Which of the two removals met the reset depends on who came first: the withdrawal after
    # the failure ("removal pending: DELETE ...") or, on a loaded machine, the 20-ms reconcile
    # (its error logged, the withdrawal's DELETE then answered: plain "removal pending").
    assert seen[0].startswith("removal pending") and seen[-1] == "removed"


async def test_a_404_to_reconciles_removal_is_not_an_unreachable_router(
    registry: Registry, router: FakeRouter, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry listed, then gone before reconcile's DELETE (the router's own health check):
    nothing to remove, and the router was reachable all along."""
    router.listed["dead"] = "http://127.0.0.1:18050"
    router.remove_errors.append(not_found("dead"))
    with caplog.at_level(logging.WARNING, logger="hive"):
        await async_wait_for(lambda: router.asked("remove") == ["dead"], timeout=5)
        await passes(router)
    assert not [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]


# -- reconcile -----------------------------------------------------------------------------------


async def test_reconcile_removes_only_this_hives_dead_entries(
    registry: Registry, router: FakeRouter
) -> None:
    router_id = await registered(registry, router, "w", 18001)
    router.listed |= {
        "dead": "http://127.0.0.1:18050",  # this hive's host and port range, no such worker
        "theirs": "http://10.0.0.9:18050",  # another hive's
        "outside": "http://127.0.0.1:30001",  # not in this hive's port range
    }
    await async_wait_for(lambda: "dead" not in router.listed, timeout=5, what="the removal")
    await passes(router)
    assert router.asked("remove") == ["dead"]
    assert set(router.listed) == {router_id, "theirs", "outside"}


async def test_a_router_that_restarted_empty_gets_the_ready_workers_again(
    registry: Registry, router: FakeRouter
) -> None:
    await registered(registry, router, "w", 18001)
    router.listed.clear()  # restarted: it knows nothing
    await async_wait_for(lambda: len(router.asked("add")) == 2, timeout=5, what="sent again")
    await async_wait_for(lambda: len(router.listed) == 1, timeout=5)
    assert status(registry, "w")() == "registered"

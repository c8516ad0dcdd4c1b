"""Faults under load: random SIGKILLs while clients hammer the API, and a stateful model of
spawn/stop/restart/kill/delete sequences against the live daemon. At the end, every record
agrees with the process table."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import signal
from collections.abc import Iterator
from typing import Any

import aiohttp
import hypothesis
import psutil
import pytest
import requests
from hivetest import TAG, Hive, running_hive
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from harness.procs import tagged_processes, zombie_children
from harness.waits import async_wait_for, wait_for

pytestmark = pytest.mark.timeout(240)

CONFIG = "restart_delay = 0.1\nrestart_delay_max = 0.4\n"
#: Rounds of SIGKILL-of-hive-mid-spawn; `make soak` runs many more.
ROUNDS = int(os.environ.get("HIVE_CHAOS_ROUNDS", "5"))


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def worker_processes(hive: Hive) -> set[int]:
    """Live demo-worker processes started by this hive (found by their environment)."""
    pids = set()
    for proc in tagged_processes(TAG):
        try:
            env = proc.environ()
        except psutil.Error:
            continue
        if env.get("HIVE_URL") == hive.url and "HIVE_WORKER_ID" in env:
            pids.add(proc.pid)
    return pids


def assert_agrees_with_processes(hive: Hive, records: list[dict[str, Any]]) -> None:
    live = [r for r in records if r["state"] in ("starting", "ready", "busy")]
    for r in live:
        assert r["pid"] and alive(r["pid"]), r
    for r in records:
        if r["state"] in ("stopped", "failed"):
            assert r["pid"] is None, r
    assert worker_processes(hive) == {r["pid"] for r in live}, "stray or missing processes"
    ports = [r["port"] for r in live]
    assert len(ports) == len(set(ports)), "a port held twice"
    assert zombie_children(hive.pid) == []


@pytest.fixture(scope="module")
def hive() -> Iterator[Hive]:
    with running_hive(CONFIG) as daemon:
        yield daemon


async def test_sigkill_rounds_under_load(hive: Hive) -> None:
    policies = {"c-on-1": "on-failure", "c-on-2": "on-failure", "c-always": "always"}
    policies |= {"c-no-1": "no", "c-no-2": "no", "c-pinned": "on-failure"}
    rng = random.Random(7)
    errors: list[str] = []
    calls = 0
    async with hive.session() as s:
        for wid, policy in policies.items():
            body: dict[str, Any] = {"model": "m", "id": wid, "restart": policy}
            if wid == "c-pinned":
                body["cpus"] = 1
            async with s.post("/v1/workers", params={"wait": "ready"}, json=body) as r:
                assert r.status == 200, await r.text()

        stop = asyncio.Event()

        async def hammer() -> None:
            nonlocal calls
            paths = ["/v1/workers", "/v1/node", "/v1/devices", "/metrics", "/v1/workers/c-on-1"]
            while not stop.is_set():
                async with s.get(rng.choice(paths)) as r:
                    calls += 1
                    if r.status >= 500:
                        errors.append(f"{r.status} {await r.text()}")

        clients = [asyncio.create_task(hammer()) for _ in range(3)]
        try:
            for _ in range(10):
                async with s.get("/v1/workers") as r:
                    live = [w for w in (await r.json())["workers"] if w["pid"]]
                if live:
                    # The listing may name a process the previous kill ended and hive reaped
                    # in the same moment, its record not yet failed: it is already dead.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(rng.choice(live)["pid"], signal.SIGKILL)
                # The next kill after a random number of client calls, not a fixed time.
                target = calls + rng.randint(5, 60)
                await async_wait_for(lambda t=target: calls >= t, what="client calls")  # type: ignore[misc]
        finally:
            stop.set()
            await asyncio.gather(*clients)

        # Settled: each worker is ready or failed as its policy says.
        async def settled() -> list[dict[str, Any]] | None:
            async with s.get("/v1/workers") as r:
                records = (await r.json())["workers"]
            for w in records:
                want_ready = policies[w["id"]] != "no" or (w["restarts"] == 0 and not w["error"])
                if want_ready and w["state"] != "ready":
                    return None
                if not want_ready and w["state"] != "failed":
                    return None
            return records

        records = await async_wait_for(settled, timeout=60, what="every worker settled")
    assert errors == [] and calls > 10
    assert_agrees_with_processes(hive, records)
    pinned = next(r for r in records if r["id"] == "c-pinned")
    assert psutil.Process(pinned["pid"]).cpu_affinity() == pinned["cpus"]
    async with hive.session() as s:
        for wid in policies:
            async with s.delete(f"/v1/workers/{wid}") as r:
                assert r.status == 200


class Lifecycle(RuleBasedStateMachine):
    """Random operations on a few ids; the model says what the registry must hold after each."""

    hive: Hive

    def __init__(self) -> None:
        super().__init__()
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {self.hive.token}"
        self.model: dict[str, str] = {}  # id -> stopped | ready | failed

    def _url(self, path: str) -> str:
        return f"{self.hive.url}{path}"

    def _record(self, wid: str) -> dict[str, Any]:
        response = self.http.get(self._url(f"/v1/workers/{wid}"), timeout=30)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def _settle(self, wid: str, state: str) -> None:
        wait_for(lambda: self._record(wid)["state"] == state, timeout=30, what=f"{wid} {state}")

    @rule(wid=st.sampled_from(["p1", "p2", "p3"]))
    def spawn(self, wid: str) -> None:
        response = self.http.post(
            self._url("/v1/workers"),
            params={"wait": "ready"},
            json={"model": "m", "id": wid, "restart": "no"},
            timeout=60,
        )
        if wid in self.model:
            assert response.status_code == 409
        else:
            assert response.status_code == 200, response.text
            self.model[wid] = "ready"

    @rule(wid=st.sampled_from(["p1", "p2", "p3"]))
    def stop(self, wid: str) -> None:
        response = self.http.post(self._url(f"/v1/workers/{wid}/stop"), params={"wait": "true"})
        if wid not in self.model:
            assert response.status_code == 404
            return
        assert response.status_code == 200
        if self.model[wid] == "ready":
            self.model[wid] = "stopped"

    @rule(wid=st.sampled_from(["p1", "p2", "p3"]))
    def restart(self, wid: str) -> None:
        response = self.http.post(self._url(f"/v1/workers/{wid}/restart"), timeout=60)
        if wid not in self.model:
            assert response.status_code == 404
            return
        assert response.status_code == 200, response.text
        self._settle(wid, "ready")
        self.model[wid] = "ready"

    @rule(wid=st.sampled_from(["p1", "p2", "p3"]))
    def kill(self, wid: str) -> None:
        if self.model.get(wid) != "ready":
            return
        os.kill(self._record(wid)["pid"], signal.SIGKILL)
        self._settle(wid, "failed")
        self.model[wid] = "failed"

    @rule(wid=st.sampled_from(["p1", "p2", "p3"]))
    def delete(self, wid: str) -> None:
        response = self.http.delete(self._url(f"/v1/workers/{wid}"), timeout=60)
        assert response.status_code == (200 if wid in self.model else 404)
        self.model.pop(wid, None)

    @invariant()
    def registry_matches_the_model(self) -> None:
        records = self.http.get(self._url("/v1/workers"), timeout=30).json()["workers"]
        assert {r["id"]: r["state"] for r in records} == self.model
        assert_agrees_with_processes(self.hive, records)

    def teardown(self) -> None:
        for wid in list(self.model):
            self.http.delete(self._url(f"/v1/workers/{wid}"), timeout=60)
        self.http.close()


def test_stateful_lifecycle(hive: Hive) -> None:
    Lifecycle.hive = hive
    run = Lifecycle.TestCase
    run.settings = hypothesis.settings(
        max_examples=4,
        stateful_step_count=8,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    run().runTest()


# alone: rounds of SIGKILLs, each given 30 s for hive's records and the processes to agree;
# beside the parallel pass's three workers on 2 cores a round did not settle in that time in 2
# of 4 runs.
@pytest.mark.alone
async def test_sigkill_of_hive_mid_spawn_in_rounds() -> None:
    """hive killed at random moments while spawns are in flight, in rounds: afterwards the
    records and the process table agree exactly (no stray process, no record without one),
    and every record can be removed."""
    rng = random.Random(11)
    with running_hive(CONFIG) as hive:
        for round_ in range(ROUNDS):
            async with hive.session() as s:

                async def spawn(n: int, s: Any = s, round_: int = round_) -> None:
                    body = {"model": "m", "id": f"k{round_}-{n}", "restart": "no"}
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                        async with s.post("/v1/workers", json=body):
                            pass

                inflight = [asyncio.create_task(spawn(n)) for n in range(3)]
                await asyncio.sleep(rng.uniform(0.0, 0.04))
                hive.kill()
                await asyncio.gather(*inflight)
            hive.start()

            async def agreed() -> list[dict[str, Any]] | None:
                try:
                    async with hive.session() as s, s.get("/v1/workers") as r:
                        records = (await r.json())["workers"]
                except aiohttp.ClientError as exc:
                    raise AssertionError(f"hive stopped answering ({exc}):\n{hive.log()}") from None
                try:
                    assert_agrees_with_processes(hive, records)
                except AssertionError:
                    return None
                return records

            await async_wait_for(agreed, timeout=30, what=f"round {round_}: records agree")
        records = await agreed()
        assert records is not None
        # Nothing killed a worker: none may be taken for gone (a started one is adopted back).
        lost = [r for r in records if "not running" in (r["error"] or "")]
        assert lost == [], lost
        async with hive.session() as s:
            for record in records:
                async with s.delete(f"/v1/workers/{record['id']}") as r:
                    assert r.status == 200, await r.text()
            async with s.get("/v1/workers") as r:
                assert (await r.json())["total"] == 0
        wait_for(lambda: not worker_processes(hive), what="no worker process left")
        log = hive.log()
        states = collections.Counter(r["state"] for r in records)
        print(  # the figures for a person reading the run with -s
            f"\nmid-spawn chaos: {ROUNDS} rounds, {ROUNDS} SIGKILLs of hive, "
            f"{3 * ROUNDS} spawns in flight; "
            f"records after: {dict(states)}; adoptions: {log.count('adopted worker')}; "
            f"stray processes ended at start-up: {log.count('stray process')}; "
            "stray or missing processes after each round: 0; records stuck: 0"
        )

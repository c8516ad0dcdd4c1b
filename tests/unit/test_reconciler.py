"""The reconciler's plan carried out (:meth:`Reconciler.apply_set`, :meth:`Reconciler.replace`)
over a real :class:`Registry`, with a small fake of its one collaborator, the supervisor.

The fake does what the supervisor does to the registry (a spawn adds a record in ``starting``
that becomes ``ready``, or ``failed`` when told to; a delete stops and forgets; a promote
renames) without any process, and records each call, so that the tests see what the reconciler
asked for and what the registry holds after. No daemon, no subprocess.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from harness.waits import async_wait_for
from hive.config import Config, RouterConfig
from hive.desired.declared import CONFIG_SOURCE, Declared
from hive.desired.reconcile import Reconciler, settle_decision
from hive.errors import Conflict, HiveError, InvalidRequest, NoCapacity
from hive.models import DeclaredWorker, Entry, SpawnRequest, State, Worker, successor_id
from hive.state.registry import Registry

pytestmark = pytest.mark.timeout(10)

SOURCE = f"{CONFIG_SOURCE}/etc/hive/workers.toml"
_AT = datetime(2026, 1, 1, tzinfo=UTC)
OTHER = "apply:ci"


class FakeSupervisor:
    """The methods :class:`Reconciler` calls on the supervisor, changing the real registry as
    the supervisor would. ``refuse`` makes a spawn of that id raise; ``fail`` makes the new
    process of that id (or successor id) fail instead of becoming ready; ``hold`` keeps it
    ``starting`` until :meth:`release`."""

    def __init__(self, registry: Registry, config: Config | None = None) -> None:
        self.registry = registry
        self.config = config or Config()
        self.calls: list[tuple[Any, ...]] = []
        self.refuse: dict[str, HiveError] = {}
        self.fail: dict[str, str] = {}
        self.hold: set[str] = set()
        self.running: set[str] = set()  # ids whose (pretend) process runs
        self._ports = itertools.count(18000)

    def normalized(self, spec: SpawnRequest) -> SpawnRequest:
        return spec.model_copy(
            update={
                "backend": spec.backend or self.config.default_backend,
                "restart": spec.restart or self.config.default_restart,
            }
        )

    def check_backend(self, spec: SpawnRequest) -> None:
        if (spec.backend or self.config.default_backend) not in self.config.backends:
            raise InvalidRequest(f"backend: no backend {spec.backend!r}")

    def is_settled(self, worker_id: str) -> bool:
        return worker_id not in self.running

    async def spawn(
        self,
        spec: SpawnRequest,
        *,
        declared: str | None = None,
        successor: tuple[str, int] | None = None,
    ) -> Worker:
        spec = self.normalized(spec)
        assert spec.id is not None
        record_id, generation, replacing = spec.id, 1, None
        if successor is not None:
            replacing, generation = successor
            record_id = successor_id(replacing, generation)
        self.calls.append(("spawn", record_id, declared))
        if record_id in self.refuse:
            raise self.refuse[record_id]
        port = next(self._ports)

        def build(entries: Mapping[str, Entry]) -> dict[str, Any]:
            return {
                "id": record_id,
                "generation": generation,
                "replacing": replacing,
                "declared": declared,
                "model": spec.model,
                "backend": spec.backend,
                "labels": spec.labels,
                "restart": spec.restart,
                "device": "CPU-0",
                "port": port,
                "url": f"http://127.0.0.1:{port}",
            }

        record = self.registry.add(spec.model_copy(update={"id": spec.id}), "token", build)
        self._started(record_id)
        return record

    def _started(self, worker_id: str) -> None:
        """The process runs; it becomes ready (or fails) a moment later, as a real one."""
        self.running.add(worker_id)
        asyncio.get_running_loop().call_soon(self._settle, worker_id)

    def _settle(self, worker_id: str) -> None:
        if worker_id in self.hold or worker_id not in self.registry:
            return
        if worker_id not in self.running:
            return
        if worker_id in self.fail:
            self.running.discard(worker_id)
            self.registry.attempt_ended(
                worker_id, State.FAILED, exit_code=1, error=self.fail[worker_id]
            )
        else:
            self.registry.became_ready(worker_id)

    def release(self, worker_id: str) -> None:
        self.hold.discard(worker_id)
        self._settle(worker_id)

    async def stop(
        self, worker_id: str, timeout: float | None = None, wait: bool = False
    ) -> Worker:
        self.calls.append(("stop", worker_id))
        record = self.registry.set_desired(worker_id, "stopped")
        if worker_id in self.running:
            self.running.discard(worker_id)
            ended = self.registry.attempt_ended(worker_id, State.STOPPED, exit_code=0, error=None)
            record = ended or record
        return record

    async def delete(self, worker_id: str, keep_log: bool = False) -> Worker:
        self.calls.append(("delete", worker_id, keep_log))
        await self.stop(worker_id, wait=True)
        return self.registry.remove(worker_id)

    async def promote(self, successor: str, worker_id: str) -> Worker:
        self.calls.append(("promote", successor, worker_id))
        if successor in self.running:
            self.running.discard(successor)
            self.running.add(worker_id)
        return self.registry.promote(successor, worker_id)

    async def respec(self, worker_id: str, spec: SpawnRequest) -> Worker:
        self.calls.append(("respec", worker_id))
        spec = self.normalized(spec).model_copy(update={"id": worker_id})
        record = self.registry.get(worker_id)
        self.registry.respec(worker_id, spec, record.generation + 1)
        self.registry.begin_attempt(worker_id, lambda entries: {}, restarts=0)
        self._started(worker_id)
        return self.registry.get(worker_id)

    async def start_again(self, worker_id: str) -> Worker:
        self.calls.append(("start_again", worker_id))
        self.registry.begin_attempt(worker_id, lambda entries: {}, restarts=1)
        self._started(worker_id)
        return self.registry.get(worker_id)

    async def persist(self) -> None:
        self.calls.append(("persist",))

    def asked(self, kind: str) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] == kind]


def declared(worker_id: str, source: str = SOURCE, **fields: Any) -> Declared:
    return Declared(DeclaredWorker(id=worker_id, **{"model": "m", **fields}), source)


async def running(supervisor: FakeSupervisor, *items: Declared) -> None:
    """Start ``items`` as already-applied workers, ready, and forget those calls."""
    for item in items:
        await supervisor.spawn(item.spec, declared=item.source)
    for item in items:
        await supervisor.registry.wait_until(item.spec.id or "", lambda w: w.state == "ready", 5)
    supervisor.calls.clear()


def results(items: list[Any]) -> dict[str, tuple[str, str | None]]:
    return {item.id: (item.action, item.result) for item in items}


@pytest.fixture
def registry() -> Registry:
    return Registry()


@pytest.fixture
def supervisor(registry: Registry) -> FakeSupervisor:
    return FakeSupervisor(registry)


@pytest.fixture
def reconciler(supervisor: FakeSupervisor, registry: Registry) -> Reconciler:
    return Reconciler(supervisor, registry)  # type: ignore[arg-type]


# -- apply_set: create, replace, prune --------------------------------------------------------


async def test_a_new_set_creates_every_worker_declared_from_its_source(
    reconciler: Reconciler, supervisor: FakeSupervisor, registry: Registry
) -> None:
    items = await reconciler.apply_set(
        [declared("a"), declared("b", model="n")], SOURCE, "declared workers"
    )
    assert results(items) == {"a": ("create", "done"), "b": ("create", "done")}
    assert supervisor.asked("spawn") == [("spawn", "a", SOURCE), ("spawn", "b", SOURCE)]
    assert {w.id: (w.model, w.declared) for w in registry.list()} == {
        "a": ("m", SOURCE),
        "b": ("n", SOURCE),
    }


async def test_a_changed_worker_is_replaced_beside_and_its_successor_takes_its_id(
    reconciler: Reconciler, supervisor: FakeSupervisor, registry: Registry
) -> None:
    await running(supervisor, declared("a"), declared("b"))
    items = await reconciler.apply_set(
        [declared("a", model="m2"), declared("b")], SOURCE, "declared workers"
    )
    assert results(items) == {"a": ("replace", "done"), "b": ("unchanged", "done")}
    assert items[0].changes == {"model": ["m", "m2"]}
    # The successor starts beside the old worker, which leaves only once it is ready.
    assert supervisor.calls == [
        ("spawn", "a~2", SOURCE),
        ("delete", "a", True),  # its log is kept: the successor writes on in it
        ("stop", "a"),
        ("promote", "a~2", "a"),
    ]
    a = registry.get("a")
    assert (a.model, a.generation, a.replacing, a.state) == ("m2", 2, None, State.READY)
    assert a.replacement is None  # the progress note is cleared once done
    assert sorted(registry.ids()) == ["a", "b"]


async def test_what_the_source_no_longer_declares_is_pruned_and_nothing_else(
    reconciler: Reconciler, supervisor: FakeSupervisor, registry: Registry
) -> None:
    await running(supervisor, declared("keep"), declared("gone"), declared("theirs", OTHER))
    await supervisor.spawn(SpawnRequest(model="m", id="adhoc"))  # spawned by hand: not declared
    supervisor.calls.clear()
    items = await reconciler.apply_set([declared("keep")], SOURCE, "declared workers")
    assert results(items) == {"keep": ("unchanged", "done"), "gone": ("prune", "done")}
    assert supervisor.asked("delete") == [("delete", "gone", False)]
    assert sorted(registry.ids()) == ["adhoc", "keep", "theirs"]


async def test_an_empty_set_prunes_all_of_its_source(
    reconciler: Reconciler, supervisor: FakeSupervisor, registry: Registry
) -> None:
    await running(supervisor, declared("a"), declared("b"), declared("c", OTHER))
    items = await reconciler.apply_set([], SOURCE, "declared workers")
    assert results(items) == {"a": ("prune", "done"), "b": ("prune", "done")}
    assert sorted(registry.ids()) == ["c"]


async def test_an_unchanged_worker_declared_elsewhere_now_takes_the_new_source(
    reconciler: Reconciler, supervisor: FakeSupervisor, registry: Registry
) -> None:
    await running(supervisor, declared("a", OTHER))
    items = await reconciler.apply_set([declared("a")], SOURCE, "declared workers")
    assert results(items) == {"a": ("unchanged", "done")}
    assert registry.get("a").declared == SOURCE
    assert supervisor.calls == [("persist",)]  # the new source reaches the journal; no restart


async def test_applying_the_same_set_again_changes_nothing(
    reconciler: Reconciler, supervisor: FakeSupervisor
) -> None:
    await reconciler.apply_set([declared("a"), declared("b")], SOURCE, "declared workers")
    supervisor.calls.clear()
    items = await reconciler.apply_set([declared("a"), declared("b")], SOURCE, "declared workers")
    assert results(items) == {"a": ("unchanged", "done"), "b": ("unchanged", "done")}
    assert supervisor.calls == []


# -- errors, per item --------------------------------------------------------------------------


async def test_a_failing_create_is_that_items_result_and_the_others_go_on(
    reconciler: Reconciler, supervisor: FakeSupervisor, registry: Registry
) -> None:
    await running(supervisor, declared("old"))
    supervisor.refuse["b"] = NoCapacity("cpus: 64 cores asked, 2 free")
    items = await reconciler.apply_set(
        [declared("a"), declared("b"), declared("c")], SOURCE, "declared workers"
    )
    assert results(items) == {
        "a": ("create", "done"),
        "b": ("create", "cpus: 64 cores asked, 2 free"),
        "c": ("create", "done"),
        "old": ("prune", "done"),
    }
    assert sorted(registry.ids()) == ["a", "c"]


async def test_a_replacement_whose_successor_fails_leaves_the_worker_as_it_was(
    reconciler: Reconciler, supervisor: FakeSupervisor, registry: Registry
) -> None:
    await running(supervisor, declared("a"), declared("b"))
    supervisor.fail["a~2"] = "exited with 1: no such model"
    items = await reconciler.apply_set(
        [declared("a", model="m2"), declared("b", model="n2")], SOURCE, "declared workers"
    )
    assert results(items) == {
        "a": (
            "replace",
            "replacement of 'a' abandoned: its successor failed: exited with 1: no such model; "
            "'a' goes on unchanged",
        ),
        "b": ("replace", "done"),
    }
    assert ("delete", "a~2", False) in supervisor.calls  # the failed successor is removed
    a = registry.get("a")
    assert (a.model, a.generation, a.state, a.replacement) == ("m", 1, State.READY, None)
    assert registry.get("b").model == "n2"
    assert sorted(registry.ids()) == ["a", "b"]


async def test_a_successor_that_does_not_fit_beside_says_to_replace_in_place(
    reconciler: Reconciler, supervisor: FakeSupervisor, registry: Registry
) -> None:
    await running(supervisor, declared("a"))
    supervisor.refuse["a~2"] = NoCapacity("device: no GPU free")
    items = await reconciler.apply_set([declared("a", model="m2")], SOURCE, "declared workers")
    [(action, result)] = results(items).values()
    assert action == "replace"
    assert result is not None and result.startswith("device: no GPU free: the successor")
    assert "in_place=true" in result
    assert registry.get("a").model == "m"


async def test_a_set_naming_an_unknown_backend_is_refused_whole(
    reconciler: Reconciler, supervisor: FakeSupervisor, registry: Registry
) -> None:
    with pytest.raises(HiveError, match="worker 'b'"):
        await reconciler.apply_set(
            [declared("a"), declared("b", backend="nope")], SOURCE, "declared workers"
        )
    assert supervisor.calls == [] and len(registry) == 0


# -- replace on its own --------------------------------------------------------------------------


async def test_in_place_stops_the_old_process_first(
    reconciler: Reconciler, supervisor: FakeSupervisor, registry: Registry
) -> None:
    await running(supervisor, declared("a"))
    record = await reconciler.replace("a", SpawnRequest(model="m2"), in_place=True)
    assert supervisor.calls == [("stop", "a"), ("respec", "a")]
    assert (record.id, record.model, record.generation) == ("a", "m2", 2)
    await registry.wait_until("a", lambda w: w.state == State.READY, 5)


async def test_a_stopped_worker_is_respecced_with_nothing_to_overlap(
    reconciler: Reconciler, supervisor: FakeSupervisor, registry: Registry
) -> None:
    await running(supervisor, declared("a"))
    await supervisor.stop("a")
    supervisor.calls.clear()
    record = await reconciler.replace("a", SpawnRequest(model="m2"))
    assert supervisor.calls == [("respec", "a")]
    assert (record.model, record.generation) == ("m2", 2)


async def test_a_successor_is_not_replaced_and_one_replacement_at_a_time(
    reconciler: Reconciler, supervisor: FakeSupervisor, registry: Registry
) -> None:
    await running(supervisor, declared("a"))
    supervisor.hold.add("a~2")
    first = asyncio.create_task(reconciler.replace("a", SpawnRequest(model="m2")))
    await async_wait_for(lambda: "a~2" in registry, timeout=5, what="the successor")
    with pytest.raises(InvalidRequest, match="is a successor; replace 'a' instead"):
        await reconciler.replace("a~2", SpawnRequest(model="m3"))
    with pytest.raises(Conflict, match="being replaced already"):
        await reconciler.replace("a", SpawnRequest(model="m3"))
    with pytest.raises(Conflict, match="abandoned"):
        supervisor.fail["a~2"] = "never mind"
        supervisor.release("a~2")
        await first
    assert registry.get("a").model == "m" and "a~2" not in registry


async def test_with_routers_the_successor_must_be_registered_before_it_takes_over(
    registry: Registry,
) -> None:
    url = "http://127.0.0.1:30000"
    supervisor = FakeSupervisor(registry, Config(routers=[RouterConfig(url=url)]))
    reconciler = Reconciler(supervisor, registry)  # type: ignore[arg-type]
    await running(supervisor, declared("a"))

    async def router_sync() -> None:
        """What the router sync does: the successor's registration failed, then succeeded."""
        await async_wait_for(
            lambda: "a~2" in registry and registry.get("a~2").state == State.READY,
            timeout=5,
            what="the successor ready",
        )
        registry.router_status("a~2", url, "failed: health check failed")
        await asyncio.sleep(0)
        registry.router_status("a~2", url, "registered")

    syncing = asyncio.create_task(router_sync())
    record = await reconciler.replace("a", SpawnRequest(model="m2"), timeout=5)
    await syncing
    assert (record.id, record.model, record.routers) == ("a", "m2", {url: "registered"})
    assert supervisor.asked("promote") == [("promote", "a~2", "a")]


async def test_a_successor_the_routers_do_not_take_in_time_is_abandoned(
    registry: Registry,
) -> None:
    url = "http://127.0.0.1:30000"
    supervisor = FakeSupervisor(registry, Config(routers=[RouterConfig(url=url)]))
    reconciler = Reconciler(supervisor, registry)  # type: ignore[arg-type]
    await running(supervisor, declared("a"))
    with pytest.raises(Conflict) as refused:
        await reconciler.replace("a", SpawnRequest(model="m2"), timeout=0.2)
    assert "was not registered (http://127.0.0.1:30000: not sent)" in refused.value.message
    assert ("delete", "a~2", False) in supervisor.calls
    assert registry.get("a").model == "m" and "a~2" not in registry


# -- issue 26: declared workers stay declared; a prune that empties the host needs force -------


async def test_a_declared_worker_down_though_nobody_stopped_it_is_started_again(
    reconciler: Reconciler, supervisor: FakeSupervisor, registry: Registry
) -> None:
    await running(supervisor, declared("ended"), declared("gave-up"), declared("held"))
    # hive's own shutdown (on_exit = "stop") ends a worker and leaves desired: running; so
    # does a failure whose restart policy gave up. An operator's stop says desired: stopped.
    registry.attempt_ended("ended", State.STOPPED, exit_code=0, error=None)
    registry.attempt_ended("gave-up", State.FAILED, exit_code=1, error="gave up")
    await supervisor.stop("held")
    supervisor.running -= {"ended", "gave-up"}
    supervisor.calls.clear()
    wanted = [declared("ended"), declared("gave-up"), declared("held")]
    plan = reconciler.plan(wanted)
    assert [(i.id, i.action) for i in plan] == [
        ("ended", "start"),
        ("gave-up", "start"),
        ("held", "unchanged"),
    ]
    items = await reconciler.apply_set(wanted, SOURCE, "declared workers")
    assert results(items) == {
        "ended": ("start", "done"),
        "gave-up": ("start", "done"),
        "held": ("unchanged", "done"),
    }
    assert supervisor.asked("start_again") == [("start_again", "ended"), ("start_again", "gave-up")]
    for worker_id in ("ended", "gave-up"):
        await registry.wait_until(worker_id, lambda w: w.state == State.READY, 5)
    held = registry.get("held")
    assert (held.state, held.desired) == (State.STOPPED, "stopped")
    # A restart that is due is on its way: nothing to start.
    registry.attempt_ended("ended", State.FAILED, exit_code=1, error="crash")
    registry.restart_due("ended", registry.get("ended").stopped_at)
    assert [(i.id, i.action) for i in reconciler.plan([declared("ended")])] == [
        ("ended", "unchanged")
    ]


API = "apply:/srv/workers"


async def test_a_prune_of_every_worker_or_of_other_sources_is_refused_without_force(
    reconciler: Reconciler, supervisor: FakeSupervisor, registry: Registry
) -> None:
    await running(supervisor, declared("mine", API), declared("mine2", API))
    await running(supervisor, declared("conf", SOURCE))
    await supervisor.spawn(SpawnRequest(model="m", id="adhoc"))
    supervisor.calls.clear()
    # An empty set: every worker would go.
    with pytest.raises(InvalidRequest) as refused:
        await reconciler.apply([], prune=lambda _: True, guard=API)
    message = refused.value.message
    assert message.startswith("prune: would remove every worker on this host (")
    for name in ("mine (apply:/srv/workers)", "conf (config:", "adhoc (spawned through the API)"):
        assert name in message
    assert "force" in message
    # Its own set without one of its workers: the others' workers would go too.
    with pytest.raises(InvalidRequest) as refused:
        await reconciler.apply([declared("mine", API)], prune=lambda _: True, guard=API)
    assert "did not declare: conf (config:" in refused.value.message
    assert "mine2" not in refused.value.message
    assert supervisor.calls == [] and len(registry) == 4  # nothing was done
    # Its own workers only: no force needed.
    items = await reconciler.apply(
        [declared("mine", API)],
        prune=lambda e: (e.record.declared or "").startswith("apply:"),
        guard=API,
    )
    assert results(items) == {"mine": ("unchanged", "done"), "mine2": ("prune", "done")}
    # With force (no guard), everything goes.
    items = await reconciler.apply([], prune=lambda _: True)
    assert {i.id for i in items if i.action == "prune" and i.result == "done"} == {
        "mine",
        "conf",
        "adhoc",
    }
    assert len(registry) == 0


def _record(worker_id: str, state: State, **fields: Any) -> Worker:
    return Worker(
        id=worker_id, model="m", backend="demo", device="CPU-0", port=18000,
        url="http://127.0.0.1:18000", state=state, created_at=_AT, **fields,
    )  # fmt: skip


def test_a_replacement_a_killed_hive_left_is_finished_when_its_successor_got_far() -> None:
    ready, starting = State.READY, State.STARTING
    new = _record("web~2", ready, replacing="web", generation=2, ready_at=_AT)
    assert settle_decision(new, None) == "take over"  # the old one was forgotten already
    assert settle_decision(new, _record("web", State.STOPPED)) == "take over"  # drained
    assert settle_decision(new, _record("web", State.FAILED)) == "take over"  # died meanwhile
    assert settle_decision(new, _record("web", ready)) == "resume"  # both run: carry on
    draining = _record("web", ready, desired="stopped")  # the replacement was stopping it
    assert settle_decision(new, draining) == "take over"
    loading = new.model_copy(update={"state": starting, "ready_at": None})
    assert settle_decision(loading, _record("web", ready)) == "resume"
    assert settle_decision(loading, _record("web", State.FAILED)) == "take over"
    dead = loading.model_copy(update={"state": State.FAILED})
    assert settle_decision(dead, _record("web", ready)) == "abandon"
    assert settle_decision(dead, _record("web", State.FAILED)) == "abandon"  # never served
    served = dead.model_copy(update={"ready_at": _AT})
    assert settle_decision(served, _record("web", State.FAILED)) == "take over"

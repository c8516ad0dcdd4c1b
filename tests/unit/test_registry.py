"""The registry: the transition table, refusals, filters, notifications, retention, threads.

These are plain synchronous tests; no daemon is started. The transition table is written out here
on its own (not imported from the registry) so that the tests check the registry against the
contract rather than against itself.
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from pydantic import ValidationError

from hive.models import SpawnRequest, State, Worker
from hive.state.registry import (
    Change,
    DuplicateWorker,
    Entry,
    IllegalTransition,
    Registry,
    UnknownWorker,
)

#: The contract: from each state, where a worker may go. Everything else must be refused.
LEGAL: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.READY, State.FAILED, State.STOPPED}),
    State.READY: frozenset({State.BUSY, State.STOPPED, State.FAILED}),
    State.BUSY: frozenset({State.READY, State.STOPPED, State.FAILED}),
    State.FAILED: frozenset({State.STARTING}),
    State.STOPPED: frozenset({State.STARTING}),
}
LIVE = frozenset({State.STARTING, State.READY, State.BUSY})
DOWN = frozenset({State.STOPPED, State.FAILED})

#: Legal paths from a fresh (starting) record to each state.
PATHS: dict[State, tuple[State, ...]] = {
    State.STARTING: (),
    State.READY: (State.READY,),
    State.BUSY: (State.READY, State.BUSY),
    State.STOPPED: (State.STOPPED,),
    State.FAILED: (State.FAILED,),
}

BASE = datetime(2030, 1, 1, tzinfo=UTC)


# -- helpers -----------------------------------------------------------------------------------


def fields_for(wid: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": wid,
        "model": "m",
        "backend": "demo",
        "device": "CPU-0",
        "port": 18000,
        "url": "http://127.0.0.1:18000",
        **fields,
    }


def add(reg: Registry, wid: str, **fields: Any) -> Worker:
    return reg.add(SpawnRequest(model="m"), "tok", lambda entries: fields_for(wid, **fields))


def reach(reg: Registry, wid: str, state: State) -> Worker:
    """Walk a starting record to ``state`` through legal transitions."""
    record = reg.get(wid)
    for step in PATHS[state]:
        record = reg.transition(wid, step)
    assert record.state == state
    return record


def make(reg: Registry, wid: str, state: State, **fields: Any) -> Worker:
    add(reg, wid, **fields)
    return reach(reg, wid, state)


class Recorder:
    """A subscriber that keeps every change it hears."""

    def __init__(self) -> None:
        self.changes: list[Change] = []

    def __call__(self, change: Change) -> None:
        self.changes.append(change)

    def tuples(self) -> list[tuple[int, str, State | None, State | None]]:
        return [(c.seq, c.id, c.from_, c.to) for c in self.changes]


def snapshot(reg: Registry) -> dict[str, Entry]:
    with reg.locked() as entries:
        return dict(entries)


def assert_untouched(
    reg: Registry, before: Mapping[str, Entry], seq: int, heard: int, rec: Recorder
) -> None:
    """Nothing changed: the very same entries, the same seq, and no subscriber call."""
    after = snapshot(reg)
    assert list(after) == list(before)
    assert all(after[k] is before[k] for k in before)
    assert reg.seq == seq
    assert len(rec.changes) == heard


@pytest.fixture
def reg() -> Registry:
    return Registry()


@pytest.fixture
def rec(reg: Registry) -> Recorder:
    recorder = Recorder()
    reg.subscribe(recorder)
    return recorder


# -- 1. the transition table -------------------------------------------------------------------


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(State, State)))
def test_transition_table(reg: Registry, rec: Recorder, src: State, dst: State) -> None:
    make(reg, "w", src)
    add(reg, "other")
    before, seq, heard = snapshot(reg), reg.seq, len(rec.changes)
    if dst in LEGAL[src]:
        record = reg.transition("w", dst)
        assert record.state == dst
        assert reg.get("w") is record
        assert reg.seq == seq + 1
        assert rec.tuples()[heard:] == [(seq + 1, "w", src, dst)]
        assert reg.get("other") is before["other"].record
    else:
        with pytest.raises(IllegalTransition) as info:
            reg.transition("w", dst, pid=4242, error="nope")
        assert (info.value.worker_id, info.value.from_, info.value.to) == ("w", src, dst)
        assert_untouched(reg, before, seq, heard, rec)


def test_table_is_what_the_contract_says() -> None:
    legal = sum(len(v) for v in LEGAL.values())
    assert legal == 11
    assert all(s not in LEGAL[s] for s in State)


# -- 2. refusals, build, update ----------------------------------------------------------------


def test_expect_refuses_other_states(reg: Registry, rec: Recorder) -> None:
    make(reg, "w", State.READY)
    before, seq, heard = snapshot(reg), reg.seq, len(rec.changes)
    with pytest.raises(IllegalTransition):
        reg.transition("w", State.BUSY, expect=State.STARTING)
    with pytest.raises(IllegalTransition):
        reg.transition("w", State.BUSY, expect=frozenset({State.STARTING, State.BUSY}))
    assert_untouched(reg, before, seq, heard, rec)

    assert reg.transition("w", State.BUSY, expect=State.READY).state == State.BUSY
    busy_or_ready = frozenset({State.READY, State.BUSY})
    assert reg.transition("w", State.READY, expect=busy_or_ready).state == State.READY


def test_expect_does_not_allow_an_illegal_move(reg: Registry, rec: Recorder) -> None:
    make(reg, "w", State.READY)
    before, seq, heard = snapshot(reg), reg.seq, len(rec.changes)
    with pytest.raises(IllegalTransition):
        reg.transition("w", State.STARTING, expect=State.READY)
    assert_untouched(reg, before, seq, heard, rec)


def test_build_fields_are_applied(reg: Registry) -> None:
    add(reg, "a")
    add(reg, "w")
    seen: list[set[str]] = []

    def build(entries: Mapping[str, Entry]) -> dict[str, Any]:
        seen.append(set(entries))
        return {"pid": 1234, "port": 19000 + len(entries), "error": "from build"}

    record = reg.transition("w", State.READY, build=build, error=None)
    assert seen == [{"a", "w"}]
    assert record.pid == 1234
    assert record.port == 19002
    assert record.error is None  # explicit fields win over build's
    assert record.state == State.READY
    assert reg.get("w") is record


def test_build_may_not_choose_the_state(reg: Registry) -> None:
    add(reg, "w")
    record = reg.transition("w", State.READY, build=lambda entries: {"state": State.FAILED})
    assert record.state == State.READY
    record = reg.transition("w", State.BUSY, state=State.FAILED)
    assert record.state == State.BUSY


def test_add_build_sees_entries_and_starts_in_starting(reg: Registry, rec: Recorder) -> None:
    add(reg, "a")
    seen: list[set[str]] = []

    def build(entries: Mapping[str, Entry]) -> dict[str, Any]:
        seen.append(set(entries))
        return fields_for("b", state=State.READY, port=18001)

    spec = SpawnRequest(model="m", labels={"x": "y"})
    record = reg.add(spec, "secret", build)
    assert seen == [{"a"}]
    assert record.state == State.STARTING
    assert record.port == 18001
    assert reg.entry("b").spec is spec
    assert reg.entry("b").token == "secret"
    assert rec.tuples() == [(1, "a", None, State.STARTING), (2, "b", None, State.STARTING)]


def test_update_refuses_state(reg: Registry, rec: Recorder) -> None:
    add(reg, "w")
    before, seq, heard = snapshot(reg), reg.seq, len(rec.changes)
    with pytest.raises(ValueError):
        reg.update("w", state=State.READY)
    with pytest.raises(ValueError):
        reg.update("w", state=State.READY, pid=1)
    assert_untouched(reg, before, seq, heard, rec)


def test_update_tells_changed_fields_but_not_hot_ones(reg: Registry, rec: Recorder) -> None:
    """A change of fields is told (``from_ == to``) with the record before it; a write of the
    hot fields alone (heartbeat time, in flight, usage) is stored but not told, and a write
    that changes nothing is no change at all."""
    add(reg, "w")
    seq, heard = reg.seq, len(rec.changes)
    record = reg.update("w", in_flight=3, rss_bytes=1024)
    assert (record.in_flight, record.rss_bytes) == (3, 1024)
    assert reg.get("w") is record
    assert reg.seq == seq
    assert len(rec.changes) == heard
    record = reg.update("w", pid=77, labels={"k": "v"})
    assert (record.pid, record.labels) == (77, {"k": "v"})
    assert record.state == State.STARTING
    assert reg.seq == seq + 1
    change = rec.changes[-1]
    assert (change.from_, change.to, change.fields_only) == (State.STARTING, State.STARTING, True)
    assert change.before is not None and change.before.pid is None
    assert change.worker is record
    assert reg.update("w", pid=77) is record  # nothing changed: nothing told
    assert reg.seq == seq + 1


def test_every_named_operation_that_changes_something_is_told(reg: Registry, rec: Recorder) -> None:
    """Issue 24: gave_up, restart_due, router_status, set_desired... each publish a change."""
    add(reg, "w")
    reg.transition("w", State.FAILED)
    calls: list[Callable[[], object]] = [
        lambda: reg.gave_up("w", "gave up after 5 restarts"),
        lambda: reg.restart_due("w", BASE),
        lambda: reg.restart_due("w", None),
        lambda: reg.set_desired("w", "stopped"),
        lambda: reg.router_status("w", "http://router", "registered"),
        lambda: reg.set_declared("w", "config:/etc/hive.toml"),
        lambda: reg.set_draining("w", True),
        lambda: reg.replacement_progress("w", "w~2 starting"),
        lambda: reg.exit_code_known("w", 3),
        lambda: reg.restart_refused("w", "no port free"),
    ]
    for call in calls:
        heard = len(rec.changes)
        call()
        assert len(rec.changes) == heard + 1, call
        assert rec.changes[-1].fields_only
    heard = len(rec.changes)
    reg.gave_up("w", "no port free")  # the same error again: nothing changed
    assert len(rec.changes) == heard


def test_update_many_applies_and_skips_unknown(reg: Registry, rec: Recorder) -> None:
    add(reg, "a")
    add(reg, "b")
    seq, heard = reg.seq, len(rec.changes)
    reg.update_many({"a": {"pid": 1}, "b": {"pid": 2, "rss_bytes": 10}, "ghost": {"pid": 3}})
    assert reg.get("a").pid == 1
    assert (reg.get("b").pid, reg.get("b").rss_bytes) == (2, 10)
    assert "ghost" not in reg
    assert len(reg) == 2
    assert reg.seq == seq + 2  # a pid is not a hot field: both changes are told
    assert len(rec.changes) == heard + 2


def test_update_many_refuses_state(reg: Registry, rec: Recorder) -> None:
    """update_many() refuses a ``state`` key as update() does: a record changes state only
    through the transition table, with a seq bump and a subscriber call. Nothing changes."""
    add(reg, "a")
    add(reg, "b")
    before, seq, heard = snapshot(reg), reg.seq, len(rec.changes)
    with pytest.raises(ValueError):
        reg.update_many({"a": {"pid": 1}, "b": {"state": State.BUSY}})
    assert reg.get("b").state == State.STARTING
    assert_untouched(reg, before, seq, heard, rec)


def test_unknown_ids(reg: Registry, rec: Recorder) -> None:
    add(reg, "w")
    before, seq, heard = snapshot(reg), reg.seq, len(rec.changes)
    calls: list[Callable[[], object]] = [
        lambda: reg.get("nope"),
        lambda: reg.entry("nope"),
        lambda: reg.transition("nope", State.READY),
        lambda: reg.update("nope", pid=1),
        lambda: reg.remove("nope"),
    ]
    for call in calls:
        with pytest.raises(UnknownWorker) as info:
            call()
        assert info.value.worker_id == "nope"
    assert "nope" not in reg
    assert_untouched(reg, before, seq, heard, rec)


@pytest.mark.parametrize("state", list(State))
def test_duplicate_add_changes_nothing(reg: Registry, rec: Recorder, state: State) -> None:
    make(reg, "w", state, labels={"k": "v"})
    before, seq, heard = snapshot(reg), reg.seq, len(rec.changes)
    with pytest.raises(DuplicateWorker) as info:
        reg.add(
            SpawnRequest(model="other"),
            "other-token",
            lambda entries: fields_for("w", model="other", port=18999, labels={}),
        )
    assert info.value.worker_id == "w"
    assert_untouched(reg, before, seq, heard, rec)
    assert reg.entry("w").token == "tok"
    assert reg.get("w").state == state


@pytest.mark.parametrize("state", sorted(LIVE))
def test_remove_refuses_live(reg: Registry, rec: Recorder, state: State) -> None:
    make(reg, "w", state)
    before, seq, heard = snapshot(reg), reg.seq, len(rec.changes)
    with pytest.raises(IllegalTransition):
        reg.remove("w")
    assert_untouched(reg, before, seq, heard, rec)


@pytest.mark.parametrize("state", sorted(DOWN))
def test_remove_down_notifies(reg: Registry, rec: Recorder, state: State) -> None:
    last = make(reg, "w", state)
    add(reg, "other")
    seq = reg.seq
    assert reg.remove("w") is last
    assert "w" not in reg
    assert [r.id for r in reg.list()] == ["other"]
    assert reg.seq == seq + 1
    change = rec.changes[-1]
    assert (change.seq, change.id, change.from_, change.to) == (seq + 1, "w", state, None)
    assert change.worker is last
    with pytest.raises(UnknownWorker):
        reg.remove("w")
    add(reg, "w")  # the id is free again
    assert reg.get("w").state == State.STARTING


# -- 3. filters --------------------------------------------------------------------------------


@pytest.fixture
def fleet(reg: Registry) -> Registry:
    make(reg, "a", State.READY, model="llama", device="GPU-0", labels={"team": "x", "tier": "1"})
    make(reg, "b", State.BUSY, model="llama", device="GPU-0,GPU-1", labels={"team": "x"})
    make(reg, "c", State.READY, model="mistral", device="GPU-1", labels={"team": "y", "tier": "1"})
    make(reg, "d", State.STOPPED, model="llama", device="CPU-0", labels={})
    make(reg, "e", State.STARTING, model="mistral", device="GPU-10", labels={"team": "x"})
    return reg


def ids(records: list[Worker]) -> list[str]:
    return [r.id for r in records]


def test_list_without_filters_is_oldest_first(fleet: Registry) -> None:
    assert ids(fleet.list()) == ["a", "b", "c", "d", "e"]


def test_filter_by_state(fleet: Registry) -> None:
    assert ids(fleet.list(state=State.READY)) == ["a", "c"]
    assert ids(fleet.list(state=State.BUSY)) == ["b"]
    assert ids(fleet.list(state=State.FAILED)) == []


def test_filter_by_model(fleet: Registry) -> None:
    assert ids(fleet.list(model="llama")) == ["a", "b", "d"]
    assert ids(fleet.list(model="llam")) == []


def test_filter_by_device(fleet: Registry) -> None:
    assert ids(fleet.list(device="GPU-1")) == ["b", "c"]
    assert ids(fleet.list(device="GPU-0")) == ["a", "b"]
    assert ids(fleet.list(device="GPU-10")) == ["e"]
    assert ids(fleet.list(device="GPU")) == []
    assert ids(fleet.list(device="CPU-0")) == ["d"]


def test_filter_by_labels(fleet: Registry) -> None:
    assert ids(fleet.list(labels={"team": "x"})) == ["a", "b", "e"]
    assert ids(fleet.list(labels={"team": "x", "tier": "1"})) == ["a"]
    assert ids(fleet.list(labels={"tier": "1"})) == ["a", "c"]
    assert ids(fleet.list(labels={"team": "z"})) == []
    assert ids(fleet.list(labels={})) == ["a", "b", "c", "d", "e"]


def test_filters_combine(fleet: Registry) -> None:
    assert ids(fleet.list(state=State.READY, labels={"tier": "1"})) == ["a", "c"]
    assert ids(fleet.list(state=State.READY, device="GPU-1")) == ["c"]
    assert ids(fleet.list(model="llama", device="GPU-1", labels={"team": "x"})) == ["b"]
    assert ids(fleet.list(model="llama", state=State.READY, labels={"team": "y"})) == []


def test_counts_have_every_state(fleet: Registry) -> None:
    assert Registry().counts() == dict.fromkeys(State, 0)
    assert fleet.counts() == {
        State.STARTING: 1,
        State.READY: 2,
        State.BUSY: 1,
        State.STOPPED: 1,
        State.FAILED: 0,
    }


# -- 4. subscribers and snapshots --------------------------------------------------------------


def test_subscriber_hears_every_change_in_order(reg: Registry) -> None:
    make(reg, "early", State.READY)
    start = reg.seq
    rec = Recorder()
    reg.subscribe(rec)

    add(reg, "w")
    reg.transition("w", State.READY)
    reg.update("w", in_flight=5)  # a hot field: not a change subscribers hear about
    reg.update("w", pid=5)  # a change of fields, heard with the state as it was
    reg.transition("w", State.BUSY)
    reg.transition("early", State.STOPPED)
    reg.transition("w", State.FAILED)
    reg.remove("early")
    reg.transition("w", State.STARTING)

    assert rec.tuples() == [
        (start + 1, "w", None, State.STARTING),
        (start + 2, "w", State.STARTING, State.READY),
        (start + 3, "w", State.READY, State.READY),
        (start + 4, "w", State.READY, State.BUSY),
        (start + 5, "early", State.READY, State.STOPPED),
        (start + 6, "w", State.BUSY, State.FAILED),
        (start + 7, "early", State.STOPPED, None),
        (start + 8, "w", State.FAILED, State.STARTING),
    ]
    assert reg.seq == start + 8
    assert rec.changes[2].worker.pid == 5
    assert rec.changes[2].worker is not rec.changes[1].worker
    times = [c.at for c in rec.changes]
    assert times == sorted(times)


def test_all_subscribers_hear_and_unsubscribe_stops(reg: Registry) -> None:
    first, second = Recorder(), Recorder()
    stop_first = reg.subscribe(first)
    reg.subscribe(second)
    add(reg, "w")
    stop_first()
    stop_first()  # a second call is harmless
    reg.transition("w", State.READY)
    assert first.tuples() == [(1, "w", None, State.STARTING)]
    assert second.tuples() == [
        (1, "w", None, State.STARTING),
        (2, "w", State.STARTING, State.READY),
    ]


def test_records_are_frozen(reg: Registry) -> None:
    record = add(reg, "w")
    with pytest.raises(ValidationError):
        record.state = State.READY  # type: ignore[misc]
    with pytest.raises(ValidationError):
        record.pid = 1  # type: ignore[misc]
    assert reg.get("w").state == State.STARTING
    assert reg.get("w").pid is None


def test_snapshots_do_not_change(reg: Registry) -> None:
    before = add(reg, "w", labels={"k": "v"})
    reg.transition("w", State.READY, pid=10)
    reg.update("w", labels={"k": "other"}, rss_bytes=1)
    reg.update_many({"w": {"cpu_percent": 50.0}})
    after = reg.get("w")
    assert (before.state, before.pid, before.labels, before.rss_bytes) == (
        State.STARTING,
        None,
        {"k": "v"},
        None,
    )
    assert before.cpu_percent is None
    assert (after.state, after.pid, after.labels) == (State.READY, 10, {"k": "other"})
    assert after.rss_bytes == 1
    assert after.cpu_percent == 50.0


# -- 5. retention ------------------------------------------------------------------------------


def test_expire() -> None:
    reg = Registry(retention=60.0)
    rec = Recorder()
    reg.subscribe(rec)
    old, young = BASE - timedelta(seconds=120), BASE - timedelta(seconds=30)
    make(reg, "old-stopped", State.STOPPED)
    reg.update("old-stopped", stopped_at=old)
    make(reg, "old-failed", State.FAILED)
    reg.update("old-failed", stopped_at=old)
    make(reg, "young-stopped", State.STOPPED)
    reg.update("young-stopped", stopped_at=young)
    make(reg, "young-failed", State.FAILED)
    reg.update("young-failed", stopped_at=young)
    make(reg, "restart-pending", State.FAILED)
    reg.update("restart-pending", stopped_at=old, next_restart_at=BASE + timedelta(seconds=5))
    for state in sorted(LIVE):
        make(reg, f"live-{state}", state)
        reg.update(f"live-{state}", stopped_at=old)  # a stale stamp must not matter
    seq, heard = reg.seq, len(rec.changes)

    assert sorted(reg.expire(at=BASE)) == ["old-failed", "old-stopped"]
    assert sorted(r.id for r in reg.list()) == sorted(
        ["young-stopped", "young-failed", "restart-pending"] + [f"live-{s}" for s in LIVE]
    )
    gone = rec.changes[heard:]
    assert sorted((c.id, c.from_, c.to) for c in gone) == [
        ("old-failed", State.FAILED, None),
        ("old-stopped", State.STOPPED, None),
    ]
    assert [c.seq for c in gone] == [seq + 1, seq + 2]

    assert reg.expire(at=BASE) == []
    assert reg.seq == seq + 2
    # Later on the young ones are old enough; the pending restart and live ones still stay.
    assert sorted(reg.expire(at=BASE + timedelta(seconds=31))) == ["young-failed", "young-stopped"]
    assert sorted(r.id for r in reg.list()) == sorted(
        ["restart-pending"] + [f"live-{s}" for s in LIVE]
    )
    assert reg.expire(at=BASE + timedelta(days=365)) == []


def test_expire_defaults_to_now() -> None:
    reg = Registry(retention=10.0)
    make(reg, "old", State.STOPPED)
    reg.update("old", stopped_at=datetime.now(UTC) - timedelta(seconds=1000))
    make(reg, "new", State.STOPPED)
    reg.update("new", stopped_at=datetime.now(UTC) + timedelta(seconds=1000))
    assert reg.expire() == ["old"]
    assert ids(reg.list()) == ["new"]


# -- 6. threads --------------------------------------------------------------------------------

THREADS = 8
PER_THREAD = 150


def _writer(reg: Registry, t: int, barrier: threading.Barrier) -> int:
    """Run one thread's share of changes; returns how many notified changes it made."""
    barrier.wait()
    made = 0
    for i in range(PER_THREAD):
        wid = f"t{t}-{i}"
        add(reg, wid, labels={"thread": str(t)})
        reg.transition(wid, State.READY, expect=State.STARTING)
        reg.update(wid, pid=i, labels={"thread": str(t), "i": str(i)})
        reg.transition(wid, State.BUSY)
        reg.update_many({wid: {"in_flight": 1}})
        reg.transition(wid, State.READY, expect=State.BUSY)
        made += 5  # add, ready, the pid and labels (a change of fields), busy, ready
        match i % 4:
            case 1:
                reg.transition(wid, State.STOPPED)
                made += 1
            case 2:
                reg.transition(wid, State.FAILED)
                reg.transition(wid, State.STARTING)
                made += 2
            case 3:
                reg.transition(wid, State.STOPPED)
                reg.remove(wid)
                made += 2
    return made


def test_threads() -> None:
    reg = Registry()
    rec = Recorder()
    reg.subscribe(rec)
    barrier = threading.Barrier(THREADS + 2)
    done = threading.Event()
    errors: list[BaseException] = []
    made: list[int] = []
    reads = [0]

    def write(t: int) -> None:
        try:
            made.append(_writer(reg, t, barrier))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def read() -> None:
        try:
            barrier.wait()
            while not done.is_set():
                counts = reg.counts()
                assert set(counts) == set(State)
                assert all(n >= 0 for n in counts.values())
                records = reg.list(labels={"thread": "0"})
                assert all(r.labels["thread"] == "0" for r in records)
                assert all(isinstance(r, Worker) for r in reg.list(state=State.BUSY))
                reads[0] += 1
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
            barrier.abort()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, to shake out races
    try:
        writers = [threading.Thread(target=write, args=(t,)) for t in range(THREADS)]
        readers = [threading.Thread(target=read) for _ in range(2)]
        for thread in writers + readers:
            thread.start()
        for thread in writers:
            thread.join(timeout=60)
        done.set()
        for thread in readers:
            thread.join(timeout=60)
    finally:
        sys.setswitchinterval(interval)

    assert not errors, errors
    assert all(not t.is_alive() for t in writers + readers)
    total = sum(made)
    assert len(made) == THREADS
    per_kind = {k: len(range(k, PER_THREAD, 4)) * THREADS for k in range(4)}
    assert reg.counts() == {
        State.READY: per_kind[0],
        State.STOPPED: per_kind[1],
        State.STARTING: per_kind[2],
        State.BUSY: 0,
        State.FAILED: 0,
    }
    assert len(reg) == per_kind[0] + per_kind[1] + per_kind[2]
    assert [c.seq for c in rec.changes] == list(range(1, total + 1))
    assert reg.seq == total
    # Each worker's own changes arrive in the order its thread made them.
    by_id: dict[str, list[tuple[State | None, State | None]]] = {}
    for c in rec.changes:
        by_id.setdefault(c.id, []).append((c.from_, c.to))
    for wid, steps in by_id.items():
        assert steps[0] == (None, State.STARTING), wid
        assert all(a[1] == b[0] for a, b in itertools.pairwise(steps)), wid
    for record in reg.list():
        t, i = record.id[1:].split("-")
        assert record.labels == {"thread": t, "i": i}
        assert (record.pid, record.in_flight) == (int(i), 1)


# -- 7. a stateful model -----------------------------------------------------------------------

IDS = ["a", "b", "c", "d"]
LABEL_MAPS = st.dictionaries(st.sampled_from(["k1", "k2"]), st.sampled_from(["x", "y"]), max_size=2)
RETENTION = 100.0


class RegistryMachine(RuleBasedStateMachine):
    """Random operations against the registry and against a plain model of what it should do.

    Down stamps are whole even seconds after BASE and expiry times odd ones, so that no record
    sits exactly on the retention boundary (the contract says "older than", and this model does
    not take a side on equality).
    """

    def __init__(self) -> None:
        super().__init__()
        self.reg = Registry(retention=RETENTION)
        self.rec = Recorder()
        self.reg.subscribe(self.rec)
        self.states: dict[str, State] = {}
        self.labels: dict[str, dict[str, str]] = {}
        self.stopped_at: dict[str, datetime | None] = {}
        self.pending: dict[str, bool] = {}
        self.expected: list[tuple[int, str, State | None, State | None]] = []
        self.seq = 0

    def _log(self, wid: str, from_: State | None, to: State | None) -> None:
        self.seq += 1
        self.expected.append((self.seq, wid, from_, to))

    def _forget(self, wid: str) -> None:
        for table in (self.states, self.labels, self.stopped_at, self.pending):
            del table[wid]

    def _refused(self, exc: type[Exception], call: Callable[[], object]) -> None:
        before, seq, heard = snapshot(self.reg), self.reg.seq, len(self.rec.changes)
        with pytest.raises(exc):
            call()
        assert_untouched(self.reg, before, seq, heard, self.rec)

    @rule(wid=st.sampled_from(IDS), labels=LABEL_MAPS)
    def add(self, wid: str, labels: dict[str, str]) -> None:
        if wid in self.states:
            self._refused(DuplicateWorker, lambda: add(self.reg, wid, labels=labels))
            return
        record = add(self.reg, wid, labels=labels)
        assert record.state == State.STARTING
        self.states[wid], self.labels[wid] = State.STARTING, dict(labels)
        self.stopped_at[wid], self.pending[wid] = None, False
        self._log(wid, None, State.STARTING)

    @rule(
        wid=st.sampled_from(IDS),
        to=st.sampled_from(list(State)),
        expect=st.none()
        | st.sampled_from(list(State))
        | st.frozensets(st.sampled_from(list(State))),
        stamp=st.integers(0, 150),
        pending=st.booleans(),
    )
    def transition(
        self,
        wid: str,
        to: State,
        expect: State | frozenset[State] | None,
        stamp: int,
        pending: bool,
    ) -> None:
        fields: dict[str, Any] = {}
        if to in DOWN:
            fields["stopped_at"] = BASE + timedelta(seconds=2 * stamp)
            fields["next_restart_at"] = BASE if pending else None
        elif to == State.STARTING:
            fields["next_restart_at"] = None

        def call() -> object:
            return self.reg.transition(wid, to, expect=expect, **fields)

        if wid not in self.states:
            self._refused(UnknownWorker, call)
            return
        current = self.states[wid]
        allowed = expect if isinstance(expect, frozenset) else {expect}
        if to not in LEGAL[current] or (expect is not None and current not in allowed):
            self._refused(IllegalTransition, call)
            return
        record = call()
        assert isinstance(record, Worker)
        assert record.state == to
        self.states[wid] = to
        if "stopped_at" in fields:
            self.stopped_at[wid] = fields["stopped_at"]
        if "next_restart_at" in fields:
            self.pending[wid] = fields["next_restart_at"] is not None
        self._log(wid, current, to)

    @rule(wid=st.sampled_from(IDS), labels=LABEL_MAPS)
    def update_labels(self, wid: str, labels: dict[str, str]) -> None:
        if wid not in self.states:
            self._refused(UnknownWorker, lambda: self.reg.update(wid, labels=labels))
            return
        self.reg.update(wid, labels=labels)
        if labels != self.labels[wid]:  # a change of fields is told; no change is not
            self._log(wid, self.states[wid], self.states[wid])
        self.labels[wid] = dict(labels)

    @rule(wid=st.sampled_from(IDS), to=st.sampled_from(list(State)))
    def update_state_refused(self, wid: str, to: State) -> None:
        self._refused(ValueError, lambda: self.reg.update(wid, state=to))

    @rule(wid=st.sampled_from(IDS))
    def remove(self, wid: str) -> None:
        if wid not in self.states:
            self._refused(UnknownWorker, lambda: self.reg.remove(wid))
            return
        state = self.states[wid]
        if state in LIVE:
            self._refused(IllegalTransition, lambda: self.reg.remove(wid))
            return
        self.reg.remove(wid)
        self._forget(wid)
        self._log(wid, state, None)

    @rule(when=st.integers(0, 250))
    def expire(self, when: int) -> None:
        at = BASE + timedelta(seconds=2 * when + 1)
        cutoff = at - timedelta(seconds=RETENTION)
        due = [
            wid
            for wid, state in self.states.items()
            if state in DOWN
            and not self.pending[wid]
            and (stamp := self.stopped_at[wid]) is not None
            and stamp < cutoff
        ]
        gone = self.reg.expire(at=at)
        assert sorted(gone) == sorted(due)
        for wid in gone:  # in the order the registry forgot them
            state = self.states[wid]
            self._forget(wid)
            self._log(wid, state, None)

    @precondition(lambda self: len(self.states) > 0)
    @rule()
    def reads_agree(self) -> None:
        for wid, state in self.states.items():
            assert [r.id for r in self.reg.list(state=state) if r.id == wid] == [wid]
            wanted = self.labels[wid]
            assert wid in [r.id for r in self.reg.list(labels=wanted)]

    @invariant()
    def matches_model(self) -> None:
        records = self.reg.list()
        assert [r.id for r in records] == list(self.states)
        assert {r.id: r.state for r in records} == self.states
        assert {r.id: r.labels for r in records} == self.labels
        assert {r.id: r.stopped_at for r in records} == self.stopped_at
        assert len(self.reg) == len(self.states)
        expected_counts = dict.fromkeys(State, 0)
        for state in self.states.values():
            expected_counts[state] += 1
        assert self.reg.counts() == expected_counts
        assert self.rec.tuples() == self.expected
        assert self.reg.seq == self.seq


RegistryMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRegistryMachine = RegistryMachine.TestCase

"""The JSON of records, serialized once per change (hive.api.record_json)."""

from __future__ import annotations

from hive.api.record_json import RecordJson
from hive.models import SpawnRequest, State, Worker, WorkerList
from hive.state.registry import Registry


def add(reg: Registry, worker_id: str) -> Worker:
    fields = {
        "id": worker_id,
        "model": "org/m",
        "backend": "demo",
        "device": "CPU-0",
        "port": 18000,
        "url": "http://127.0.0.1:18000",
        "labels": {"team": "ünïcode"},
    }
    return reg.add(SpawnRequest(model="org/m"), "tok", lambda entries: fields)


def test_a_listing_is_the_bytes_pydantic_writes_and_follows_each_change() -> None:
    reg, cache = Registry(), RecordJson()
    for i in range(3):
        add(reg, f"w{i}")
    records = reg.list()
    expected = WorkerList(workers=records, total=3).model_dump_json().encode()
    assert cache.listing(records, reg.ids()) == expected
    first = cache.one(reg.get("w1"))
    assert cache.one(reg.get("w1")) is first  # unchanged: the same bytes, not dumped again
    reg.attempt_started("w1", 4242)
    changed = cache.one(reg.get("w1"))
    assert changed is not first and b'"pid":4242' in changed
    records = reg.list()
    assert (
        cache.listing(records, reg.ids())
        == WorkerList(workers=records, total=3).model_dump_json().encode()
    )
    assert cache.listing([], reg.ids()) == b'{"workers":[],"total":0}'


def test_forgotten_records_leave_the_cache() -> None:
    reg, cache = Registry(), RecordJson()
    for i in range(100):
        add(reg, f"w{i}")
    cache.listing(reg.list(), reg.ids())
    for i in range(100):
        reg.attempt_ended(f"w{i}", State.STOPPED, exit_code=0, error=None)
        reg.remove(f"w{i}")
    add(reg, "last")
    cache.listing(reg.list(), reg.ids())
    assert set(cache._cache) == {"last"}


def test_the_whole_listing_is_kept_while_nothing_is_written() -> None:
    reg, cache = Registry(), RecordJson()
    add(reg, "a")
    first = cache.everything(*reg.versioned())
    assert cache.everything(*reg.versioned()) is first
    reg.update("a", in_flight=3)  # a write that tells no subscriber still moves the version
    second = cache.everything(*reg.versioned())
    assert second is not first and b'"in_flight":3' in second
    reg.attempt_ended("a", State.STOPPED, exit_code=0, error=None)
    reg.remove("a")
    assert cache.everything(*reg.versioned()) == b'{"workers":[],"total":0}'

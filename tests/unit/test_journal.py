"""The journal cannot be torn: every write is complete or not done at all, a failed write refuses
the change that waited for it, and a journal that cannot be read falls back to the generation
before it.

No daemon here: a :class:`Journal` over a real :class:`Registry`, on a real filesystem. The
full-disk case (a small tmpfs, filled up) is in tests/daemon/test_journal_full_disk.py, as
mounting the tmpfs takes a process. Faults the filesystem cannot be made to produce on demand
(a short write, EIO, a crash between two system calls) are made by patching the ``os`` call
itself, never hive's code.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from journals import (
    add,
    failing,
    files,
    generations,
    ids,
    journal_errors,
    journal_lines,
    workers_in,
    writing,
)

import hive.state.journal
from harness.waits import async_wait_for
from hive.state.journal import Journal, JournalError
from hive.state.registry import Registry

pytestmark = pytest.mark.timeout(60)

ENOSPC = os.strerror(errno.ENOSPC)  # "No space left on device"
EIO = os.strerror(errno.EIO)


# -- every write complete ----------------------------------------------------------------------


async def test_short_writes_are_resumed_until_the_whole_journal_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write, calls = os.write, []

    def short_write(fd: int, data: bytes) -> int:
        calls.append(len(data))
        return real_write(fd, bytes(data[:7]))  # as a signal or a quota may cut a write short

    monkeypatch.setattr(hive.state.journal.os, "write", short_write)
    path = tmp_path / "journal.json"
    registry = Registry()
    for worker_id in ("a", "b", "c"):
        add(registry, worker_id)
    async with writing(path, registry):
        pass
    assert ids(path) == ["a", "b", "c"]
    assert len(calls) > 10, "the journal was not written in many short pieces"
    assert files(tmp_path) == ["journal.json", "journal.json.1"]


@pytest.mark.parametrize(
    ("call", "nth", "what"),
    [
        ("write", 1, EIO),
        ("fsync", 1, f"fsync: {EIO}"),
        ("link", 1, f"keeping the previous journal as journal.json.1: {EIO}"),
        ("replace", 1, f"keeping the previous journal as journal.json.1: {EIO}"),
        ("replace", 2, f"rename: {EIO}"),
    ],
    ids=["write", "fsync", "link", "keep-previous", "rename"],
)
async def test_a_failed_step_leaves_the_old_journal_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, nth: int, what: str
) -> None:
    path = tmp_path / "journal.json"
    registry = Registry()
    add(registry, "a")
    async with writing(path, registry) as journal:
        add(registry, "b")
        await journal.flush()  # journal.json: a, b; journal.json.1: a
        before = {name: (tmp_path / name).read_bytes() for name in files(tmp_path)}

        monkeypatch.setattr(hive.state.journal.os, call, failing(call, lambda n: n == nth))
        add(registry, "c")
        with pytest.raises(JournalError) as refused:
            await journal.flush()
        assert str(refused.value) == f"cannot write {path}: {what}"
        monkeypatch.undo()

        assert (tmp_path / "journal.json").read_bytes() == before["journal.json"]
        assert files(tmp_path) == ["journal.json", "journal.json.1"]
        assert ids(path) == ["a", "b"]
        assert workers_in(journal.previous) in (["a"], ["a", "b"])


async def test_a_failing_journal_tries_again_by_itself_and_logs_once_each_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hive.journal")
    path = tmp_path / "journal.json"
    registry = Registry()
    add(registry, "a")
    monkeypatch.setattr(hive.state.journal.os, "fsync", failing("fsync", lambda n: n <= 4))
    journal = Journal(path, registry)
    journal.retry_interval = 0.01
    journal.start()
    try:
        with pytest.raises(JournalError, match="fsync: Input/output error"):
            await journal.flush()
        assert not journal.healthy
        await async_wait_for(lambda: journal.healthy, timeout=10, what="the journal to recover")
        assert ids(path) == ["a"]  # written by a retry: nothing was marked since the failure
    finally:
        await journal.close()
    assert len(journal_errors(caplog)) == 1
    assert journal_lines(caplog, "written again") == [
        f"journal: {path} written again, after 4 failed write(s)"
    ]
    assert files(tmp_path) == ["journal.json", "journal.json.1"]


async def test_a_failed_write_refuses_only_the_changes_it_was_to_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group writes stay: a change that arrives while a write is under way goes into the next
    one, so it is not refused for the failure of the write it was not in."""
    path = tmp_path / "journal.json"
    registry = Registry()
    entered, release = threading.Event(), threading.Event()
    real_write, first = os.write, True

    def write(fd: int, data: bytes) -> int:
        nonlocal first
        if first:
            first = False
            entered.set()
            release.wait(10)
            raise OSError(errno.ENOSPC, ENOSPC)
        return real_write(fd, data)

    async with writing(path, registry) as journal:
        monkeypatch.setattr(hive.state.journal.os, "write", write)
        add(registry, "a")
        in_failing_write = asyncio.create_task(journal.flush())
        await asyncio.to_thread(entered.wait, 10)
        add(registry, "b")  # while the write holding "a" is under way
        in_next_write = asyncio.create_task(journal.flush())
        release.set()
        with pytest.raises(JournalError):
            await in_failing_write
        await in_next_write  # the next write holds "a" and "b", and succeeds
        assert journal.healthy
        assert ids(path) == ["a", "b"]


async def test_close_reports_a_failed_last_write_without_raising(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "journal.json"
    registry = Registry()
    add(registry, "a")
    journal = Journal(path, registry)
    journal.start()
    await journal.flush()
    monkeypatch.setattr(hive.state.journal.os, "fsync", failing("fsync", lambda n: True))
    add(registry, "b")
    await journal.close()  # the rest of hive's shutdown must still happen
    assert not journal.healthy and journal.last_error == f"cannot write {path}: fsync: {EIO}"
    assert len(journal_errors(caplog)) == 1
    assert files(tmp_path) == ["journal.json"]
    assert ids(path) == ["a"]


# -- crash-safety: always a complete journal under journal.json or journal.json.1 ----------------


class Crash(BaseException):
    """hive dies here: no cleanup runs (BaseException passes every ``except OSError``)."""


@pytest.mark.parametrize(
    "nth",
    range(1, 7),
    ids=["write", "fsync", "link", "keep-previous", "rename", "fsync-directory"],
)
async def test_a_crash_at_any_step_of_a_write_leaves_complete_journals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nth: int
) -> None:
    path = tmp_path / "journal.json"
    registry = Registry()
    for worker_id in ("a", "b"):
        add(registry, worker_id)
        await Journal(path, registry).close()  # journal.json: a, b; journal.json.1: a
    calls = 0

    def crashing(name: str) -> Callable[..., Any]:
        real = getattr(os, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == nth:
                raise Crash(name)
            return real(*args, **kwargs)

        return call

    for name in ("write", "fsync", "link", "replace"):
        monkeypatch.setattr(hive.state.journal.os, name, crashing(name))
    add(registry, "c")
    with pytest.raises(Crash):
        await Journal(path, registry).close()
    monkeypatch.undo()

    # The next hive finds a whole journal, the old one or the new one, and no leftovers...
    assert ids(path) in (["a", "b"], ["a", "b", "c"])
    assert files(tmp_path) == ["journal.json", "journal.json.1"]
    # ...and even with journal.json torn now, the generation before it is whole. (A new file:
    # between the two renames journal.json and journal.json.1 are one file, a hard link.)
    torn = path.read_bytes()[: path.stat().st_size // 2]
    path.unlink()
    path.write_bytes(torn)
    journal = Journal(path, Registry())
    loaded = [saved.record.id for saved in journal.load()]
    assert journal.loaded_from == journal.previous
    assert loaded in (["a"], ["a", "b"]), loaded


async def test_without_hard_links_the_previous_generation_is_kept_by_renaming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hive.state.journal.os, "link", failing("link", lambda n: True, errno.EPERM))
    path = tmp_path / "journal.json"
    first, second, third = await generations(path, ["a"], ["a", "b"], ["a", "b", "c"])
    assert path.read_bytes() == third and (tmp_path / "journal.json.1").read_bytes() == second

    # journal.json went to .1 and the rename of the new one fails: it is put back.
    monkeypatch.setattr(hive.state.journal.os, "replace", failing("replace", lambda n: n == 2))
    registry = Registry()
    add(registry, "z")
    journal = Journal(path, registry)
    await journal.close()
    assert journal.last_error == f"cannot write {path}: rename: {EIO}"
    monkeypatch.undo()
    assert path.read_bytes() == third
    assert files(tmp_path) == ["journal.json"]
    assert first != third


# -- loading: journal.json, else journal.json.1 -------------------------------------------------


async def test_a_torn_journal_loads_from_the_previous_generation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "journal.json"
    first, second = await generations(path, ["a"], ["a", "b"])
    assert (tmp_path / "journal.json.1").read_bytes() == first, "not one write behind"
    torn = second[: len(second) // 2]
    path.write_bytes(torn)

    journal = Journal(path, Registry())
    assert [saved.record.id for saved in journal.load()] == ["a"]
    assert journal.loaded_from == tmp_path / "journal.json.1"
    assert (tmp_path / "journal.json.bad").read_bytes() == torn
    assert not path.exists()
    assert any(str(path) in line and "journal.json.bad" in line for line in journal_errors(caplog))


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\0\0\0\0",
        b"[]",
        b'"journal"',
        b'{"version": 2, "workers": []}',
        b'{"workers": []}',
        b'{"version": 1}',
        b'{"version": 1, "workers": {}}',
    ],
    ids=["empty", "zeros", "a-list", "a-string", "newer", "no-version", "no-workers", "not-a-list"],
)
async def test_a_journal_that_is_not_one_loads_from_the_previous_generation(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "journal.json"
    await generations(path, ["a"], ["a", "b"])
    path.write_bytes(content)
    journal = Journal(path, Registry())
    assert [saved.record.id for saved in journal.load()] == ["a"]
    assert journal.loaded_from == journal.previous
    assert (tmp_path / "journal.json.bad").read_bytes() == content


async def test_a_missing_journal_with_a_previous_generation_loads_it(tmp_path: Path) -> None:
    """hive stopped between the two renames of a write (no hard links), or after setting a bad
    journal aside and before writing a new one."""
    path = tmp_path / "journal.json"
    await generations(path, ["a"], ["a", "b"])
    path.unlink()
    journal = Journal(path, Registry())
    assert [saved.record.id for saved in journal.load()] == ["a"]
    assert journal.loaded_from == journal.previous


async def test_entries_that_do_not_validate_are_skipped_in_the_previous_generation_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "journal.json"
    await generations(path, ["a"], ["a", "b"])
    previous = json.loads((tmp_path / "journal.json.1").read_bytes())
    good = previous["workers"][0]
    previous["workers"] = [
        {**good, "record": {**good["record"], "state": "dancing"}},
        "not an entry",
        {"record": good["record"]},
        good,
    ]
    (tmp_path / "journal.json.1").write_text(json.dumps(previous))
    path.write_bytes(b"{torn")
    journal = Journal(path, Registry())
    assert [saved.record.id for saved in journal.load()] == ["a"]
    assert journal.loaded_from == journal.previous
    skipped = journal_lines(caplog, "skipping an entry")
    assert len(skipped) == 3


async def test_garbage_in_both_generations_loads_empty_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "journal.json"
    path.write_bytes(b"garbage")
    (tmp_path / "journal.json.1").write_bytes(b'{"version": 1, "workers": [')
    journal = Journal(path, Registry())
    assert journal.load() == []
    assert journal.loaded_from is None
    errors = journal_errors(caplog)
    assert any(line.startswith(f"journal {path} is not valid JSON") for line in errors), errors
    assert any(line.startswith(f"journal {journal.previous} is not") for line in errors), errors
    assert any("starting empty" in line for line in errors), errors
    assert files(tmp_path) == ["journal.json.1.bad", "journal.json.bad"]


async def test_a_first_start_loads_empty_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal(tmp_path / "journal.json", Registry())
    assert journal.load() == []
    assert journal.loaded_from is None
    assert [r for r in caplog.records if r.name == "hive.journal"] == []

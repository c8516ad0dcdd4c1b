"""The journal on a really full disk: a 64 KiB tmpfs, filled up (mounting it needs root and the
``mount`` program, hence this tier). The journal's other cases are in tests/unit/test_journal.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from journals import add, files, ids, journal_errors, journal_lines, writing

from harness.disk import CannotMount, fill, tmpfs
from hive.state.journal import JournalError
from hive.state.registry import Registry

pytestmark = pytest.mark.timeout(60)

ENOSPC = os.strerror(errno.ENOSPC)  # "No space left on device"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a real filesystem that can really be full. Needs root."""
    try:
        with tmpfs(tmp_path / "small", "64k") as mount_point:
            yield mount_point
    except CannotMount as exc:
        pytest.skip(str(exc))


async def test_a_full_disk_refuses_the_change_keeps_the_old_journal_and_recovers(
    small_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hive.journal")
    path = small_fs / "journal.json"
    registry = Registry()
    add(registry, "a")
    async with writing(path, registry) as journal:
        good = path.read_bytes()
        filler = fill(small_fs)

        add(registry, "b")  # the registry tells the journal: a write is due, and fails
        with pytest.raises(JournalError) as refused:
            await journal.flush()
        assert str(refused.value) == f"cannot write {path}: {ENOSPC}"
        assert refused.value.path == path
        assert not journal.healthy and journal.last_error == str(refused.value)
        add(registry, "c")
        with pytest.raises(JournalError):
            await journal.flush()

        assert path.read_bytes() == good
        assert files(small_fs) == ["filler", "journal.json"], "a temporary file was left"
        assert ids(path) == ["a"]

        filler.unlink()  # room again: the next write succeeds and clears the failure
        journal.mark()
        await journal.flush()
        assert journal.healthy and journal.last_error is None
        assert ids(path) == ["a", "b", "c"]
        assert json.loads(journal.previous.read_bytes()) == json.loads(good)

    errors = journal_errors(caplog)
    assert len(errors) == 1, f"one line when the journal fails, not one per write: {errors}"
    assert str(path) in errors[0] and ENOSPC in errors[0]
    assert len(journal_lines(caplog, "written again")) == 1
    assert files(small_fs) == ["journal.json", "journal.json.1"]

"""hive's file descriptors (hive.host.descriptors): the reserve it keeps, a shortage told once."""

from __future__ import annotations

import errno
import logging

import pytest

from hive.host import descriptors
from hive.host.descriptors import RESERVE, Shortage, in_reserve, kept_back, limit, said_plainly


def test_the_last_descriptors_are_the_reserve() -> None:
    top = limit()
    assert in_reserve(top - 1)
    assert in_reserve(top - RESERVE)
    assert not in_reserve(top - RESERVE - 1)
    assert not in_reserve(top - RESERVE // 2 - 1, share=0.5)  # the unix socket goes further
    assert in_reserve(top - RESERVE // 2, share=0.5)
    assert not in_reserve(3)


def test_running_out_is_said_plainly() -> None:
    plain = said_plainly(OSError(errno.EMFILE, "Too many open files"))
    assert plain.errno == errno.EMFILE
    assert (
        plain.strerror
        == f"hive is out of file descriptors (Too many open files; RLIMIT_NOFILE {limit()})"
    )
    assert said_plainly(kept_back()).strerror.startswith(  # type: ignore[union-attr]
        f"hive is out of file descriptors (the last {RESERVE} are kept for hive itself; "
    )
    other = OSError(errno.ENOENT, "No such file or directory")
    assert said_plainly(other) is other


def test_a_shortage_is_logged_once_per_burst(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(descriptors.time, "monotonic", lambda: clock[0])
    shortage = Shortage()
    emfile = OSError(errno.EMFILE, "Too many open files")
    with caplog.at_level(logging.WARNING, logger="hive"):
        for _ in range(1000):
            shortage.failed("accepting connections on 127.0.0.1:7070", emfile)
        clock[0] += 2.5
        shortage.recovered()
        shortage.recovered()  # nothing more to say
        # Back and forth within a minute: counted, not said.
        for _ in range(3):
            clock[0] += 1
            shortage.failed("accepting connections on 127.0.0.1:7070", emfile)
            shortage.recovered()
        clock[0] += descriptors.QUIET
        shortage.failed("accepting connections on /run/hive.sock", emfile)
        shortage.recovered()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines
    assert lines[0].startswith("out of file descriptors (Too many open files; RLIMIT_NOFILE ")
    assert "accepting connections on 127.0.0.1:7070 paused" in lines[0]
    assert lines[1] == "file descriptors again after 2.5 s (1000 refused meanwhile)"
    assert "/run/hive.sock" in lines[2]
    assert lines[3] == "file descriptors again after 0.0 s (4 refused meanwhile)"

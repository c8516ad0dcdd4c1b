"""Worker logs and declaration files read in bounded bytes: a tail is a window from the end, a
sparse log is truncated without copying its holes, hive's marker begins a line of its own, and
a FIFO or a big file in ``workers_dir`` is refused unread."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from hive.desired.declared import MAX_FILE_BYTES, read_paths
from hive.errors import DeclarationError
from hive.models import MARKER
from hive.workers.logs import TAIL_WINDOW, Logs


def test_a_line_longer_than_the_window_is_cut_and_marked(tmp_path: Path) -> None:
    logs = Logs(tmp_path, 1 << 30)
    logs.path("w").write_bytes(b"x" * (3 * TAIL_WINDOW) + b"\nshort\n")
    lines = logs.tail("w", 60).splitlines()
    assert len(lines) == 2 and lines[1] == "short"
    assert lines[0].startswith(f"{MARKER}(line cut: only its last {TAIL_WINDOW} bytes")
    assert len(lines[0]) < TAIL_WINDOW + 100


def test_a_tail_reaches_into_the_rotated_part_within_one_window(tmp_path: Path) -> None:
    logs = Logs(tmp_path, 1 << 30)
    (tmp_path / "w.log.1").write_text("".join(f"old {i}\n" for i in range(5)))
    logs.path("w").write_text("new 0\nnew 1\n")
    assert logs.tail("w", 3) == "old 4\nnew 0\nnew 1\n"
    assert logs.tail("w", 100).startswith("old 0\n")  # the whole of both: nothing marked cut
    assert logs.tail("w", 0) == ""


def test_the_marker_begins_a_line_of_its_own(tmp_path: Path) -> None:
    logs = Logs(tmp_path, 1 << 20)
    logs.path("w").write_text("no newline at the end")
    logs.mark("w", "exited with code 1")
    logs.mark("w", "attempt 2")
    text = logs.path("w").read_text()
    assert text.startswith(f"no newline at the end\n{MARKER}")
    assert text.count("\n") == 3  # one newline added, none doubled
    logs.mark("x", "attempt 1")  # a log that does not exist yet
    assert logs.path("x").read_text().startswith(MARKER)


def test_the_marker_begins_a_line_of_its_own_after_a_truncation_too(tmp_path: Path) -> None:
    logs = Logs(tmp_path, max_bytes=10_000)
    logs.path("w").write_text("y" * 6_000 + "last words")
    logs.cap("w", now=0.0)
    assert logs.path("w").stat().st_size == 0  # the last words are in w.log.1
    logs.mark("w", "exited with code 3")
    before, marker = logs.tail("w", 2).splitlines()
    assert before.endswith("ylast words") and marker.startswith(MARKER), (before[-20:], marker)


def test_a_sparse_log_is_truncated_without_copying_its_holes(tmp_path: Path) -> None:
    logs = Logs(tmp_path, max_bytes=10_000_000)
    path = logs.path("w")
    with path.open("wb") as file:
        file.write(b"first\n")
        file.truncate(4 << 30)  # a 4 GiB hole
        file.seek(0, os.SEEK_END)
        file.write(b"last words")
    logs.cap("w", now=0.0)
    rotated = tmp_path / "w.log.1"
    assert path.stat().st_size == 0
    assert rotated.stat().st_size == 5_000_000  # the last half cap, in length
    assert rotated.stat().st_blocks * 512 <= 1 << 20  # but not on disk
    assert rotated.read_bytes().endswith(b"last words")
    assert logs.last_line("w") is None
    assert logs.tail("w", 1) == "last words"  # the hole reads as nothing


async def test_a_follower_reads_in_chunks_and_skips_a_hole(tmp_path: Path) -> None:
    logs = Logs(tmp_path, 1 << 40)
    path = logs.path("w")
    path.write_text("before\n")
    got = []
    async for chunk in logs.follow("w", 10, done=lambda: len(got) > 1, poll=0.01):
        got.append(chunk)
        if len(got) == 1:
            with path.open("r+b") as file:
                file.truncate(1 << 30)  # a hole, then a line
                file.seek(0, os.SEEK_END)
                file.write(b"after\n")
    assert got[0] == b"before\n"
    assert b"".join(got[1:]) == b"after\n"  # the hole: seeked over, never sent


def test_a_fifo_or_a_big_file_in_workers_dir_is_refused_unread(tmp_path: Path) -> None:
    directory = tmp_path / "workers.d"
    directory.mkdir()
    os.mkfifo(directory / "x.toml")
    with pytest.raises(DeclarationError, match=r"x\.toml: not a regular file \(a FIFO\)"):
        read_paths([directory], str)  # no writer: it would block for ever if opened
    (directory / "x.toml").unlink()
    with (directory / "big.toml").open("wb") as file:
        file.truncate(1 << 30)
    with pytest.raises(DeclarationError, match=rf"big\.toml: larger than {MAX_FILE_BYTES} bytes"):
        read_paths([directory], str)
    (directory / "big.toml").unlink()
    (directory / "sub.toml").mkdir()
    with pytest.raises(DeclarationError, match=r"sub\.toml: not a regular file \(a directory\)"):
        read_paths([directory], str)


def test_a_pipe_named_by_the_operator_is_read(tmp_path: Path) -> None:
    fifo = tmp_path / "w.toml"
    os.mkfifo(fifo)

    def write() -> None:
        with fifo.open("w") as pipe:
            pipe.write('[[workers]]\nid = "a"\nmodel = "m"\n')

    writer = threading.Thread(target=write)
    writer.start()
    declared = read_paths([fifo], str)  # ``hive apply -f <(...)``
    writer.join()
    assert [item.spec.id for item in declared] == ["a"]

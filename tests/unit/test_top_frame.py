"""``hive top``'s frame at 80x24: failed and starting workers first, CPU, RSS and the error
visible (MODEL, AGE... give way), "+N more" for the rows past the bottom, and every figure
marked stale with "hive unreachable since HH:MM:SS" once hive has gone away."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hive.cli.top import frame
from hive.models import Node, State, Worker


def worker(i: int, state: State = State.READY, error: str | None = None) -> Worker:
    now = datetime.now(UTC)
    return Worker.model_construct(
        id=f"w-{i:02d}",
        model="Qwen/Qwen2.5-7B-Instruct-GGUF/qwen2.5-7b-instruct-q4_k_m.gguf",
        state=state,
        draining=False,
        device="CPU-0",
        pid=1000 + i,
        created_at=now - timedelta(minutes=5),
        started_at=now - timedelta(minutes=5),
        restarts=0,
        cpu_percent=12.0,
        rss_bytes=512 << 20,
        error=error,
    )


NODE = Node.model_construct(version="0.1", hostname="box")


def test_at_80x24_the_failed_come_first_with_cpu_rss_error_and_a_count_of_the_rest() -> None:
    workers = [worker(i) for i in range(30)]
    workers.append(worker(98, State.FAILED, "exited with code 3: CUDA out of memory (tried 2 GiB)"))
    workers.append(worker(99, State.STARTING))
    lines = frame(NODE, None, workers, 80, 24)
    assert len(lines) == 24 and all(len(line) <= 80 for line in lines)
    header = lines[2].split()
    assert {"CPU", "RSS", "ERROR"} <= set(header) and "MODEL" not in header, header
    assert lines[3].startswith("w-98") and "exited with code" in lines[3]
    assert lines[4].startswith("w-99")
    assert lines[-1].startswith("+12 more")


def test_a_wide_terminal_shows_every_column() -> None:
    lines = frame(NODE, None, [worker(1)], 200)
    assert lines[2].split()[:3] == ["ID", "MODEL", "STATE"]
    assert not any("more" in line for line in lines)


def test_unreachable_marks_the_figures_stale() -> None:
    since = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    lines = frame(NODE, None, [worker(1)], 120, stale_since=since, note="connection refused")
    shown = f"{since.astimezone():%H:%M:%S}"
    assert lines[0].startswith(f"hive unreachable since {shown} (connection refused) · hive ")
    assert lines[2] == f"STALE: as of {shown}, before hive went away"


def test_at_80_columns_the_unreachable_notice_is_not_cut_off() -> None:
    """It ended the header, and 80 columns cut it to 'hive unreachable si' (the tour)."""
    since = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    workers = [worker(i) for i in range(3)] + [worker(9, State.FAILED, "exited with code 3")]
    lines = frame(NODE, None, workers, 80, 24, live=True, stale_since=since)
    assert lines[0].startswith(f"hive unreachable since {since.astimezone():%H:%M:%S} · hive 0.1")

"""The book of learned peaks (kept in state_dir, read back by the next hive) and the default
host memory budget."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from hive.devices.host_memory import default_budget
from hive.state.memory_book import KEPT, MemoryBook


async def test_the_largest_of_the_last_runs_is_learned_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "memory.json"
    book = MemoryBook(path)
    book.start()
    about = {"backend": "llama-server", "model": "m.gguf"}
    for host, gpu in [(900, None), (1000, None), (950, 3000), (940, None)]:
        book.learn("k", about, host, gpu)
    learned = book.learned("k")
    assert learned is not None
    # Only the last KEPT runs count: 900 is forgotten, and so is no run's GPU figure.
    assert (learned.host_mib, learned.gpu_mib, learned.runs) == (1000, 3000, KEPT)
    assert book.learned("other") is None
    await book.close()

    again = MemoryBook(path)
    await asyncio.to_thread(again.load)
    assert again.learned("k") == learned
    saved = json.loads(path.read_text())
    assert saved["entries"]["k"]["about"] == about
    assert not list(tmp_path.glob(".*partial"))  # written whole, then renamed


async def test_an_unreadable_book_is_set_aside_and_learning_starts_anew(tmp_path: Path) -> None:
    path = tmp_path / "memory.json"
    path.write_text("{not json")
    book = MemoryBook(path)
    await asyncio.to_thread(book.load)
    assert len(book) == 0
    assert (tmp_path / "memory.json.bad").read_text() == "{not json"


def test_the_default_budget_keeps_a_tenth_back_within_bounds() -> None:
    assert default_budget(24105) == 24105 - 2410
    assert default_budget(4096) == 4096 - 1024  # at least 1 GiB kept back
    assert default_budget(512 * 1024) == 512 * 1024 - 8192  # at most 8 GiB

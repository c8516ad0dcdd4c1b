"""Start-up phases read from a log as it is written (hive.workers.phases), over a real file in a
temp directory and the real patterns of the built-in backends, with lines as vLLM 0.32 (CPU) and
llama-server 0.3.36 print them. The daemon and the real engines are in
tests/daemon/test_startup_phases.py and tests/external/."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from harness.waits import async_wait_for
from hive.config import Config, ConfigError, parse_config
from hive.models import MARKER, StartupPhase
from hive.workers.phases import LINE_KEPT, READ_MAX, StartupClock

VLLM_LINES = [
    "(APIServer pid=1) INFO 12-06 07:58:34 [api_utils.py:286] non-default args: {}",
    "(Worker pid=3) INFO 12-06 08:01:32 [cpu_model_runner.py:68] Starting to load model /m...",
    "(Worker pid=3) INFO 12-06 08:01:33 [default_loader.py:501] Loading weights took 0.01 seconds",
    "(Worker pid=3) INFO 12-06 08:01:34 [cpu_model_runner.py:87] Warming up model for the "
    "compilation...",
    "(Worker pid=3) INFO 12-06 08:02:16 [cpu_model_runner.py:91] Warming up done.",
    "(EngineCore pid=2) INFO 12-06 08:02:16 [kv_cache_utils.py:2327] CPU KV cache size: "
    "1,048,576 tokens, Maximum concurrency for 4,096 tokens per request: 256.00x",
    "(EngineCore pid=2) INFO 12-06 08:02:17 [core.py:402] init engine (profile, create kv cache, "
    "warmup model) took 43.05 s",
    "(APIServer pid=1) INFO 12-06 08:02:22 [entry.py:140] Starting vLLM server on "
    "http://127.0.0.1:18778",
    "(APIServer pid=1) INFO:     Application startup complete.",
]


class Published:
    def __init__(self) -> None:
        self.phases: list[StartupPhase] = []

    def __call__(self, phases: list[StartupPhase]) -> None:
        self.phases = phases

    def names(self) -> list[str]:
        return [p.phase for p in self.phases]


def write(log: Path, text: str | bytes) -> None:
    with log.open("ab") as f:
        f.write(text.encode() if isinstance(text, str) else text)


async def test_vllm_lines_cut_its_phases_in_order_and_they_sum_to_ready(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    write(log, f"{MARKER}2026-01-01T00:00:00Z attempt 1: vllm serve m\n")
    published = Published()
    clock = StartupClock(published)
    clock.begin()
    clock.launch(0.0, log, Config().backends["vllm"].startup_phases)
    await asyncio.sleep(0.05)
    clock.exec()
    follow = asyncio.create_task(clock.follow())
    try:
        for line in VLLM_LINES:
            await asyncio.sleep(0.05)
            write(log, line + "\n")
        expected = [
            "hive", "process", "engine", "weights", "compile", "kv cache", "engine ready",
            "api server", "listening",
        ]  # fmt: skip
        await async_wait_for(lambda: published.names() == expected, timeout=10, what="phases")
        assert clock.begun is not None
        begun = clock.begun
        clock.ready()
        await async_wait_for(lambda: published.names()[-1:] == ["probe"], timeout=10)
    finally:
        follow.cancel()
    assert clock.ready_at is not None
    total = clock.ready_at - begun
    assert sum(p.seconds for p in published.phases) == pytest.approx(total, abs=0.01)
    assert all(p.seconds >= 0 for p in published.phases)
    assert published.phases[0].seconds >= 0.04  # hive's own part: begin to exec


async def test_lines_seen_only_at_ready_are_dated_at_ready(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    published = Published()
    clock = StartupClock(published)
    clock.launch(0.0, log, Config().backends["llama-server"].startup_phases)
    clock.exec()
    write(log, "0.00.006 I srv    load_model: loading model '/m.gguf'\n")
    write(log, "0.00.022 I srv  llama_server: model loaded\n")
    write(log, "0.00.022 I srv  llama_server: listening on http://127.0.0.1:1\n")
    clock.ready()  # before any read: the last read finds them all
    await async_wait_for(lambda: published.names()[-1:] == ["probe"], timeout=10)
    assert published.names() == ["hive", "process", "init", "model", "listening", "probe"]
    assert [p.seconds for p in published.phases[2:]] == [0.0, 0.0, 0.0, 0.0]


async def test_long_lines_floods_and_truncation_cost_bounded_reads(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    published = Published()
    clock = StartupClock(published)
    clock.launch(0.0, log, Config().backends["vllm"].startup_phases)
    clock.exec()
    follow = asyncio.create_task(clock.follow())
    try:
        # A line far longer than what is kept, with a pattern past its kept part: not a cut.
        write(log, b"x" * (LINE_KEPT * 3) + b" Loading weights took 1 s\n")
        # A line without its end yet, then its end: one line, searched once it is whole.
        write(log, b"... Starting to load ")
        await asyncio.sleep(0.3)
        write(log, b"model m\n")
        await async_wait_for(lambda: "engine" in published.names(), timeout=10, what="engine")
        assert "weights" not in published.names()
        # A flood larger than a read: skipped to its last part, whose line is still seen.
        write(log, (b"tqdm \r" * 1000 + b"\n") * (READ_MAX // 6000 * 2))
        write(log, b"Loading weights took 0.01 seconds\n")
        await async_wait_for(lambda: "weights" in published.names(), timeout=10, what="weights")
        # The log truncated in place (capped): followed from its top again.
        log.write_bytes(b"")
        write(log, b"Warming up done.\n")
        await async_wait_for(lambda: "compile" in published.names(), timeout=10, what="compile")
    finally:
        follow.cancel()
    assert published.names() == ["hive", "process", "engine", "weights", "compile"]


async def test_a_successor_sharing_the_log_makes_no_process_cut(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    published = Published()
    clock = StartupClock(published)
    clock.launch(5.0, log, Config().backends["demo"].startup_phases, shared=True)
    clock.exec()
    write(log, "GET /v1/models 200 (the worker it replaces, still serving)\n")
    write(log, "demo worker: pid 12 serving 'm' on http://127.0.0.1:1 (loading for 0 s)\n")
    started = time.monotonic()
    follow = asyncio.create_task(clock.follow())
    try:
        await async_wait_for(lambda: published.names() == ["hive", "listening"], timeout=10)
    finally:
        follow.cancel()
    assert published.phases[0].seconds >= 5.0  # began 5 s before launch (the record's age)
    assert time.monotonic() - started < 60


def test_phase_patterns_are_checked() -> None:
    with pytest.raises(ConfigError, match="not a regular expression"):
        parse_config('[backends.demo]\nstartup_phases = [{phase = "a", pattern = "("}]')
    with pytest.raises(ConfigError, match="'probe' is a phase hive names itself"):
        parse_config('[backends.demo]\nstartup_phases = [{phase = "probe", pattern = "x"}]')
    with pytest.raises(ConfigError, match="startup_phases"):
        parse_config('[backends.demo]\nstartup_phases = [{phase = "a"}]')

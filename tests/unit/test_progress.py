"""Half-alive engines, without processes: what the load reads say of an engine's progress
(vLLM's /metrics and llama-server's /slots as they answer), and the stall clock those reads
drive (hive.workers.progress). A worker stalled through a real daemon is in
tests/daemon/test_stall.py; the real engines are in tests/external/test_vllm_stall.py."""

from __future__ import annotations

import pytest

from hive.config import BackendConfig, Config, ConfigError, parse_config
from hive.engine_config import LoadConfig
from hive.workers.engine_load import Load, parse
from hive.workers.progress import ProgressWatch
from hive.workers.stall import LoopWatch

VLLM = Config().backends["vllm"]
LLAMA = Config().backends["llama-server"]


def vllm_page(running: int, tokens: float, steps: float) -> bytes:
    """vLLM 0.32's /metrics, in part, as its CPU build answers it (labels as it has them)."""
    labels = '{engine="0",model_name="tiny"}'
    return f"""# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{labels} {running}.0
vllm:num_requests_waiting{labels} 0.0
vllm:prompt_tokens_total{labels} 10.0
vllm:prompt_tokens_created{labels} 1.7965441399773762e+09
vllm:generation_tokens_total{labels} {tokens}
vllm:generation_tokens_created{labels} 1.796544139980743e+09
vllm:iteration_tokens_total_count{labels} {steps}
vllm:iteration_tokens_total_sum{labels} 99.0
""".encode()


def slots(*busy: tuple[int, int]) -> bytes:
    """llama-server's /slots (fields trimmed as 0.3.36 answers them): one slot per (task,
    tokens decoded), and an idle one."""
    entries = [
        '{"id": 9, "n_ctx": 256, "speculative": false, "is_processing": false}',
        *(
            f'{{"id": {i}, "is_processing": true, "id_task": {task}, "n_prompt_tokens": 10,'
            f' "n_prompt_tokens_processed": 10, "next_token": [{{"has_next_token": true,'
            f' "n_remain": 100, "n_decoded": {decoded}}}]}}'
            for i, (task, decoded) in enumerate(busy)
        ),
    ]
    return ("[" + ",".join(entries) + "]").encode()


def test_vllm_progress_is_its_tokens_and_engine_steps() -> None:
    assert VLLM.load is not None
    load = parse(VLLM.load, vllm_page(1, 40.0, 12.0))
    assert load.running == 1
    assert load.progress == (40.0, 10.0, 12.0)
    assert parse(VLLM.load, vllm_page(1, 40.0, 13.0)).progress != load.progress


def test_a_page_without_the_progress_counters_says_nothing_of_progress() -> None:
    config = LoadConfig(path="/metrics", format="prometheus", running=["r"], progress=["gone"])
    assert parse(config, b"r 2\n") == Load(running=2, progress=None)


def test_llama_server_progress_is_its_slots_tasks_and_tokens() -> None:
    assert LLAMA.load is not None
    first = parse(LLAMA.load, slots((7, 100), (8, 5)))
    assert first.running == 2
    assert parse(LLAMA.load, slots((7, 100), (8, 5))).progress == first.progress
    assert parse(LLAMA.load, slots((7, 101), (8, 5))).progress != first.progress
    # A new task in a slot that decoded as many tokens as the last: progress all the same.
    assert parse(LLAMA.load, slots((9, 100), (8, 5))).progress != first.progress
    assert parse(LLAMA.load, slots()).progress == ()
    # An older llama-server without n_decoded: nothing said, so no stall can be called.
    old = b'[{"id": 0, "is_processing": true, "id_task": 3}]'
    assert parse(LLAMA.load, old).progress is None


def backend(timeout: float = 10.0) -> BackendConfig:
    return BackendConfig(
        command=["x"],
        stall_timeout=timeout,
        load=LoadConfig(path="/metrics", format="prometheus", running=["r"], progress=["t"]),
    )


def load(running: int, tokens: float) -> Load:
    return Load(running=running, progress=(tokens,))


def test_a_busy_engine_that_progresses_never_stalls() -> None:
    watch, config = ProgressWatch(LoopWatch()), backend(10)
    for second in range(0, 600, 2):  # ten minutes busy, a token every read
        watch.seen(load(4, second), float(second))
        assert watch.verdict(config, second + 1.9) is None
    # Reads as far apart as the timeout: the clock runs out just as the next read is due,
    # and that read (which finds progress) decides, not the clock.
    watch, config = ProgressWatch(LoopWatch()), backend(2)
    for second in range(0, 60, 2):
        assert watch.verdict(config, float(second)) is None
        watch.seen(load(2, second), float(second))


def test_a_busy_engine_whose_progress_stands_still_stalls_after_the_timeout() -> None:
    watch, config = ProgressWatch(LoopWatch()), backend(10)
    watch.seen(load(0, 5), 0.0)  # idle: no clock
    assert watch.due(10) is None
    watch.seen(load(2, 5), 2.0)  # work came (the clock starts here, not at the idle read)
    watch.seen(load(2, 6), 4.0)  # and progressed
    for t in (6.0, 8.0, 10.0, 12.0):
        watch.seen(load(2, 6), t)
    assert watch.due(10) == 14.0
    assert watch.verdict(config, 13.9) is None
    # The clock ran out, but no read was made since: one more must be, and decides.
    assert watch.confirm(10, 14.0) and watch.verdict(config, 14.0) is None
    watch.seen(load(2, 6), 14.1)
    assert not watch.confirm(10, 14.1)
    why = watch.verdict(config, 14.1)
    assert why is not None and why.startswith("stalled: 2 requests in flight and no progress")
    assert "t unchanged" in why
    watch.seen(load(2, 7), 14.5)  # it moved after all
    assert watch.verdict(config, 15.0) is None


def test_idle_or_silent_engines_have_no_clock() -> None:
    watch, config = ProgressWatch(LoopWatch()), backend(1)
    watch.seen(load(2, 1), 0.0)
    watch.seen(load(0, 1), 1.0)  # done: idle
    assert watch.verdict(config, 100.0) is None
    watch.seen(Load(running=3, progress=None), 2.0)  # a page without the counters
    assert watch.verdict(config, 100.0) is None
    watch.seen(load(3, 1), 3.0)
    watch.seen(load(3, 1), 100.0)
    assert watch.verdict(config, 100.0) is not None
    assert watch.verdict(backend(0), 100.0) is None  # stall_timeout = 0: never


def test_failed_reads_of_a_busy_engine_keep_the_clock_running() -> None:
    watch, config = ProgressWatch(LoopWatch()), backend(10)
    watch.seen(load(1, 1), 0.0)
    watch.seen(None, 5.0, "no answer within 2s")
    watch.seen(None, 10.0, "no answer within 2s")
    why = watch.verdict(config, 10.0)
    assert why == (
        "stalled: 1 request in flight and /metrics unanswered for 10s (stall_timeout); "
        "last: no answer within 2s"
    )
    # A read that failed on hive's side (no file descriptor) learnt nothing: the clock
    # starts over rather than blame the engine.
    watch.seen(None, 9.0, "Too many open files", blind=True)
    assert watch.verdict(config, 18.9) is None


def test_stall_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="stall_timeout"):
        parse_config('[backends.demo]\nstall_timeout = -1\ncommand = ["x"]')
    with pytest.raises(ConfigError, match='progress are for format = "prometheus" only'):
        parse_config('[backends.demo.load]\npath = "/slots"\nformat = "sglang"\nprogress = ["x"]')
    with pytest.raises(ConfigError, match="deep_probe_period"):
        parse_config('[backends.demo]\ndeep_probe_period = 0\ncommand = ["x"]')
    assert VLLM.stall_timeout == 60 and VLLM.deep_probe_period is None

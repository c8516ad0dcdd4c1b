"""Why an attempt ended (hive.workers.cause): the line of a log that says why, read from its
end and bounded in bytes; "out of memory" when the cgroup's count says so; the error's shape."""

from __future__ import annotations

import os
from pathlib import Path

from hive.workers.cause import (
    WINDOW,
    error_of_exit,
    oom_from_cgroup,
    oom_from_kernel_log,
    pick_line,
    read_tail,
)

VLLM_PYDANTIC = """\
INFO 07-10 12:00:01 [__init__.py:244] Automatically detected platform cuda.
(APIServer pid=1) INFO 07-10 12:00:04 [api_server.py:1880] vLLM API server version 0.33.0
Traceback (most recent call last):
  File "/opt/vllm/bin/vllm", line 10, in <module>
    sys.exit(main())
  File "/opt/vllm/lib/python3.12/site-packages/vllm/engine/arg_utils.py", line 1003, in create
    return ModelConfig(
           ^^^^^^^^^^^^
pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig
  Value error, Invalid repository ID or local directory specified: 'no/such-model'. \
[type=value_error, input_value=ArgsKwargs((), {'model': 'no/such-model'}), input_type=ArgsKwargs]
    For further information visit https://errors.pydantic.dev/2.11/v/value_error
"""

VLLM_NANOBIND = """\
(EngineCore_0 pid=212) ERROR 07-10 12:01:10 [core.py:700] EngineCore failed to start.
(EngineCore_0 pid=212) Traceback (most recent call last):
(EngineCore_0 pid=212)   File "/opt/vllm/lib/python3.12/site-packages/vllm/v1/engine/core.py"
(EngineCore_0 pid=212) torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. \
GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is free.
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
nanobind: leaked 2 instances!
 - leaked instance 0x7f1c2c0b5d58 of type "xgrammar.xgrammar_bindings.GrammarMatcher"
nanobind: leaked 1 types!
 - leaked type "xgrammar.xgrammar_bindings.TokenizerInfo"
nanobind: this is likely caused by a reference counting issue in the binding code.
See https://nanobind.readthedocs.io/en/latest/refleaks.html
"""

VLLM_ENGINE_DIED = """\
(APIServer pid=1) INFO:     127.0.0.1:51234 - "POST /v1/completions HTTP/1.1" 200 OK
(APIServer pid=1) ERROR 07-10 12:05:00 [core_client.py:564] Engine core proc EngineCore_0 \
died unexpectedly, shutting down client.
(APIServer pid=1) INFO:     Shutting down
(APIServer pid=1) INFO:     Waiting for application shutdown.
(APIServer pid=1) INFO:     Application shutdown complete.
(APIServer pid=1) INFO:     Finished server process [1]
"""


def test_a_pydantic_error_is_its_value_error_not_the_url_after_it() -> None:
    line = pick_line(VLLM_PYDANTIC)
    assert line is not None
    assert line.startswith("Value error, Invalid repository ID or local directory specified")


def test_nanobind_noise_after_the_error_is_passed_over() -> None:
    line = pick_line(VLLM_NANOBIND)
    assert line == (
        "RuntimeError: Engine core initialization failed. See root cause above. "
        "Failed core proc(s): {}"
    )


def test_an_engine_that_died_is_the_error_line_before_the_calm_shutdown() -> None:
    line = pick_line(VLLM_ENGINE_DIED)
    assert line is not None and "Engine core proc EngineCore_0 died unexpectedly" in line


def test_without_an_error_the_last_line_that_is_not_boilerplate() -> None:
    assert pick_line("loading\nserving on :8000\nSee https://example.org/docs\n") == (
        "serving on :8000"
    )
    assert pick_line("https://example.org/only-a-url\n") is None
    assert pick_line("") is None


def test_hive_markers_are_never_the_line_even_glued_onto_one() -> None:
    text = "ValueError: bad\n--- hive: 2026-01-01 attempt 2: x\nhalf a line--- hive: t killed\n"
    assert pick_line(text) == "ValueError: bad"


def test_a_line_is_cut_to_500_characters() -> None:
    line = pick_line("RuntimeError: " + "x" * 2000 + "\n")
    assert line is not None and len(line) == 500


def test_the_tail_is_bounded_and_starts_at_a_line(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    with log.open("wb") as file:
        file.write(b"x" * (3 * WINDOW) + b"\nValueError: the real cause\nSee https://x.y/z\n")
    text = read_tail(log)
    assert len(text.encode()) <= WINDOW and text.startswith("ValueError")
    assert pick_line(text) == "ValueError: the real cause"


def test_a_sparse_log_reads_only_its_end(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    with log.open("wb") as file:
        file.truncate(1 << 32)  # a 4 GiB hole
        file.seek(0, os.SEEK_END)
        file.write(b"\nRuntimeError: after the hole\n")
    assert pick_line(read_tail(log)) == "RuntimeError: after the hole"


def test_a_short_log_reaches_into_its_older_part(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    (tmp_path / "w.log.1").write_text("ValueError: before the rotation\n")
    log.write_text("INFO shutting down\n")
    assert pick_line(read_tail(log)) == "ValueError: before the rotation"


def test_what_is_not_a_regular_file_is_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "w.log"
    os.mkfifo(fifo)
    assert read_tail(fifo) == ""  # and it did not block waiting for a writer
    assert read_tail(tmp_path / "missing.log") == ""


def test_out_of_memory_when_the_cgroup_counted_a_kill() -> None:
    assert oom_from_cgroup(0, 1) == "the kernel's OOM killer ended 1 process of its cgroup"
    assert oom_from_cgroup(2, 4) == "the kernel's OOM killer ended 2 processes of its cgroup"
    assert oom_from_cgroup(1, 1) is None
    assert oom_from_cgroup(None, 3) is None and oom_from_cgroup(0, None) is None


def test_a_kernel_log_that_cannot_be_read_says_nothing(tmp_path: Path) -> None:
    assert oom_from_kernel_log(1234, 0.0, str(tmp_path / "no-kmsg")) is None


def test_the_error_says_what_ended_it() -> None:
    assert error_of_exit(3, True, None, "ValueError: x") == "exited with code 3: ValueError: x"
    assert error_of_exit(0, True, None, "bye") == (
        "exited with code 0 while it was wanted running: bye"
    )
    assert error_of_exit(0, False, None, None) == "exited with code 0"
    assert error_of_exit(-9, True, "the kernel's OOM killer ended its pid 7 (python3)", "x") == (
        "out of memory (the kernel's OOM killer ended its pid 7 (python3)); "
        "killed by signal 9 (SIGKILL) (its last output: x)"
    )

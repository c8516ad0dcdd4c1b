"""engines/llama_server.py without building anything: where the binary goes, and reuse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from engines import llama_server


def test_a_cached_binary_is_reused_not_rebuilt(tmp_path: Path) -> None:
    version = llama_server.LLAMA_CPP_PYTHON_VERSION
    binary = tmp_path / "hive" / "llama.cpp" / version / "bin" / "llama-server"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    script = Path(llama_server.__file__)
    env = {"XDG_CACHE_HOME": str(tmp_path), "PATH": "/nonexistent"}  # no cmake, no pip to reach
    done = subprocess.run(
        [sys.executable, str(script), "build"], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(binary)
    assert "reusing cached" in done.stderr
    where = subprocess.run(
        [sys.executable, str(script), "path"], env=env, capture_output=True, text=True, timeout=30
    )
    assert where.stdout.strip() == str(binary)

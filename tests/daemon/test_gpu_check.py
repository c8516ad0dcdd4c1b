"""``make gpu-check`` (gpu/check.py) runs its checks against the stand-in NVML here, so that the
script that proves the GPU path on a real GPU is known to work before a host with one is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_gpu_check_passes_against_the_stand_in_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "gpu" / "check.py"), "--stand-in", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gpu-check: against the stand-in NVML" in result.stdout
    assert "no NVIDIA GPU was used" in result.stdout
    figures = json.loads(out.read_text())
    assert "stand-in" in figures["driver"]
    checks = {row["check"]: row for row in figures["rows"]}
    assert all(row["ok"] for row in figures["rows"]), figures
    for name in (
        "memory total",
        "worker sees GPU-0's UUID",
        "record's GPU memory",
        "GPU memory back and no process after stop",
        "GPU memory back and no process after SIGKILL",
        "nothing left running",
    ):
        assert name in checks, sorted(checks)
    assert any(
        name.startswith("two of") and "HTTP 503" in row["figure"] for name, row in checks.items()
    )

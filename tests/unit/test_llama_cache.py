"""engines/llama_server.py without building or running anything: where the binary goes. Its reuse of
a cached binary, run as a script, is in tests/daemon/test_llama_build.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engines import llama_server


def test_the_binary_lives_in_the_cache_keyed_by_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert llama_server.binary_path("1.2.3") == tmp_path / "hive/llama.cpp/1.2.3/bin/llama-server"
    pinned = llama_server.binary_path()
    assert pinned.parent.parent.name == llama_server.LLAMA_CPP_PYTHON_VERSION
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert llama_server.cache_dir("1.2.3") == tmp_path / "home/.cache/hive/llama.cpp/1.2.3"

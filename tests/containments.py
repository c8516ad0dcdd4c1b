"""The containment kinds a test runs under: ``cgroup`` where this host gives hive a writable
cgroup v2 (skipped, saying why, where not), and ``tags`` everywhere."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from hivetest import Hive

from hive.host.containment import Cgroups


def cgroups_here() -> bool:
    """True where hive could make cgroups of its own here (a probe made and removed)."""
    cgroups, _ = Cgroups.discover(f"probe-{os.getpid()}")
    if cgroups is None:
        return False
    cgroups.close()
    return True


KINDS = [
    pytest.param(
        "cgroup",
        marks=pytest.mark.skipif(not cgroups_here(), reason="no writable cgroup v2 here"),
    ),
    "tags",
]


@contextlib.contextmanager
def hive_with_backend(
    kind: str, backend: str, script: Path, env: Mapping[str, str], out: Path
) -> Iterator[Hive]:
    """A started hive under containment ``kind`` with one backend, ``backend``, that runs the test
    worker ``script``; ``{socket}`` in ``env``'s values is hive's unix socket (such workers call
    it). ``hive.out`` is ``out`` and ``hive.kind`` is ``kind``; it must stop with exit 0."""
    daemon = Hive()
    values = ", ".join(f'{k} = "{v.format(socket=daemon.socket)}"' for k, v in env.items())
    with daemon.config_path.open("a") as config:
        config.write(
            f'containment = "{kind}"\n\n[backends.{backend}]\n'
            f'command = ["{{python}}", "{script}", "--port", "{{port}}", "--model", "{{model}}"]\n'
            f"env = {{ {values} }}\n"
        )
    try:
        daemon.start()
        daemon.out = out  # type: ignore[attr-defined]
        daemon.kind = kind  # type: ignore[attr-defined]
        yield daemon
        assert daemon.stop() == 0, daemon.log()
    finally:
        daemon.cleanup()

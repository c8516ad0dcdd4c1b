"""The containment kinds a test runs under: ``cgroup`` where this host gives hive a writable
cgroup v2 (skipped, saying why, where not), and ``tags`` everywhere."""

from __future__ import annotations

import os

import pytest

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

"""A hive that detaches at exit (the default) leaves no empty cgroup of its own behind.

The harness removes what a hive left when it cleans up (a killed hive leaves its cgroups by
design), so this looks right after the clean stop, before that."""

from __future__ import annotations

import pytest
from hivetest import Hive


def test_a_detaching_hive_with_no_workers_removes_its_cgroup() -> None:
    hive = Hive(on_exit=None)  # hive's default: detach
    try:
        hive.start()
        made = hive.cgroups()
        if "containment: tags" in hive.log():
            pytest.skip("this host gives hive no cgroup v2 of its own (tag containment)")
        assert made, "hive said it uses cgroups, but made none"
        assert hive.stop() == 0
        assert [p for p in made if p.exists()] == []
    finally:
        hive.cleanup()

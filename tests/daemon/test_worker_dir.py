"""Workers start in a directory of their own, never hive's: a hive started from a folder that
holds a ``hive`` package of someone else's still starts demo workers (``python -m
hive.demo_worker`` would import that folder first from hive's directory)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from hivetest import Hive, spawn_ready

from harness.procs import zombie_children

pytestmark = pytest.mark.timeout(120)


class HiveFromHere(Hive):
    """hive started by its installed command (which does not put its directory on
    ``sys.path``), from its home, where a broken ``hive`` package lies."""

    def launch(self, *extra: str) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.cli_command(), "serve", "--config", str(self.config_path), *extra],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.home,
            )
        return self.proc


@pytest.fixture(scope="module")
def hive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hive]:
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "engine-dir"
    daemon = HiveFromHere(
        f"""
[backends.placed]
command = ["{{python}}", "-m", "hive.demo_worker", "--port", "{{port}}", "--model", "{{model}}"]
cwd = "{elsewhere}"
"""
    )
    daemon.elsewhere = elsewhere  # type: ignore[attr-defined]
    try:
        impostor = daemon.home / "hive"
        impostor.mkdir()
        (impostor / "__init__.py").write_text('raise ImportError("this is not hive")\n')
        daemon.start()
        yield daemon
        assert zombie_children(daemon.pid) == []
        assert daemon.stop() == 0, daemon.log()
    finally:
        daemon.cleanup()


async def test_a_hive_folder_in_hives_directory_harms_no_worker(hive: Hive) -> None:
    async with hive.session() as s:
        worker = await spawn_ready(s, id="own-dir")
        own = hive.state_dir / "work" / "own-dir"
        assert Path(psutil.Process(worker["pid"]).cwd()) == own
        async with s.delete("/v1/workers/own-dir") as r:
            assert r.status == 200
        assert not own.exists()  # empty: removed with the worker


async def test_a_backend_names_the_directory_its_workers_start_in(hive: Hive) -> None:
    async with hive.session() as s:
        worker = await spawn_ready(s, id="placed", backend="placed")
        assert Path(psutil.Process(worker["pid"]).cwd()) == hive.elsewhere  # type: ignore[attr-defined]
        async with s.delete("/v1/workers/placed") as r:
            assert r.status == 200

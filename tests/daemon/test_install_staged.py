"""install.sh with DESTDIR as a packager uses it: the venv staged under DESTDIR, moved to PREFIX
with the staging tree gone, runs from there and names the staging tree nowhere. It installs what
the checkout holds now, not what an earlier build left in the checkout's build/.

One real install (a venv, pip with hive's dependencies from the configured index): 45 s to two
minutes on 2 shared cores. The dry-run and --skip-venv modes are in test_systemd_tools.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest
from hivetest import Hive

ROOT = Path(__file__).resolve().parents[2]
#: What install.sh reads from the checkout it lives in.
CHECKOUT = ("systemd", "hive", "pyproject.toml", "README.md", "LICENSE")

pytestmark = pytest.mark.timeout(900)

#: What would make an installed program find code elsewhere than its own venv.
FOREIGN = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HIVE_", *FOREIGN))}
    return {**env, **extra}


class InstalledHive(Hive):
    """A test hive run by the installed ``PREFIX/bin/hive`` instead of this venv's."""

    def __init__(self, prefix: Path) -> None:
        super().__init__()
        self.prefix = prefix

    def launch(self, *extra: str) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in self.env.items() if k not in FOREIGN}
        command = [str(self.prefix / "bin/hive"), "serve", "--config", str(self.config_path)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*command, *extra], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.home
            )
        return self.proc


def copy_checkout(dest: Path) -> Path:
    """The parts of this checkout that install.sh reads, copied to ``dest``."""
    for name in CHECKOUT:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, dest / name)
    return dest


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def naming(root: Path, text: str) -> list[str]:
    """The files and links under ``root`` that contain or point to ``text``."""
    needle = os.fsencode(text)
    found = []
    for path in root.rglob("*"):
        if path.is_symlink():
            if text in os.readlink(path):
                found.append(str(path))
        elif path.is_file() and needle in path.read_bytes():
            found.append(str(path))
    return sorted(found)


def test_staged_venv_runs_from_its_prefix(tmp_path: Path) -> None:
    stage, prefix = tmp_path / "stage", tmp_path / "opt" / "hive"
    gone = tmp_path / "stage.gone"
    checkout = copy_checkout(tmp_path / "checkout")
    # What setuptools left in the checkout when it built an older hive, with a module since gone.
    (checkout / "build/lib/hive").mkdir(parents=True)
    (checkout / "build/lib/hive/removed_module.py").write_text("GONE = True\n")
    try:
        result = subprocess.run(
            ["sh", str(checkout / "systemd/install.sh")],
            env=clean_env(PYTHON=sys.executable, DESTDIR=str(stage), PREFIX=str(prefix)),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert not prefix.exists()  # everything went under DESTDIR
        # Built from a copy: the checkout is as it was (no hive.egg-info, build/ untouched).
        assert sorted(p.name for p in checkout.iterdir()) == sorted([*CHECKOUT, "build"])
        assert files_under(checkout / "build") == ["lib", "lib/hive", "lib/hive/removed_module.py"]

        # What a package manager does: the files land at PREFIX; the staging tree is no more.
        prefix.parent.mkdir(parents=True)
        (stage / prefix.relative_to("/")).rename(prefix)
        stage.rename(gone)
        assert naming(prefix, str(stage)) == []
        assert list(prefix.rglob("removed_module*")) == []

        def installed(*args: str) -> str:
            done = subprocess.run(
                args, env=clean_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path
            )
            assert done.returncode == 0, done.stdout + done.stderr
            return done.stdout

        assert installed(str(prefix / "bin/hive"), "--help").startswith("usage: hive ")
        # The installed copy of hive, not this checkout (non-editable).
        where = installed(str(prefix / "bin/python"), "-c", "import hive; print(hive.__file__)")
        assert where.startswith(f"{prefix}/lib/"), where

        hive = InstalledHive(prefix)
        try:
            hive.start(timeout=60)
            assert psutil.Process(hive.pid).cmdline()[:2] == [
                f"{prefix}/bin/python",
                f"{prefix}/bin/hive",
            ]
            with urllib.request.urlopen(f"{hive.url}/health", timeout=30) as answer:
                assert answer.status == 200
                assert json.load(answer)["status"] == "ok"
            assert hive.stop() == 0, hive.log()
        finally:
            hive.cleanup()
    finally:
        for tree in (stage, gone, prefix, checkout):
            shutil.rmtree(tree, ignore_errors=True)

"""Programs run on the systemd files in systemd/: `systemd-analyze verify` on the unit,
systemd-sysusers on the sysusers entry, and install.sh in --dry-run and DESTDIR modes. What is
read without running anything is in tests/unit/test_systemd.py.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "hive.service"
SYSUSERS = SYSTEMD / "hive.sysusers"
EXAMPLE = SYSTEMD / "hive.toml.example"
INSTALL = SYSTEMD / "install.sh"


# -- systemd-analyze -----------------------------------------------------------------------------


def _verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "hive.service"
    path.write_text(unit_text)
    return subprocess.run(
        ["systemd-analyze", "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice", "SYSTEMD_PAGER": "cat"},
    )


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian/Ubuntu: apt-get install systemd)",
)
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    hive = Path(sys.executable).parent / "hive"
    if not os.access(hive, os.X_OK):
        hive = Path(sys.executable)  # any existing executable will do for verify
    text = UNIT.read_text().replace("ExecStart=/usr/local/bin/hive ", f"ExecStart={hive} ")
    assert text != UNIT.read_text()
    result = _verify(text, tmp_path)
    output = (result.stdout + result.stderr).strip()
    # verify exits 0 on unknown keys and bad values, only warning: no line may name the unit.
    problems = [line for line in output.splitlines() if "hive.service" in line]
    assert result.returncode == 0, output
    assert problems == [], output
    # And it does see problems: a sanity check of the check itself.
    broken = _verify(text.replace("KillMode=process", "KillMode=procss"), tmp_path)
    assert "hive.service" in broken.stdout + broken.stderr


# -- sysusers ------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_sysusers_creates_the_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0 and os.geteuid() != 0:
        pytest.skip(f"systemd-sysusers --root needs root here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc/passwd").read_text()
    assert re.search(r"^hive:x:\d+:\d+:hive node agent:/var/lib/hive:\S*nologin$", passwd, re.M)
    assert re.search(r"^video:x:\d+:hive$", (tmp_path / "etc/group").read_text(), re.M)


# -- install.sh ----------------------------------------------------------------------------------


def install(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHON": sys.executable,
        **env,
    }
    return subprocess.run(
        ["sh", str(INSTALL), *args], capture_output=True, text=True, timeout=60, env=full
    )


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_install_dry_run_with_destdir(tmp_path: Path) -> None:
    result = install("--dry-run", DESTDIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "dry run: nothing is changed" in out
    assert f"+ {sys.executable} -m venv {tmp_path}/opt/hive" in out
    venv_python = f"{tmp_path}/opt/hive/bin/python"
    # pip builds from a fresh copy of the package's files, not in the checkout.
    files = " ".join(f"{ROOT}/{n}" for n in ("pyproject.toml", "README.md", "LICENSE", "hive"))
    copy = re.search(rf"^\+ cp -R {re.escape(files)} (/\S+/hive-src\.XXXXXX)/$", out, re.M)
    assert copy, out
    assert f"+ {venv_python} -m pip install --quiet --upgrade --no-compile {copy[1]}\n" in out
    # The staged venv is made to name /opt/hive, where it will run (test_install_staged.py).
    assert f"+ {venv_python} {SYSTEMD}/relocate.py {tmp_path} /opt/hive" in out
    assert f"{SYSUSERS} {tmp_path}/etc/sysusers.d/hive.conf" in out
    assert "ExecStart=/opt/hive/bin/hive " in out
    assert f"> {tmp_path}/etc/systemd/system/hive.service" in out
    assert f"{EXAMPLE} {tmp_path}/etc/hive/hive.toml" in out
    assert f"new random token > {tmp_path}/etc/hive/token" in out
    assert f"+ write {tmp_path}/usr/local/bin/hive (exec /opt/hive/bin/hive " in out
    # With DESTDIR, nothing touches the running system.
    assert "skip (DESTDIR): systemd-sysusers /etc/sysusers.d/hive.conf" in out
    assert "skip (DESTDIR): systemctl daemon-reload" in out
    assert not re.search(r"^\+ (systemctl|systemd-sysusers|chgrp|useradd)", out, re.M)
    assert files_under(tmp_path) == []  # a dry run changes nothing


def test_install_dry_run_on_the_live_system() -> None:
    result = install("--dry-run", PREFIX="/srv/hive")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"+ {sys.executable} -m venv /srv/hive" in out
    assert re.search(
        r"^\+ /srv/hive/bin/python -m pip install --quiet --upgrade /\S+/hive-src\.XXXXXX$",
        out,
        re.M,
    ), out
    assert "relocate.py" not in out
    assert "ExecStart=/srv/hive/bin/hive " in out
    assert "> /etc/systemd/system/hive.service" in out
    assert re.search(r"^\+ (systemd-sysusers /etc/sysusers.d/hive.conf|useradd )", out, re.M)
    assert "+ systemctl daemon-reload" in out.splitlines()


def test_install_into_destdir(tmp_path: Path) -> None:
    result = install("--skip-venv", DESTDIR=str(tmp_path), PREFIX="/srv/hive")
    assert result.returncode == 0, result.stderr
    assert files_under(tmp_path) == [
        "etc",
        "etc/hive",
        "etc/hive/hive.toml",
        "etc/hive/token",
        "etc/systemd",
        "etc/systemd/system",
        "etc/systemd/system/hive.service",
        "etc/sysusers.d",
        "etc/sysusers.d/hive.conf",
        "usr",
        "usr/local",
        "usr/local/bin",
        "usr/local/bin/hive",
    ]
    unit = (tmp_path / "etc/systemd/system/hive.service").read_text()
    assert unit == UNIT.read_text().replace(
        "ExecStart=/usr/local/bin/hive ", "ExecStart=/srv/hive/bin/hive "
    )
    assert (tmp_path / "etc/sysusers.d/hive.conf").read_text() == SYSUSERS.read_text()
    config = tmp_path / "etc/hive/hive.toml"
    token = tmp_path / "etc/hive/token"
    assert config.read_text() == EXAMPLE.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", token.read_text())
    for path in (config, token):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path

    # Again, as an upgrade: the operator's configuration and token stay as they are.
    config.write_text('listen = "0.0.0.0:7070"\n')
    before = token.read_text()
    again = install("--skip-venv", DESTDIR=str(tmp_path))
    assert again.returncode == 0, again.stderr
    assert "keep" in again.stdout
    assert config.read_text() == 'listen = "0.0.0.0:7070"\n'
    assert token.read_text() == before
    assert (
        "ExecStart=/opt/hive/bin/hive "
        in (tmp_path / "etc/systemd/system/hive.service").read_text()
    )


def test_install_usage() -> None:
    assert install("--bogus").returncode == 2
    relative = install("--dry-run", PREFIX="opt/hive")
    assert relative.returncode == 2
    assert relative.stderr == "install.sh: PREFIX must be an absolute path, not opt/hive\n"
    usage = install("--help")
    assert usage.returncode == 0
    assert "--dry-run" in usage.stdout and "DESTDIR" in usage.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="as root it would really install")
def test_install_refuses_without_root() -> None:
    result = install()
    assert result.returncode == 1
    assert "run as root" in result.stderr


def test_install_operator_wrapper(tmp_path: Path) -> None:
    """``sudo hive status`` reaches the service: the wrapper sets HIVE_CONFIG, keeps the args."""
    prefix, dest = tmp_path / "prefix", tmp_path / "dest"
    (prefix / "bin").mkdir(parents=True)
    fake = prefix / "bin/hive"
    fake.write_text('#!/bin/sh\nprintf "%s|" "$HIVE_CONFIG" "$@"\n')
    fake.chmod(0o755)
    result = install("--skip-venv", DESTDIR=str(dest), PREFIX=str(prefix))
    assert result.returncode == 0, result.stderr
    wrapper = dest / "usr/local/bin/hive"
    assert stat.S_IMODE(wrapper.stat().st_mode) == 0o755

    def call(*args: str, **env: str) -> str:
        full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
        done = subprocess.run([str(wrapper), *args], capture_output=True, text=True, env=full)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert call("logs", "a b", "-n", "5") == "/etc/hive/hive.toml|logs|a b|-n|5|"
    assert call("list", HIVE_CONFIG="/elsewhere.toml") == "/elsewhere.toml|list|"

    # A `hive` there that the installer did not write is left alone.
    wrapper.write_text("#!/bin/sh\necho mine\n")
    again = install("--skip-venv", DESTDIR=str(dest), PREFIX=str(prefix))
    assert again.returncode == 0, again.stderr
    assert f"keep {wrapper} (not ours" in again.stdout
    assert wrapper.read_text() == "#!/bin/sh\necho mine\n"

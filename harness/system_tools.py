"""The system programs the tests drive, installed with apt-get where missing and allowed.

Debian's ``chromium`` (the status page's test, in a real headless browser) and ``prometheus``
(its ``promtool`` checks the shipped alerting rules and hive's live metrics; its server scrapes
a live hive) and ``etcd-server`` (3.4, the fleet's store, started by the fleet tests on
loopback). ``make test`` runs this first. Where they cannot be installed (not Debian, not
root and no sudo) it says so, and the tests that need them are skipped with that reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

#: command -> the Debian package that brings it.
TOOLS = {
    "chromium": "chromium",
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "etcd": "etcd-server",
}


def say(message: str) -> None:
    print(f"system tools: {message}", file=sys.stderr, flush=True)


def main() -> int:
    missing = sorted({pkg for cmd, pkg in TOOLS.items() if shutil.which(cmd) is None})
    if not missing:
        return 0
    apt = shutil.which("apt-get")
    sudo: list[str] = [] if os.geteuid() == 0 else ["sudo"]
    if apt is None or (sudo and shutil.which("sudo") is None):
        say(f"missing {', '.join(missing)} and cannot install them here; their tests will skip")
        return 0
    say(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, apt, "update", "-qq"], check=True, env=env)
    subprocess.run(
        [*sudo, apt, "install", "-y", "-qq", "--no-install-recommends", *missing],
        check=True,
        env=env,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

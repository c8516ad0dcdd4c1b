"""An environment for the processes a run starts: isolated in a temp dir, carrying the tag."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from harness.procs import Tag

#: Variables of this process that never reach a child: hive's own settings, the platformdirs
#: roots (which ``home`` replaces) and systemd's.
DROPPED = ("HIVE_", "XDG_", "NOTIFY_SOCKET", "WATCHDOG_")


def isolated_env(
    home: Path,
    tag: Tag,
    extra: Mapping[str, str] | None = None,
    *,
    drop: Sequence[str] = (),
) -> dict[str, str]:
    """This process's environment less :data:`DROPPED` and the prefixes in ``drop``, with
    every platformdirs root under ``home``, ``tag``, unbuffered output, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith((*DROPPED, *drop))}
    env.update(
        {
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / "config"),
            "XDG_STATE_HOME": str(home / "state"),
            "XDG_RUNTIME_DIR": str(home / "run"),
            "XDG_DATA_HOME": str(home / "data"),
            "XDG_CACHE_HOME": str(home / "cache"),
            **tag.env,
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env

"""Room in state_dir: whether a spawn can write its worker's log and the journal.

Checked before anything of a spawn is done, so a full disk is a clear refusal that leaves
nothing behind; the condition is logged once when it starts and once when it ends.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hive.errors import NoDiskRoom

log = logging.getLogger("hive.room")

#: Below this much free space, a spawn is refused before anything is started.
MIN_FREE_BYTES = 1 << 20


class Room:
    """The free space and inodes of the filesystem that holds ``directory``."""

    def __init__(self, directory: Path, state_dir: Path) -> None:
        self.directory = directory
        self.state_dir = state_dir
        self._full = False

    def check(self) -> None:
        """Raise NoDiskRoom, naming state_dir and what is full, when there is no room."""
        try:
            stat = os.statvfs(self.directory)
        except OSError:
            return
        free = stat.f_bavail * stat.f_frsize
        if free >= MIN_FREE_BYTES and (stat.f_files == 0 or stat.f_favail > 0):
            if self._full:
                log.info("state_dir %s has room again (%d KiB free)", self.state_dir, free // 1024)
                self._full = False
            return
        error = NoDiskRoom(self.state_dir, free, "space" if free < MIN_FREE_BYTES else "inodes")
        if not self._full:  # one line per condition, not one per refused request
            log.error("%s", error.message)
            self._full = True
        raise error

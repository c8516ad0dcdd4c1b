"""Real filesystems that can really be full: a small tmpfs mounted for a test (needs root)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path


class CannotMount(Exception):
    """No tmpfs here (not root, no mount command, or the kernel said no); the reason says."""


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``64k``, ``4m``) mounted on ``path`` until the block ends."""
    if os.geteuid() != 0:
        raise CannotMount("needs root, to mount a small tmpfs that can be filled up")
    if shutil.which("mount") is None:
        raise CannotMount("no mount command")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        raise CannotMount(f"cannot mount a tmpfs: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to the last byte; returns the file that does it
    (remove it to free the space)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as file:
        for chunk in (b"\0" * 4096, b"\0"):
            with contextlib.suppress(OSError):
                while True:
                    file.write(chunk)
    probe = directory / "probe"
    try:
        with open(probe, "wb", buffering=0) as file:
            file.write(b"x")
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    else:
        raise AssertionError(f"{directory} is not full after filling it")
    finally:
        probe.unlink(missing_ok=True)
    return filler

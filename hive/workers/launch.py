"""What one attempt of a worker runs: its argv and environment, built from the record.

A plain function of the record, its request, the backend and the configuration, so it can be
read and tested without a daemon. The supervisor's lifecycle hands the result to the spawner.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from hive.config import BackendConfig, Config
from hive.devices.cpu import cpulist
from hive.host.containment import ATTEMPT_ENV, INSTANCE_ENV, WORKER_ENV
from hive.host.process import Launch
from hive.models import Entry, Worker, base_id, process_key

#: hive's own variables that a worker must not inherit.
SCRUBBED_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "HIVE_TOKEN",
    "HIVE_CONFIG",
)


def memory_fraction(share_mib: int | None, total_mib: int | None) -> str:
    """``share_mib`` of ``total_mib`` as a fraction rounded down to 3 places (``0.139``), so an
    engine told it never takes more than its share; empty when either is unknown."""
    if not share_mib or not total_mib:
        return ""
    return f"{math.floor(min(share_mib / total_mib, 1.0) * 1000) / 1000:.3f}"


def device_kind(record: Worker) -> str:
    """``gpu`` for a worker given GPUs, else ``cpu``: which ``device_args``/``device_env`` apply."""
    return "gpu" if record.gpus else "cpu"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def placeholders(
    entry: Entry,
    config: Config,
    gpu_total_mib: int | None = None,
    backend_venv: Path | None = None,
) -> dict[str, str]:
    """The values of a backend command's ``{placeholders}`` for this attempt.

    ``gpu_total_mib`` is the memory of the smallest of the worker's GPUs: what its declared share
    (``{gpu_memory_mib}``) is a fraction of (``{gpu_memory_fraction}``).
    """
    record, spec = entry.record, entry.spec
    share = spec.gpu_memory_mib if record.gpus else None
    return {
        "model": spec.model,
        "port": str(record.port),
        "host": config.worker_host,
        "python": str(venv_python(backend_venv)) if backend_venv else sys.executable,
        "id": base_id(record.id),
        "device": record.device,
        "gpus": str(len(record.gpus)),
        "ncpus": str(len(record.cpus)),
        "cpus": cpulist(record.cpus),
        "state_dir": str(config.state_path),
        "role": record.role,
        "bootstrap_port": str(record.bootstrap_port or ""),
        "gpu_memory_mib": str(share or ""),
        "gpu_memory_fraction": memory_fraction(share, gpu_total_mib),
    }


def attempt_nonce(record: Worker) -> str:
    """The tag of one attempt: a process carrying another is left from an earlier one."""
    return f"{record.created_at.timestamp():.6f}.{record.restarts}"


def build_launch(
    entry: Entry,
    backend: BackendConfig,
    config: Config,
    api_url: str,
    log_path: Path,
    environ: Mapping[str, str] | None = None,
    instance: str = "",
    gpu_total_mib: int | None = None,
) -> Launch:
    """argv, environment, log file and cores for the next attempt of ``entry``'s worker.

    argv is the backend's ``command``, its ``role_args`` for the worker's role, its
    ``device_args`` for the kind of device it was placed on, its ``share_args`` when it holds a
    share of a GPU, then the request's ``args``. The environment is hive's own (less
    :data:`SCRUBBED_ENV`), then the backend's ``env`` and its ``device_env`` for the device,
    then the request's, then what hive tells every worker (``HIVE_*``,
    ``CUDA_VISIBLE_DEVICES``), with the containment tag (``HIVE_INSTANCE``, ``HIVE_WORKER_ID``,
    ``HIVE_ATTEMPT``) that every descendant inherits.
    """
    record, spec = entry.record, entry.spec
    values = placeholders(entry, config, gpu_total_mib, backend.venv)
    kind = device_kind(record)
    command = [*backend.command, *backend.role_args.get(record.role, [])]
    command += backend.device_args.get(kind, [])
    if values["gpu_memory_mib"]:
        command += backend.share_args
    argv = [arg.format_map(values) for arg in command] + list(spec.args)
    inherited = os.environ if environ is None else environ
    env = {k: v for k, v in inherited.items() if k not in SCRUBBED_ENV}
    env.update(backend.env)
    env.update({k: v.format_map(values) for k, v in backend.device_env.get(kind, {}).items()})
    env.update(spec.env)
    env.update(
        {
            INSTANCE_ENV: instance,
            WORKER_ENV: process_key(record),
            ATTEMPT_ENV: attempt_nonce(record),
            "HIVE_MODEL": spec.model,
            "HIVE_BACKEND": record.backend,
            "HIVE_PORT": str(record.port),
            "HIVE_DEVICE": record.device,
            "HIVE_URL": api_url,
            "HIVE_WORKER_TOKEN": entry.token,
            "HIVE_HEARTBEAT_INTERVAL": f"{config.heartbeat_timeout / 3:g}",
            "CUDA_VISIBLE_DEVICES": ",".join(record.gpus),
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        }
    )
    if spec.cpus is not None:
        env["OMP_NUM_THREADS"] = str(len(record.cpus))
    if backend.venv is not None:
        env["PATH"] = f"{backend.venv / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}"
        env["VIRTUAL_ENV"] = str(backend.venv)
    if "/" not in argv[0]:  # found on the worker's PATH, not hive's
        argv[0] = shutil.which(argv[0], path=env.get("PATH", os.defpath)) or argv[0]
    cpus = frozenset(record.cpus) if record.cpus else None
    return Launch(
        argv,
        env,
        log_path,
        cpus,
        user=backend.user,
        group=backend.group,
        cwd=workdir(record, backend, config),
    )


def workdir(record: Worker, backend: BackendConfig, config: Config) -> Path:
    """The directory a worker starts in, never hive's own (a ``hive`` folder there would be
    imported in hive's place): the backend's ``cwd``; ``/`` for a backend that runs as another
    user (``state_dir`` is hive's alone); else its own, ``<state_dir>/work/<id>``, kept across
    its attempts and replacements."""
    if backend.cwd is not None:
        return Path(backend.cwd)
    if backend.user is not None or backend.group is not None:
        return Path("/")
    return config.state_path / "work" / base_id(record.id)


def forget_workdir(config: Config, worker_id: str) -> None:
    """Remove a removed worker's own directory if it is empty (what it left there stays)."""
    if base_id(worker_id) == worker_id:
        with contextlib.suppress(OSError):
            (config.state_path / "work" / worker_id).rmdir()

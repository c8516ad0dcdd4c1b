"""A fake NVML for tests: build ``harness/fake_nvml.c`` and describe GPUs to it.

The fake is a real shared library named ``libnvidia-ml.so.1``; the real pynvml binding loads it
through ``LD_LIBRARY_PATH``, so code under test runs unchanged on a machine without a GPU.
pynvml loads the library once per process, so a test runs the code that uses it in a child
process (or a daemon) started with :func:`env_for`. The config file is re-read on every device
call, so rewriting it with :func:`write_config` changes what a running process sees.

Building needs a C compiler: ``cc`` (on Debian/Ubuntu: ``apt-get install gcc``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

SOURCE = Path(__file__).parent / "fake_nvml.c"
LIBRARY_NAME = "libnvidia-ml.so.1"

NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

#: Calls that ``FakeGpu.unsupported`` and ``FakeGpu.fail`` may name.
FIELDS = frozenset(
    {
        "name",
        "uuid",
        "pci",
        "memory",
        "util",
        "temp",
        "power",
        "affinity",
        "processes",
        "index",
        "minor",
    }
)


def compiler() -> str | None:
    """The C compiler to build with (``$CC``, else ``cc``), or None when there is none."""
    return shutil.which(os.environ.get("CC", "cc"))


def build_fake_nvml(dest_dir: Path) -> Path:
    """Compile the fake into ``dest_dir/<source hash>/libnvidia-ml.so.1``; return that folder.

    A build of the same source already there is reused. Raises RuntimeError when there is no
    compiler or the build fails.
    """
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc) to build the fake NVML: apt-get install gcc")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    lib_dir = Path(dest_dir) / digest
    library = lib_dir / LIBRARY_NAME
    if library.exists():
        return lib_dir
    lib_dir.mkdir(parents=True, exist_ok=True)
    partial = lib_dir / f".{LIBRARY_NAME}.{os.getpid()}"
    command = [cc, "-shared", "-fPIC", "-O1", "-fvisibility=hidden", "-o", str(partial)]
    result = subprocess.run(
        [*command, str(SOURCE), "-lpthread"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"building the fake NVML failed:\n{result.stderr}")
    partial.replace(library)
    return lib_dir


@dataclass
class FakeGpu:
    """One GPU as the fake reports it. Memory in MiB; the fake answers in bytes, as NVML does."""

    index: int
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str | None = None  # default: GPU-00000000-0000-0000-0000-<index as 12 hex digits>
    bus: str | None = None  # default: 00000000:<0x10 + index>:00.0
    total_mib: int = 81920
    used_mib: int = 0
    reserved_mib: int = 0
    util: int = 0
    mem_util: int = 0
    temp: int = 30
    power_mw: int = 60000
    cpus: str | None = None  # "0-3,8"; default: every core
    minor: int | None = None
    lost: bool = False
    error: int = 0  # non-zero: every call on this GPU answers this NVML code
    delay_ms: int = 0  # every call on this GPU takes this long
    unsupported: Iterable[str] = ()  # calls answering NVML_ERROR_NOT_SUPPORTED
    fail: dict[str, int] = field(default_factory=dict)  # call -> NVML error code

    def line(self) -> str:
        pairs: dict[str, object] = {
            "index": self.index,
            "name": self.name,
            "uuid": self.uuid or f"GPU-00000000-0000-0000-0000-{self.index:012x}",
            "bus": self.bus or f"00000000:{0x10 + self.index:02X}:00.0",
            "total_mib": self.total_mib,
            "used_mib": self.used_mib,
            "reserved_mib": self.reserved_mib,
            "util": self.util,
            "mem_util": self.mem_util,
            "temp": self.temp,
            "power_mw": self.power_mw,
            "lost": int(self.lost),
            "error": self.error,
            "delay_ms": self.delay_ms,
        }
        if self.cpus is not None:
            pairs["cpus"] = self.cpus
        if self.minor is not None:
            pairs["minor"] = self.minor
        unsupported = list(self.unsupported)
        if unsupported:
            pairs["unsupported"] = ",".join(_checked(unsupported))
        if self.fail:
            _checked(self.fail)
            pairs["fail"] = ",".join(f"{call}:{code}" for call, code in self.fail.items())
        return "gpu " + " ".join(f"{key}={_quote(value)}" for key, value in pairs.items())


@dataclass
class FakeProc:
    """A compute process on a GPU; ``used_mib=None`` reads as NVML_VALUE_NOT_AVAILABLE."""

    gpu: int
    pid: int
    used_mib: int | None = 0

    def line(self) -> str:
        used = "na" if self.used_mib is None else str(self.used_mib)
        return f"proc gpu={self.gpu} pid={self.pid} used_mib={used}"


def _checked(names: Iterable[str]) -> list[str]:
    names = list(names)
    unknown = set(names) - FIELDS
    if unknown:
        raise ValueError(f"the fake NVML has no call named {sorted(unknown)}")
    return names


def _quote(value: object) -> str:
    text = str(value)
    if any(c in text for c in '"#\n'):
        raise ValueError(f"the fake NVML config cannot hold {text!r}")
    return f'"{text}"' if not text or any(c.isspace() for c in text) else text


def write_config(
    path: Path,
    gpus: Iterable[FakeGpu],
    procs: Iterable[FakeProc | tuple[int, int, int | None]] = (),
    *,
    driver: str = "550.54.15",
    init_error: int = 0,
) -> Path:
    """Write the fake's config (atomically: a running process never reads half a file).

    ``procs`` items are FakeProc or ``(gpu, pid, used_mib)`` tuples.
    """
    path = Path(path)
    lines = [f"system driver={_quote(driver)} init_error={init_error}"]
    lines += [gpu.line() for gpu in gpus]
    lines += [(p if isinstance(p, FakeProc) else FakeProc(*p)).line() for p in procs]
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("\n".join(lines) + "\n")
    partial.replace(path)
    return path


def env_for(lib_dir: Path, config_path: Path | None) -> dict[str, str]:
    """The environment for a child process that should load the fake as its NVML.

    ``config_path=None`` leaves FAKE_NVML_CONFIG unset: the fake then answers like a host whose
    driver is not loaded.
    """
    env = dict(os.environ)
    env.pop("FAKE_NVML_INIT_ERROR", None)
    previous = env.get("LD_LIBRARY_PATH")
    env["LD_LIBRARY_PATH"] = f"{lib_dir}:{previous}" if previous else str(lib_dir)
    if config_path is None:
        env.pop("FAKE_NVML_CONFIG", None)
    else:
        env["FAKE_NVML_CONFIG"] = str(config_path)
    return env
